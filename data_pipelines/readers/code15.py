"""CODE-15%: `exams_part{i}.hdf5` (`tracings` (N, 4096, 12) at 400 Hz, `exam_id` (N,)) and `exams.csv`.

Tracings are zero-padded at both ends to 4096 samples; the padding (leading and trailing samples where all twelve
leads are exactly zero) is stripped, so 7.3 s exams come out 7.3 s long and `validate(min_seconds=...)` decides.

Amplitude unit, unresolved by the dataset's own documentation: the authors' README says the signals are "at the
scale 1e-4V" (one stored unit = 0.1 mV) and, in the same sentence, that a signal in V is multiplied by 1000 to match
(one stored unit = 1 mV). `units_scale` is the multiplier from stored units to mV: the default 1.0 reads stored
values as mV; pass 0.1 for the 1e-4 V reading. Per-ECG z-scoring makes the model indifferent to this factor, but
anything amplitude-based (thresholds, plots) is not.
"""
from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from data_pipelines import tables
from data_pipelines.readers import common
from data_pipelines.record import Record, RecordError

CODE15_FS = 400.0
CODE15_LEADS = ("DI", "DII", "DIII", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
CODE15_LABELS = ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")
_PART = re.compile(r"exams_part(\d+)\.hdf5$")
_CHUNK = 256  # exams read from HDF5 at once: bounded memory, few reads
_BLOCK_BYTES = 32 << 20  # ... and at most this many bytes of them
_MAX_SAMPLES = 1 << 16   # per exam (CODE-15 stores 4096); longer tracings are not this dataset's
_MAX_COMPRESSION = 1100  # deflate expands at most ~1032-fold: a dataset claiming more than that is not believed


def _real(dtype: np.dtype) -> bool:
  return bool(np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.bool_))


def _layout_problem(f: h5py.File, part: pathlib.Path) -> str | None:
  """Why a part file's datasets are not CODE-15's (None when they are): names, kinds, shapes, dtypes, and sizes its
  bytes can hold. Why the sizes: an HDF5 dataset's shape is a claim; chunks never written cost nothing on disk, so
  a tiny file can claim 10^12 exams that reading would allocate or loop over."""
  tracings, exam_ids = f.get("tracings"), f.get("exam_id")
  if not isinstance(tracings, h5py.Dataset) or not isinstance(exam_ids, h5py.Dataset):
    return f"entries {sorted(f)}; need datasets tracings and exam_id"
  if tracings.ndim != 3 or tracings.shape[2] != len(CODE15_LEADS) or exam_ids.shape != (tracings.shape[0],):
    return f"tracings {tracings.shape} and exam_id {exam_ids.shape} do not match (N, T, 12) / (N,)"
  if not _real(tracings.dtype) or not _real(exam_ids.dtype):
    return f"tracings of {tracings.dtype} and exam_id of {exam_ids.dtype}; need real numbers"
  if tracings.shape[1] > _MAX_SAMPLES:
    return f"tracings of {tracings.shape[1]} samples per exam; CODE-15 stores 4096"
  size = os.path.getsize(part)
  for name, ds in (("tracings", tracings), ("exam_id", exam_ids)):
    claimed = ds.size * ds.dtype.itemsize
    try:
      stored = ds.id.get_storage_size()
      filtered = ds.id.get_create_plist().get_nfilters() > 0
    except Exception:  # noqa: BLE001 - h5py raises assorted types for damaged metadata
      return f"{name}: its storage cannot be read"
    if stored > size or claimed > stored * (_MAX_COMPRESSION if filtered else 1) + 4096:
      return f"{name} claims {ds.shape} ({claimed} bytes) but {stored} bytes are stored in a {size}-byte file"
  return None


def strip_zero_padding(tracing: np.ndarray) -> np.ndarray:
  """(T, L) -> the span between the first and last sample where any lead is non-zero (empty if none)."""
  active = np.flatnonzero(np.any(tracing != 0, axis=1))
  if active.size == 0:
    return tracing[:0]
  return tracing[active[0]:active[-1] + 1]


def load_exams_csv(path: str | os.PathLike[str]) -> dict[int, dict[str, str]]:
  """exams.csv rows keyed by integer exam_id; DataError naming the file and row when it is not such a table."""
  out = {}
  for i, row in enumerate(tables.read_dicts(path)[1]):
    try:
      out[int(float(row["exam_id"]))] = row
    except tables.ROW_ERRORS as e:
      raise tables.row_error(path, i, e) from None
  return out


