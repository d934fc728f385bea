"""PTB-XL (Wagner et al. 2020) from its PhysioNet download: WFDB records + ptbxl_database.csv + scp_statements.csv.

Splits are the official ones (strat_fold 1-8 train, 9 validation, 10 test), so results compare with the benchmark.
Labels are one benchmark task's multi-hot vector (`task`, default superdiagnostic: NORM, MI, STTC, CD, HYP).
The 500 Hz records are read by default: the CinC 2021 copies of PTB-XL are the 500 Hz files, and only the same
samples give the same content hash in an overlap check.
"""
from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from data_pipelines import builder_base
from data_pipelines.labels import ptbxl as ptbxl_labels
from data_pipelines.readers import read_wfdb

SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


class Builder(builder_base.StmemBuilder):
  """PTB-XL 12-lead ECGs with a benchmark task's labels and the official folds."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download PTB-XL (https://physionet.org/content/ptb-xl/) and pass the folder holding ptbxl_database.csv, "
    "scp_statements.csv and records100/ records500/ as --manual_dir.")
  OPTIONS = {
    "task": "label task: superdiagnostic (NORM, MI, STTC, CD, HYP) or another of labels/ptbxl.py's TASKS",
    "sampling_rate": "which PTB-XL release to read: 500 or 100 (Hz)",
  }

  def __init__(self, *, task: str = "superdiagnostic", sampling_rate: int | str = 500, **kwargs: Any):
    if task not in ptbxl_labels.TASKS:
      raise ValueError(f"unknown PTB-XL task {task!r}; tasks are {ptbxl_labels.TASKS}")
    self.task, self.sampling_rate = task, int(sampling_rate)
    if self.sampling_rate not in (100, 500):
      raise ValueError(f"PTB-XL comes at 100 or 500 Hz, not {sampling_rate}")
    manual = kwargs.get("manual_dir")
    if manual is None:
      raise ValueError("ptbxl: pass manual_dir= (the label list is read from its scp_statements.csv)")
    self.statements = ptbxl_labels.load_statements(builder_base.epath.Path(manual) / "scp_statements.csv")
    self.label_names = tuple(ptbxl_labels.task_classes(self.statements, task))
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual(dl_manager)
    rows = ptbxl_labels.load_database(root / "ptbxl_database.csv")
    by_split: dict[str, list[ptbxl_labels.PtbxlRow]] = {name: [] for name in SPLIT_NAMES.values()}
    for row in rows.values():
      by_split[SPLIT_NAMES[row.split]].append(row)
    return {name: self._generate(root, split_rows, name) for name, split_rows in builder_base.non_empty(by_split).items()}

  def _generate(self, root: builder_base.epath.Path, rows: list[ptbxl_labels.PtbxlRow], split: str):
    by_path = {}
    paths = []
    for row in sorted(rows, key=lambda r: r.ecg_id):
      rel = row.filename_hr if self.sampling_rate == 500 else row.filename_lr
      path = str(root / rel)
      by_path[path + ".hea"] = row
      paths.append(path)

    def describe(record):
      row = by_path[record.path]
      return {"labels": ptbxl_labels.multi_hot(ptbxl_labels.task_labels(row.scp_codes, self.statements, self.task),
                                               self.label_names),
              "patient_id": row.patient_id, "age": row.age, "sex": row.sex, "source": "ptb-xl"}

    items = builder_base.read_each(paths, lambda p: read_wfdb(p, source="ptb-xl", lead_map=self.lead_map))
    return self.generate(items, split, describe, total=len(paths))
