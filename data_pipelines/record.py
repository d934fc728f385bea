"""The one in-memory form every reader returns."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipelines import leads as leads_lib
from data_pipelines.errors import DataError


class RecordError(DataError, ValueError):
  """A record that cannot be used. `reason` is a short stable key for quarantine reports.

  A DataError: when it escapes (`--strict`, a single record asked for by name) the command reports it in one line."""

  def __init__(self, path: str, reason: str, detail: str = ""):
    self.path, self.reason, self.detail = str(path), reason, detail
    super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass
class Record:
  """One ECG in physical units.

  signal:  float32 (len(leads), T) in millivolts, rows in the order of `leads` (canonical names only).
  fs:      sampling rate in Hz.
  leads:   canonical names of the rows; standard leads the file lacks are simply not here (see `absent_leads`).
  dropped_leads: names in the file that are not standard leads (e.g. Frank `vx`), dropped and recorded.
  metadata: anything else the file says (age, sex, diagnosis codes...).
  """
  signal: np.ndarray
  fs: float
  leads: tuple[str, ...]
  record_id: str
  patient_id: str | None = None
  source: str = ""
  path: str = ""
  dropped_leads: tuple[str, ...] = ()
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def absent_leads(self) -> tuple[str, ...]:
    return tuple(n for n in leads_lib.LEADS if n not in self.leads)

  @property
  def seconds(self) -> float:
    return self.signal.shape[-1] / float(self.fs)

  def standard(self) -> tuple[np.ndarray, np.ndarray]:
    """(12, T) signal in canonical order and a (12,) bool lead-present mask.

    Absent leads are zero rows *and* False in the mask: the mask, not the zeros, says they are absent.
    """
    out = np.zeros((leads_lib.NUM_LEADS, self.signal.shape[-1]), np.float32)
    present = np.zeros((leads_lib.NUM_LEADS,), bool)
    for row, name in zip(self.signal, self.leads):
      i = leads_lib.LEAD_ID[name]
      out[i] = row
      present[i] = True
    return out, present