def _metadata(row: dict[str, str] | None) -> tuple[str | None, dict[str, Any]]:
  if row is None:
    return None, {"in_exams_csv": False}
  meta: dict[str, Any] = {"in_exams_csv": True, "age": common.parse_age(row.get("age"))}
  is_male = str(row.get("is_male", "")).strip().lower()
  meta["sex"] = {"true": "M", "1": "M", "1.0": "M", "false": "F", "0": "F", "0.0": "F"}.get(is_male)
  labels = {}
  for name in CODE15_LABELS:
    value = str(row.get(name, "")).strip().lower()
    if value in ("true", "1", "1.0"):
      labels[name] = 1.0
    elif value in ("false", "0", "0.0"):
      labels[name] = 0.0
  meta["labels"] = labels
  for key, value in row.items():
    if key not in meta and key not in CODE15_LABELS and key not in ("exam_id", "patient_id", "is_male"):
      meta[key] = value
  patient = str(row.get("patient_id", "")).strip()
  if patient.endswith(".0"):
    patient = patient[:-2]
  return patient or None, meta


def part_files(folder: str | os.PathLike[str]) -> list[pathlib.Path]:
  """`exams_part*.hdf5` in part-number order (part10 after part9)."""
  found = [p for p in pathlib.Path(folder).glob("exams_part*.hdf5") if _PART.search(p.name)]
  return sorted(found, key=lambda p: int(_PART.search(p.name).group(1)))


def iter_code15(folder: str | os.PathLike[str], exams_csv: str | os.PathLike[str] | None = None,
                units_scale: float = 1.0, source: str = "CODE-15", checks: common.Checks | None = None,
                lead_map: Mapping[str, str] | None = None, **overrides: Any) -> Iterator[Record | RecordError]:
  """Every exam of every part file as a validated `Record` (mV after `units_scale`), or the `RecordError` why not.

  Rows with `exam_id` 0 are the release's empty filler slots and are skipped.
  """
  folder = pathlib.Path(folder)
  csv_path = pathlib.Path(exams_csv) if exams_csv is not None else folder / "exams.csv"
  rows = load_exams_csv(csv_path) if csv_path.exists() else {}
  parts = part_files(folder)
  if not parts:
    raise FileNotFoundError(f"no exams_part*.hdf5 under {folder}")
  for part in parts:
    try:
      f = h5py.File(part, "r")
    except Exception as e:
      err = RecordError(str(part), common.UNREADABLE, f"{type(e).__name__}: {e}")
      yield err
      continue
    with f:
      try:
        problem = _layout_problem(f, part)
        tracings, exam_id_data = (None, None) if problem else (f["tracings"], f["exam_id"])
      except Exception as e:  # noqa: BLE001 - h5py raises assorted types for damaged metadata
        yield RecordError(str(part), common.UNREADABLE, f"{type(e).__name__}: {e}")
        continue
      if problem:
        yield RecordError(str(part), common.BAD_HEADER, problem)
        continue
      exam_bytes = max(1, tracings.shape[1] * tracings.shape[2] * tracings.dtype.itemsize)
      per_block = max(1, min(_CHUNK, _BLOCK_BYTES // exam_bytes))
      for start in range(0, tracings.shape[0], per_block):
        try:
          block = np.asarray(tracings[start:start + per_block])
          exam_ids = np.asarray(exam_id_data[start:start + per_block])
        except Exception as e:
          yield RecordError(f"{part}[{start}:{start + per_block}]", common.UNREADABLE, f"{type(e).__name__}: {e}")
          continue
        for offset, tracing in enumerate(block):
          path = f"{part}[{start + offset}]"
          if not np.isfinite(exam_ids[offset]):
            yield RecordError(path, common.BAD_HEADER, f"exam_id {exam_ids[offset]}")
            continue
          exam_id = int(exam_ids[offset])
          if exam_id == 0:
            continue
          patient, meta = _metadata(rows.get(exam_id))
          meta["units"] = "mV"
          meta["units_scale"] = units_scale
          span = strip_zero_padding(tracing).T.astype(np.float64) * units_scale
          try:
            if span.shape[1] == 0:
              raise RecordError(path, common.FLAT_RECORD, "all-zero tracing")
            selected, names, dropped = common.select_standard_leads(span, CODE15_LEADS, path, lead_map)
            record = Record(signal=selected.astype(np.float32), fs=CODE15_FS, leads=names, record_id=str(exam_id),
                            patient_id=patient or str(exam_id), source=source, path=path, dropped_leads=dropped,
                            metadata=meta)
            yield common.validate(record, checks, **overrides)
          except RecordError as err:
            err.record_id = str(exam_id)
            yield err
