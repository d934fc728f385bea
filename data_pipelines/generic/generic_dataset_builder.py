"""Your own ECGs: a folder of WFDB records, or one numpy array with a metadata CSV ("my data is a big array").

Choose with keyword arguments (`stmem prepare generic --manual_dir DIR ...`, paths relative to DIR or absolute):
  WFDB:  `wfdb_dir` (default: DIR itself); `.mat` files there with no `.hea` beside them are read as CPSC2018's
         original MATLAB structs (12 leads at 500 Hz in mV, as downloaded from the challenge); labels from `# Dx:`
         header codes when `codes=CODE,CODE` is given, or from
         a CSV (`labels_csv`, see `labels_csv.py`: `record,label` pairs like CinC 2017's REFERENCE.csv, or a table
         with `id_column` and `label_columns`), else no labels (zero-length vectors, fine for pretraining).
  numpy: `array` (.npy, (N, leads, T) or (N, T, leads) as `layout` NLT/NTL), `metadata_csv` (one row per ECG with
         record_id and optionally patient_id, age, sex and label columns), `source_fs` (the array's sampling rate;
         `--fs` is the prepared data's), `leads` (names of the lead axis in
         order, or a named set like `12`), `units_scale` (stored units -> mV), `label_columns` (comma-separated;
         default every column besides record_id / patient_id / age / sex).
`source` names the data in every example (default "generic"); `splits` as `train=0.8,validation=0.1,test=0.1`
hash-splits by patient id (default: everything in `train`).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import builder_base, tables
from data_pipelines.generic import labels_csv as labels_csv_lib
from data_pipelines.labels import snomed
from data_pipelines.readers import iter_numpy, read_cpsc_mat, read_wfdb
from data_pipelines.readers.numpy_reader import _KNOWN_COLUMNS
from data_pipelines.record import Record


def _split_list(value: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
  if value is None:
    return None
  return [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]


class Builder(builder_base.StmemBuilder):
  """ECGs from a WFDB folder or a numpy array + metadata CSV."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder holding your records (or array and CSV) as --manual_dir."
  OPTIONS = {
    "wfdb_dir": "WFDB: folder of .hea records (and CPSC2018 .mat files), searched recursively (default: --manual_dir)",
    "codes": "WFDB: SNOMED codes (CODE,CODE) read from `# Dx:` header lines as multi-hot labels",
    "labels_csv": "WFDB: labels from a CSV: `record,label` rows (CinC 2017 REFERENCE.csv) or a table with a header",
    "id_column": "labels_csv: the column holding record names (default: `record_id`, `record` or the first column)",
    "label_columns": "labels_csv / metadata_csv: comma-separated label columns (default: every other column)",
    "array": "numpy: the .npy file of ECGs, (N, leads, T) or (N, T, leads)",
    "metadata_csv": "numpy: one row per ECG: record_id, optional patient_id, age, sex and label columns",
    "source_fs": "numpy: the array's sampling rate in Hz",
    "leads": "numpy: names of the lead axis in order (I,II,V1 ...) or a named set such as 12",
    "layout": "numpy: NLT = (N, leads, T), NTL = (N, T, leads)",
    "units_scale": "numpy: multiplier from the stored units to mV (e.g. 0.001 for microvolts)",
    "source": "the name every example carries, e.g. cinc2017",
    "splits": "patient-hashed split fractions, e.g. train=0.8,validation=0.1,test=0.1",
  }

  def __init__(self, *, wfdb_dir: str | None = None, array: str | None = None, metadata_csv: str | None = None,
               source_fs: float | str | None = None, leads: str | None = "12", layout: str = "NLT",
               units_scale: float | str = 1.0, label_columns: str | None = None, codes: str | None = None,
               labels_csv: str | None = None, id_column: str | None = None, source: str = "generic",
               splits: str | None = "train=1", **kwargs: Any):
    manual = kwargs.get("manual_dir")
    self.source = source
    self.fractions = builder_base.parse_fractions(splits)
    self.mode = "numpy" if array is not None else "wfdb"
    if self.mode == "numpy" and (labels_csv or id_column):
      raise ValueError("labels_csv= / id_column= are for WFDB folders; numpy data takes its labels from "
                       "metadata_csv= (label_columns=)")
    if self.mode == "numpy":
      if metadata_csv is None or source_fs is None:
        raise ValueError("generic numpy data needs array=, metadata_csv= and source_fs= (the array's rate in Hz)")
      self.array, self.metadata_csv = self._path(manual, array), self._path(manual, metadata_csv)
      self.fs, self.leads, self.layout, self.units_scale = float(source_fs), leads, layout, float(units_scale)
      columns = _split_list(label_columns)
      if columns is None:
        columns = [c for c in tables.read_dicts(self.metadata_csv)[0] if c not in _KNOWN_COLUMNS]
      self.label_columns = columns
      self.label_names = tuple(columns)
    else:
      self.wfdb_dir = wfdb_dir
      self.table = None
      if labels_csv:
        if codes:
          raise ValueError("give labels_csv= or codes=, not both")
        self.table = labels_csv_lib.load(self._path(manual, labels_csv), id_column=id_column,
                                         label_columns=_split_list(label_columns))
        self.label_names, self.label_kind = self.table.names, self.table.kind
      elif label_columns is not None or id_column is not None:
        raise ValueError("label_columns= / id_column= need labels_csv= (the CSV they name columns of)")
      else:
        self.label_names = tuple(snomed.parse_dx(codes)) if codes else ()
    super().__init__(**kwargs)

  @staticmethod
  def _path(manual: Any, value: str) -> str:
    if os.path.isabs(value) or manual is None:
      return value
    return os.path.join(os.fspath(manual), value)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual(dl_manager)
    if self.mode == "numpy":
      return {name: self._numpy(name) for name in self.fractions}
    folder = builder_base.epath.Path(self._path(root, self.wfdb_dir) if self.wfdb_dir else root)
    headers = builder_base.rglob(folder, "*.hea")
    # A WFDB record's signal may be a .mat (CinC); a .mat with no header of its own is a CPSC2018 original file.
    headed = {os.path.splitext(h)[0] for h in headers}
    records = sorted(headers + [m for m in builder_base.rglob(folder, "*.mat") if os.path.splitext(m)[0] not in headed])
    if self.table is not None:
      found = {labels_csv_lib.record_key(r) for r in records}
      unused = sorted(set(self.table.rows) - found)
      if unused:
        self.stats.notes.append(f"{len(unused)} row(s) of {os.path.basename(self.table.path)} name no record in the "
                                f"folder (e.g. {', '.join(unused[:3])})")
    chosen: dict[str, list[str]] = {name: [] for name in self.fractions}
    for r in records:
      chosen[builder_base.hash_split(builder_base.epath.Path(r).stem, self.fractions)].append(r)

    def describe(record: Record) -> dict[str, Any]:
      labels = (self.table.vector(record.record_id, record.path) if self.table is not None else
                snomed.multi_hot(record.metadata.get("dx", []), self.label_names))
      return {"labels": labels, "age": record.metadata.get("age"), "sex": record.metadata.get("sex"),
              "source": self.source}

    def read(path: str) -> Record:
      reader = read_cpsc_mat if path.endswith(".mat") else read_wfdb
      return reader(path, source=self.source, lead_map=self.lead_map)

    return {name: self.generate(builder_base.read_each(paths, read), name, describe, total=len(paths))
            for name, paths in builder_base.non_empty(chosen).items()}

  def _numpy(self, split: str):
    single = len(self.fractions) == 1

    def items():
      for item in iter_numpy(self.array, self.metadata_csv, fs=self.fs, leads=self.leads, layout=self.layout,
                             units_scale=self.units_scale, label_columns=self.label_columns, source=self.source,
                             lead_map=self.lead_map):
        key = item.patient_id if isinstance(item, Record) else getattr(item, "record_id", item.path)
        if single or builder_base.hash_split(str(key or ""), self.fractions) == split:
          yield item

    def describe(record: Record) -> dict[str, Any]:
      found = record.metadata.get("labels", {})
      values = np.asarray([found.get(c, np.nan) for c in self.label_columns], np.float32)
      return {"labels": np.nan_to_num(values, nan=0.0), "age": record.metadata.get("age"),
              "sex": record.metadata.get("sex"), "source": self.source}

    return self.generate(items(), split, describe)
