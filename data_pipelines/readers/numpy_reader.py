"""One big `.npy` array of ECGs plus a CSV with one row per ECG: the "my data is a numpy array" case.

The array is memory-mapped, so a file larger than memory streams record by record. Row i of the CSV describes
ECG i of the array; lead names come from the caller, because an array cannot carry them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import leads as leads_lib
from data_pipelines import tables
from data_pipelines.readers import common
from data_pipelines.record import Record, RecordError

_KNOWN_COLUMNS = ("record_id", "patient_id", "age", "sex")


def _lead_names(leads: str | Sequence[str]) -> list[str]:
  if isinstance(leads, str):
    if leads in leads_lib.LEAD_SETS:
      return list(leads_lib.LEAD_SETS[leads])
    return [p for p in leads.replace(",", "+").split("+") if p.strip()]
  return list(leads)


def _label_value(text: str) -> float:
  text = str(text).strip()
  if text.lower() in ("true", "yes"):
    return 1.0
  if text.lower() in ("false", "no"):
    return 0.0
  try:
    return float(text)
  except ValueError:
    return float("nan")


def iter_numpy(array_path: str | os.PathLike[str], metadata_csv: str | os.PathLike[str], fs: float,
               leads: str | Sequence[str], layout: str = "NLT", units_scale: float = 1.0,
               label_columns: Sequence[str] | None = None, source: str = "", checks: common.Checks | None = None,
               lead_map: Mapping[str, str] | None = None, **overrides: Any) -> Iterator[Record | RecordError]:
  """Each ECG of a `.npy` array (`layout` "NLT" = (N, leads, T) or "NTL" = (N, T, leads)) as a validated `Record`.

  `leads` names the array's lead axis in order (any accepted spelling or a named set); names that are not standard
  leads are dropped and recorded. `units_scale` multiplies stored values into mV. CSV columns other than
  record_id / patient_id / age / sex (or just `label_columns`) become `metadata['labels']` as floats.
  Raises `RecordError` up front when the array and CSV do not fit together.
  """
  array_path = os.fspath(array_path)
  if layout not in ("NLT", "NTL"):
    raise ValueError(f"layout must be 'NLT' or 'NTL', not {layout!r}")
  try:
    array = np.load(array_path, mmap_mode="r", allow_pickle=False)
  except Exception as e:
    raise RecordError(array_path, common.UNREADABLE, f"{type(e).__name__}: {e}") from None
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
          or np.issubdtype(array.dtype, np.bool_)):
    raise RecordError(array_path, common.BAD_HEADER, f"array dtype {array.dtype} is not real numbers")
  names = _lead_names(leads)
  lead_axis = 1 if layout == "NLT" else 2
  if array.ndim != 3 or array.shape[lead_axis] != len(names):
    raise RecordError(array_path, common.BAD_HEADER,
                      f"array shape {array.shape} ({layout}) does not fit {len(names)} lead names {names}")
  columns, rows = tables.read_dicts(metadata_csv)
  if "record_id" not in columns:
    raise RecordError(os.fspath(metadata_csv), common.BAD_HEADER, f"no record_id column (columns: {columns})")
  if len(rows) != array.shape[0]:
    raise RecordError(os.fspath(metadata_csv), common.BAD_HEADER,
                      f"{len(rows)} CSV rows for {array.shape[0]} ECGs in {array_path}")
  labels = list(label_columns) if label_columns is not None else [c for c in columns if c not in _KNOWN_COLUMNS]
  for i, row in enumerate(rows):
    record_id = str(row["record_id"]).strip()
    path = f"{array_path}[{i}]"
    try:
      x = np.asarray(array[i], dtype=np.float64)
      if layout == "NTL":
        x = x.T
      selected, lead_names, dropped = common.select_standard_leads(x * units_scale, names, path, lead_map)
      meta = {"age": common.parse_age(row.get("age")), "sex": common.parse_sex(row.get("sex")), "units": "mV",
              "labels": {c: _label_value(row.get(c, "")) for c in labels}}
      patient = str(row.get("patient_id") or "").strip() or record_id
      record = Record(signal=selected.astype(np.float32), fs=float(fs), leads=lead_names, record_id=record_id,
                      patient_id=patient, source=source, path=path, dropped_leads=dropped, metadata=meta)
      yield common.validate(record, checks, **overrides)
    except RecordError as err:
      err.record_id = record_id
      yield err
