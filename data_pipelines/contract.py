"""The preprocessing contract: what the numbers fed to a model mean.

Born when a dataset is prepared (written beside it as `contract.json`), copied into every checkpoint trained on it,
and checked by every program that later feeds data to that checkpoint. Pure Python: no JAX, no files.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from data_pipelines.errors import DataError
from data_pipelines.leads import LEADS



@dataclasses.dataclass(frozen=True)
class Contract:
  fs: float = 250.0                 # Hz, after resampling
  window: int = 2250                # samples the model sees (9 s at 250 Hz)
  record_samples: int = 2500        # samples stored per example (10 s); crops are cut from these
  patch_size: int = 75              # samples per patch (0.3 s)
  leads: tuple[str, ...] = LEADS
  units: str = "mV"
  resample: str = "fft"             # scipy.signal.resample
  highpass_hz: float | None = 0.67  # Butterworth, zero phase (sosfiltfilt)
  lowpass_hz: float | None = 40.0
  filter_order: int = 5
  filter_stage: str = "per_crop"    # "per_crop" (as the reference) or "offline" (once per record when prepared)
  normalisation: str = "zscore_per_ecg"  # one mean/std over all leads and time of a crop

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["leads"] = list(self.leads)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Contract":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown contract field(s) {unknown}")
    d = dict(d)
    if "leads" in d:
      d["leads"] = tuple(d["leads"])
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> "Contract":
    return cls.from_dict(json.loads(text))


# Fields whose mismatch a program can adapt by itself, and how.
ADAPTABLE = {
  "fs": "resampled to the checkpoint's rate",
  "leads": "reordered by lead name; leads the checkpoint lacks are refused",
  "record_samples": "cropped to the checkpoint's window",
  # The data's own crop length means nothing to a checkpoint: its window (at its rate) is cut from each record.
  "window": "the checkpoint's window is cropped from each record, at the checkpoint's rate",
  "filter_stage": "filtered where the checkpoint expects",
}


class ContractMismatch(DataError, ValueError):
  """Data prepared under a contract the checkpoint cannot adapt to (a user error: exit code 1, no traceback)."""


def compare(checkpoint: Contract, data: Contract) -> tuple[list[str], list[str]]:
  """(adapted, refused): human-readable lines for each field that differs between a checkpoint and data."""
  adapted, refused = [], []
  for f in dataclasses.fields(Contract):
    want, got = getattr(checkpoint, f.name), getattr(data, f.name)
    if want == got:
      continue
    if f.name == "leads":
      extra = [n for n in got if n not in want]
      if extra:
        refused.append(f"leads: data has {extra} which the checkpoint never saw (checkpoint leads: {list(want)})")
      else:
        adapted.append(f"leads: data {list(got)} vs checkpoint {list(want)}: {ADAPTABLE['leads']}")
    elif f.name in ADAPTABLE:
      adapted.append(f"{f.name}: data {got!r} vs checkpoint {want!r}: {ADAPTABLE[f.name]}")
    else:
      refused.append(f"{f.name}: data {got!r} but checkpoint expects {want!r}")
  return adapted, refused


def check(checkpoint: Contract, data: Contract) -> list[str]:
  """Raise ContractMismatch naming every field that cannot be adapted; return the adaptations made."""
  adapted, refused = compare(checkpoint, data)
  if refused:
    raise ContractMismatch("data does not match the checkpoint's preprocessing contract:\n  " + "\n  ".join(refused))
  return adapted
