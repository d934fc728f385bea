"""What every reader shares: picking standard leads by name, parsing demographics, and the format-free checks.

Readers only turn bytes into a `Record`; whether a record is usable (rate, length, finite samples, flat leads) is
decided once, here, so that every file family is held to the same rules and the same `RecordError` reasons.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import leads as leads_lib
from data_pipelines.errors import UsageError
from data_pipelines.record import Record, RecordError

# Stable `RecordError.reason` keys, for quarantine reports and tests.
UNREADABLE = "unreadable"        # the signal file is missing, truncated or corrupt
BAD_HEADER = "bad_header"        # the header / metadata describing the signal is malformed
NON_FINITE = "non_finite"        # NaN or inf samples
FLAT_RECORD = "flat_record"      # every lead is constant (single flat leads are marked absent instead)
TOO_SHORT = "too_short"          # shorter than `min_seconds`
UNKNOWN_LEADS = "unknown_leads"  # not one standard lead among the file's signals
UNSUPPORTED_FS = "unsupported_fs"  # sampling rate below `min_fs`
DUPLICATE_LEADS = "duplicate_leads"  # two signals name the same standard lead: which one it is cannot be known
NO_LABEL = "no_label"            # the labels CSV given for a folder has no row for the record
REASONS = (UNREADABLE, BAD_HEADER, NON_FINITE, FLAT_RECORD, TOO_SHORT, UNKNOWN_LEADS, UNSUPPORTED_FS, DUPLICATE_LEADS,
           NO_LABEL)

MIN_FS = 100.0  # PTB-XL's 100 Hz release is the lowest rate in common use; below that QRS shapes are lost.


@dataclasses.dataclass(frozen=True)
class Checks:
  """Thresholds of `validate`, passed through by every reader so callers set them once."""
  min_seconds: float = 1.0
  min_fs: float = MIN_FS
  allow_non_finite: bool = False  # True keeps NaN gaps (long Holter-like records); `windows` drops them later
  flat_tolerance: float = 0.0     # mV; a lead whose peak-to-peak range is <= this is flat


def parse_lead_map(spec: str | Mapping[str, str] | None) -> dict[str, str]:
  """`ECG=I,MLII=II` (or a mapping) -> {file name case-folded: canonical lead}; None or "" -> {}.

  Why: a file may name its channels in a way no alias list can guess (CinC 2017's single `ECG` channel is lead I of
  a hand-held device); the user says what each name is, once, for every record. Raises UsageError naming the bad
  entry (a target that is not a standard lead, an entry without `=`).
  """
  if not spec:
    return {}
  if isinstance(spec, Mapping):
    pairs = [(str(k), str(v)) for k, v in spec.items()]
  else:
    pairs = [tuple(part.partition("=")[::2]) for part in str(spec).split(",") if part.strip()]
  out = {}
  for name, target in pairs:
    if not str(target).strip() or not str(name).strip():
      raise UsageError(f"--lead_map entry {name!r} is not FILE_NAME=LEAD (e.g. --lead_map ECG=I)")
    canonical = leads_lib.canonical_name(str(target))
    if canonical is None:
      raise UsageError(f"--lead_map {name}={target}: {target!r} is not a standard lead; leads are "
                       f"{', '.join(leads_lib.LEADS)}")
    out[str(name).strip().lower()] = canonical
  return out


def select_standard_leads(signal: np.ndarray, names: Sequence[str], path: str,
                          lead_map: Mapping[str, str] | None = None
                          ) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
  """Rows of `signal` (C, T) whose names are standard leads, by name, in file order; the others are dropped.

  `lead_map` (from `parse_lead_map`) renames file channels first, so `ECG` can be lead I. Two rows naming the same
  lead (`ii` twice, or `II` and `MLII`) refuse the record (`duplicate_leads`): one of them is mislabelled and nothing
  says which, so keeping either would put a wrong signal in that lead's slot.
  """
  if signal.ndim != 2 or signal.shape[0] != len(names):
    raise RecordError(path, BAD_HEADER, f"{len(names)} lead names for a signal of shape {signal.shape}")
  lead_map = lead_map or {}
  keep, canonical, dropped = [], [], []
  for i, name in enumerate(names):
    c = lead_map.get(str(name).strip().lower()) or leads_lib.canonical_name(name)
    if c is not None and c in canonical:
      same = [str(n) for n in names
              if (lead_map.get(str(n).strip().lower()) or leads_lib.canonical_name(n)) == c]
      raise RecordError(path, DUPLICATE_LEADS, f"lead {c} appears {len(same)} times (signals named {same})")
    if c is None:
      dropped.append(str(name))
    else:
      keep.append(i)
      canonical.append(c)
  if not keep:
    hint = "" if lead_map else " (name them with --lead_map FILE_NAME=LEAD, e.g. ECG=I)"
    raise RecordError(path, UNKNOWN_LEADS, f"no standard lead among {list(map(str, names))}{hint}")
  return signal[keep], tuple(canonical), tuple(dropped)


def parse_age(value: Any) -> float | None:
  """Age in years, or None for blanks, `NaN`, `Unknown`; `89+`-style caps keep their number."""
  if value is None:
    return None
  if isinstance(value, (int, float, np.integer, np.floating)):
    v = float(value)
  else:
    text = str(value).strip().strip("<>+").strip()
    try:
      v = float(text)
    except ValueError:
      return None
  return None if math.isnan(v) or v < 0 else v


def parse_sex(value: Any) -> str | None:
  """`M` / `F` from the spellings in the wild (`Male`, `female`, `M`, 0/1 is ambiguous and not accepted)."""
  text = str(value).strip().lower() if value is not None else ""
  if text in ("m", "male", "man"):
    return "M"
  if text in ("f", "female", "woman"):
    return "F"
  return None


def validate(record: Record, checks: Checks | None = None, **overrides: Any) -> Record:
  """The checks that do not depend on the file format; returns the record with flat leads removed.

  A flat (constant) lead carries no signal and is almost always a disconnected electrode, so it is marked absent
  (listed in `metadata['flat_leads']`) rather than fed as a zero line; if every lead is flat the record is refused.
  Raises `RecordError` with one of the stable reasons in `REASONS`.
  """
  checks = dataclasses.replace(checks or Checks(), **overrides)
  path = record.path or record.record_id
  x = record.signal
  if x.ndim != 2 or x.shape[0] != len(record.leads):
    raise RecordError(path, BAD_HEADER, f"signal shape {x.shape} for {len(record.leads)} leads")
  if not record.leads:
    raise RecordError(path, UNKNOWN_LEADS, "no standard lead")
  bad_names = [n for n in record.leads if n not in leads_lib.LEAD_ID]
  if bad_names:
    raise RecordError(path, UNKNOWN_LEADS, f"non-canonical lead names {bad_names}")
  if not np.isfinite(record.fs) or record.fs < checks.min_fs:
    raise RecordError(path, UNSUPPORTED_FS, f"{record.fs} Hz < {checks.min_fs} Hz")
  if x.shape[1] == 0 or record.seconds < checks.min_seconds:
    raise RecordError(path, TOO_SHORT, f"{record.seconds:.3f} s < {checks.min_seconds} s")
  finite = np.isfinite(x)
  if not finite.all():
    if not checks.allow_non_finite or np.isinf(x).any():
      raise RecordError(path, NON_FINITE, f"{int((~finite).sum())} non-finite samples")
  all_missing = ~finite.any(axis=1)
  with np.errstate(invalid="ignore"):
    peak_to_peak = np.where(finite, x, -np.inf).max(axis=1) - np.where(finite, x, np.inf).min(axis=1)
  flat = all_missing | (peak_to_peak <= checks.flat_tolerance)
  if flat.all():
    raise RecordError(path, FLAT_RECORD, f"all {len(record.leads)} leads are constant")
  if not flat.any():
    return record
  flat_names = [n for n, f in zip(record.leads, flat) if f]
  metadata = dict(record.metadata)
  metadata["flat_leads"] = list(metadata.get("flat_leads", [])) + flat_names
  return dataclasses.replace(record, signal=np.ascontiguousarray(x[~flat]),
                             leads=tuple(n for n, f in zip(record.leads, flat) if not f), metadata=metadata)
