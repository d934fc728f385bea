"""LUDB (Lobachevsky University ECG database, Kalyakulina et al. 2020): 200 WFDB records + ludb.csv.

Labels, from ludb.csv through `data_pipelines.labels.ludb`: atrial fibrillation or flutter, sinus rhythm, left
ventricular hypertrophy, and the electric axis as two columns (normal, left deviation; both 0 for any other axis).
All records go to one `train` split by default: 200 records call for cross-validation, not a fixed hold-out
(`splits=train=0.8,test=0.2` gives a patient-hash split instead; LUDB has one record per patient).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import builder_base
from data_pipelines.labels import ludb as ludb_labels
from data_pipelines.readers import read_wfdb
from data_pipelines.record import Record, RecordError

LABEL_NAMES = ("af_or_flutter", "sinus_rhythm", "lvh", "axis_normal", "axis_left_deviation")


def label_vector(labels: ludb_labels.LudbLabels) -> np.ndarray:
  axis = ludb_labels.axis_left_vs_normal(labels)
  return np.asarray([ludb_labels.af_or_flutter(labels), ludb_labels.sinus_rhythm(labels), ludb_labels.lvh(labels),
                     axis == 0, axis == 1], np.float32)


class Builder(builder_base.StmemBuilder):
  """LUDB 12-lead ECGs with rhythm, hypertrophy and axis labels."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download LUDB (https://physionet.org/content/ludb/) and pass the folder holding ludb.csv and the records "
    "(any depth) as --manual_dir.")
  OPTIONS = {
    "splits": "patient-hashed split fractions, e.g. train=0.8,validation=0.1,test=0.1 (default all in train)",
  }
  label_names = LABEL_NAMES

  def __init__(self, *, splits: str | None = "train=1", **kwargs: Any):
    self.fractions = builder_base.parse_fractions(splits)
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual(dl_manager)
    csv_files = builder_base.rglob(root, "ludb.csv")
    if not csv_files:
      raise FileNotFoundError(f"no ludb.csv under {root}")
    table = ludb_labels.load_ludb(csv_files[0])
    headers = sorted(builder_base.rglob(root, "*.hea"), key=lambda h: (len(h), h))
    chosen: dict[str, list[str]] = {name: [] for name in self.fractions}
    for h in headers:
      chosen[builder_base.hash_split(builder_base.epath.Path(h).stem, self.fractions)].append(h)

    def describe(record: Record) -> dict[str, Any]:
      row = table.get(record.record_id)
      if row is None:
        raise RecordError(record.path, "no_labels", f"record {record.record_id} is not in {os.path.basename(csv_files[0])}")
      return {"labels": label_vector(row), "age": row.age, "sex": row.sex, "source": "ludb"}

    return {name: self.generate(builder_base.read_each(paths, lambda p: read_wfdb(p, source="ludb", lead_map=self.lead_map)), name, describe,
                                total=len(paths))
            for name, paths in builder_base.non_empty(chosen).items()}
