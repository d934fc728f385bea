"""Labels for a folder of records from a CSV: `record,label` pairs (CinC 2017's REFERENCE.csv) or a table.

Two shapes are read, told apart by the first row:
  pairs:  no header; the first cell is the record name, the others its class names (`A00001,N`; several cells mean
          several labels). The class names, sorted, become the label list (labels.json keeps them).
  table:  a header row (told by `id_column` / `label_columns` being given, or by a first cell such as `record_id`,
          `record`, `id`, `filename`); the id column is `id_column` (default the first of those names, else the
          first column), the labels are `label_columns` (default every other column). One column of words is a
          class column (one class per record); numeric columns are one label each, their values taken as given.
A record name matches the record's file name without extension (`A00001.mat` and `A00001` are the same record).
Records the CSV does not name are quarantined (`no_label`), never written with an all-zero label vector.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipelines import tables
from data_pipelines.errors import DataError, UsageError
from data_pipelines.readers.common import NO_LABEL
from data_pipelines.record import RecordError

ID_COLUMNS = ("record_id", "record", "id", "filename", "file", "name", "recording")


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """Label vectors by record name. `kind` is "multiclass" (exactly one class per record) or "multilabel"."""
  path: str
  names: tuple[str, ...]
  kind: str
  rows: Mapping[str, np.ndarray]

  def vector(self, record_id: str, where: str = "") -> np.ndarray:
    """The labels of one record; RecordError `no_label` naming the CSV when it has no row for it."""
    v = self.rows.get(record_key(record_id))
    if v is None:
      raise RecordError(where or record_id, NO_LABEL, f"record {record_id!r} has no row in {self.path}")
    return v


def record_key(name: str) -> str:
  """The name a CSV row and a record file are matched by: the file name without a signal/header extension."""
  base = os.path.basename(str(name).strip())
  stem, ext = os.path.splitext(base)
  return stem if ext.lower() in (".hea", ".mat", ".dat", ".csv", ".npy", ".edf") else base


def _number(text: str) -> float | None:
  t = text.strip().lower()
  if t in ("true", "yes"):
    return 1.0
  if t in ("false", "no"):
    return 0.0
  try:
    return float(t)
  except ValueError:
    return None


def load(path: str | os.PathLike[str], id_column: str | None = None,
         label_columns: Sequence[str] | None = None) -> LabelTable:
  """Read a labels CSV (module docstring); a UsageError (bad option) or DataError (bad file) naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UsageError(f"--labels_csv {path}: no such file")
  rows = [[c.strip() for c in r] for r in tables.read_rows(path) if any(c.strip() for c in r)]
  if not rows:
    raise DataError(f"--labels_csv {path}: the file is empty")
  first = [c.lower() for c in rows[0]]
  header = id_column is not None or label_columns is not None or first[0] in ID_COLUMNS
  if not header:
    return _classes(path, [(r[0], [c for c in r[1:] if c]) for r in rows])
  columns = rows[0]
  if id_column is None:
    id_column = next((c for c in columns if c.lower() in ID_COLUMNS), columns[0])
  missing = [c for c in [id_column, *(label_columns or ())] if c not in columns]
  if missing:
    raise UsageError(f"--labels_csv {path}: no column(s) {missing}; its columns are {columns}")
  wanted = list(label_columns) if label_columns else [c for c in columns if c != id_column]
  if not wanted:
    raise DataError(f"--labels_csv {path}: no label column beside {id_column!r}")
  at = {c: columns.index(c) for c in columns}
  body = [r + [""] * (len(columns) - len(r)) for r in rows[1:]]
  numeric = all(_number(r[at[c]]) is not None for r in body for c in wanted if r[at[c]])
  if len(wanted) == 1 and not numeric:
    return _classes(path, [(r[at[id_column]], [r[at[wanted[0]]]] if r[at[wanted[0]]] else []) for r in body])
  if not numeric:
    raise DataError(f"--labels_csv {path}: columns {wanted} mix words and numbers; name one class column or "
                     f"numeric columns with --label_columns")
  out: dict[str, np.ndarray] = {}
  for r in body:
    _put(out, path, r[at[id_column]],
         np.asarray([_number(r[at[c]]) if r[at[c]] else 0.0 for c in wanted], np.float32))
  return LabelTable(path, tuple(wanted), "multilabel", out)


def _put(out: dict[str, np.ndarray], path: str, record: str, vector: np.ndarray) -> None:
  key = record_key(record)
  if key in out:
    raise DataError(f"--labels_csv {path}: record {record!r} has two rows; keep one")
  out[key] = vector


def _classes(path: str, pairs: Sequence[tuple[str, list[str]]]) -> LabelTable:
  names = tuple(sorted({c for _, cs in pairs for c in cs}))
  if not names:
    raise DataError(f"--labels_csv {path}: no labels found (expected rows like `A00001,N`)")
  index = {n: i for i, n in enumerate(names)}
  out: dict[str, np.ndarray] = {}
  for record, cs in pairs:
    if not cs:
      continue  # a record listed without a label has no label: quarantined as `no_label` when met
    v = np.zeros(len(names), np.float32)
    v[[index[c] for c in cs]] = 1.0
    _put(out, path, record, v)
  kind = "multiclass" if all(len(cs) == 1 for _, cs in pairs if cs) else "multilabel"
  return LabelTable(path, names, kind, out)
