"""CODE-15% (Ribeiro et al.): `exams_part{i}.hdf5` tracings at 400 Hz + `exams.csv` labels and patient ids.

Labels: the six CODE abnormalities (1dAVb, RBBB, LBBB, SB, AF, ST). Exams shorter than one stored window
(`contract.record_samples / contract.fs`, 10 s by default) are quarantined as `too_short`: CODE-15 holds 7-10 s
exams, so pass a shorter `--record_seconds` to keep them. `units_scale` is the reader's multiplier from stored
units to mV (see `data_pipelines.readers.code15` on the dataset's ambiguous unit).
All exams go to `train` by default (CODE-15 is a pretraining set); `splits=...` gives a patient-hash split, which
reads the HDF5 files once per split.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import builder_base
from data_pipelines.readers import iter_code15
from data_pipelines.readers.code15 import CODE15_LABELS
from data_pipelines.record import Record, RecordError


class Builder(builder_base.StmemBuilder):
  """CODE-15% 12-lead exams with the six CODE abnormality labels."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download CODE-15% (https://zenodo.org/records/4916206), unzip the exams_part*.hdf5 files beside exams.csv, "
    "and pass that folder as --manual_dir.")
  OPTIONS = {
    "splits": "patient-hashed split fractions, e.g. train=0.8,validation=0.1,test=0.1 (default all in train)",
    "units_scale": "multiplier from the stored tracing units to mV",
    "exams_csv": "the exams table (default: exams.csv in --manual_dir)",
  }
  label_names = CODE15_LABELS

  def __init__(self, *, splits: str | None = "train=1", units_scale: float | str = 1.0,
               exams_csv: str | None = None, **kwargs: Any):
    self.fractions = builder_base.parse_fractions(splits)
    self.units_scale = float(units_scale)
    self.exams_csv = exams_csv
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual(dl_manager)
    return {name: self._generate(root, name) for name in self.fractions}

  def _generate(self, root: builder_base.epath.Path, split: str):
    single = len(self.fractions) == 1

    def items():
      for item in iter_code15(root, exams_csv=self.exams_csv, units_scale=self.units_scale,
                              lead_map=self.lead_map):
        key = item.patient_id if isinstance(item, Record) else getattr(item, "record_id", item.path)
        if single or builder_base.hash_split(str(key or ""), self.fractions) == split:
          yield item

    def describe(record: Record) -> dict[str, Any]:
      if not record.metadata.get("in_exams_csv", True):
        raise RecordError(record.path, "no_labels", f"exam {record.record_id} is not in exams.csv")
      found = record.metadata.get("labels", {})
      return {"labels": np.asarray([found.get(n, 0.0) for n in CODE15_LABELS], np.float32),
              "age": record.metadata.get("age"), "sex": record.metadata.get("sex"), "source": "code15"}

    return self.generate(items(), split, describe)
