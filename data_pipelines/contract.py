"""The preprocessing contract: what the numbers fed to a model mean.

Born when a dataset is prepared (written beside it as `contract.json`), copied into every checkpoint trained on it,
and checked by every program that later feeds data to that checkpoint. Pure Python: no JAX.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
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
  def from_dict(cls, d: dict[str, Any], where: str = "contract") -> "Contract":
    """The contract a dict describes; `BadContract` (naming `where`, e.g. the file) for unknown fields and for
    values of the wrong type or range, so that a damaged contract.json is refused here and not met later as a
    confusing failure inside preprocessing."""
    if not isinstance(d, dict):
      raise BadContract(f"{where}: a contract is a JSON object of fields, not {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise BadContract(f"{where}: unknown contract field(s) {unknown}")
    d = dict(d)
    for name, value in d.items():
      problem = _field_problem(name, value)
      if problem:
        raise BadContract(f"{where}: contract field {name} is {_short(value)}; {problem}")
    if "leads" in d:
      d["leads"] = tuple(d["leads"])
    return cls(**d)

  @classmethod
  def from_json(cls, text: str, where: str = "contract") -> "Contract":
    try:
      d = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, and integers beyond Python's digit limit
      raise BadContract(f"{where}: not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    return cls.from_dict(d, where)


class BadContract(DataError, ValueError):
  """A contract (a contract.json, or the contract in a checkpoint's meta) that is not one: unreadable JSON, unknown
  fields, values of the wrong type or range. A DataError (exit code 1), and a ValueError as it always was."""


def read(path: str | os.PathLike[str]) -> Contract:
  """The contract in a `contract.json` file; `BadContract` naming the file when it is not a valid one."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size > _MAX_BYTES:
      raise BadContract(f"{path}: more than {_MAX_BYTES} bytes is not a contract")
    return from_bytes(f.read(), path)


def from_bytes(raw: bytes, where: str) -> Contract:
  """The contract in the bytes of a `contract.json` (read by any file layer); `BadContract` naming `where`."""
  if len(raw) > _MAX_BYTES:
    raise BadContract(f"{where}: more than {_MAX_BYTES} bytes is not a contract")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadContract(f"{where}: not UTF-8 text ({e})") from None
  return Contract.from_json(text, where=where)


_MAX_BYTES = 1 << 20  # a contract is a few hundred bytes
_INT_FIELDS = ("window", "record_samples", "patch_size", "filter_order")
_CHOICES = {"filter_stage": ("per_crop", "offline")}


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _positive(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _field_problem(name: str, value: Any) -> str | None:
  """Why `value` cannot be the contract field `name` (None when it can)."""
  if name == "fs":
    return None if _positive(value) else "a sampling rate is a positive number of Hz"
  if name in _INT_FIELDS:
    return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 < value < 2 ** 31 else \
      "it must be a positive whole number"
  if name in ("highpass_hz", "lowpass_hz"):
    return None if value is None or _positive(value) else "a filter edge is a positive number of Hz or null"
  if name == "leads":
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(n, str) for n in value):
      return "it must be a non-empty list of lead names"
    bad = [n for n in value if n not in LEADS]
    if bad or len(set(value)) != len(value):
      return f"lead names are {', '.join(LEADS)}, each once"
    return None
  if not isinstance(value, str):
    return "it must be text"
  if name in _CHOICES and value not in _CHOICES[name]:
    return f"it must be one of {list(_CHOICES[name])}"
  return None


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
