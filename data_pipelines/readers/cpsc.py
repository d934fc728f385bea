"""CPSC2018 original MATLAB files: a struct `ECG` with `sex`, `age` and `data` (12, T) in mV at 500 Hz, no header.

The lead order is not written in the file; the challenge documents it as the standard order I, II, III, aVR, aVL,
aVF, V1-V6, and that is the one place this project trusts a position.
"""
from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.io

from data_pipelines import leads as leads_lib
from data_pipelines.readers import common
from data_pipelines.record import Record, RecordError

CPSC_FS = 500.0
CPSC_LEADS = leads_lib.LEADS  # as documented by the challenge


def read_cpsc_mat(path: str | os.PathLike[str], source: str = "CPSC2018", checks: common.Checks | None = None,
                  lead_map: Mapping[str, str] | None = None, **overrides: Any) -> Record:
  """One CPSC2018 `.mat` record in mV, validated. Raises `RecordError` naming the file."""
  path = os.fspath(path)
  try:
    # From memory, not the file: scipy reads each element with file.read(claimed size), and a file object allocates
    # the whole claim up front (a damaged tag claiming gigabytes would); an in-memory stream returns what there is.
    with open(path, "rb") as f:
      stream = io.BytesIO(f.read())
    mat = scipy.io.loadmat(stream, squeeze_me=True, struct_as_record=False)
  except Exception as e:
    raise RecordError(path, common.UNREADABLE, f"{type(e).__name__}: {e}") from None
  ecg = mat.get("ECG")
  if ecg is None or not hasattr(ecg, "data"):
    raise RecordError(path, common.BAD_HEADER, f"no ECG struct with a data field (keys: {sorted(mat)})")
  data = np.asarray(ecg.data)
  if data.ndim != 2 or data.shape[0] != len(CPSC_LEADS) or not np.issubdtype(data.dtype, np.number):
    raise RecordError(path, common.BAD_HEADER, f"ECG.data has shape {data.shape} / dtype {data.dtype}, "
                                              f"expected ({len(CPSC_LEADS)}, T) numbers")
  selected, lead_names, dropped = common.select_standard_leads(data.astype(np.float64), CPSC_LEADS, path, lead_map)
  meta = {"age": common.parse_age(getattr(ecg, "age", None)), "sex": common.parse_sex(getattr(ecg, "sex", None)),
          "units": "mV"}
  record_id = pathlib.Path(path).stem
  record = Record(signal=selected.astype(np.float32), fs=CPSC_FS, leads=lead_names, record_id=record_id,
                  patient_id=record_id, source=source, path=path, dropped_leads=dropped, metadata=meta)
  return common.validate(record, checks, **overrides)
