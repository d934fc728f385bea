"""One reader per file family, each returning a validated `Record` in mV with canonical lead names."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

from data_pipelines.readers.code15 import iter_code15
from data_pipelines.readers.common import REASONS, Checks, parse_lead_map, select_standard_leads, validate
from data_pipelines.readers.cpsc import read_cpsc_mat
from data_pipelines.readers.numpy_reader import iter_numpy
from data_pipelines.readers.wfdb_reader import read_wfdb
from data_pipelines.record import Record, RecordError

__all__ = ["Checks", "REASONS", "Record", "RecordError", "iter_code15", "iter_numpy", "iter_wfdb_folder",
           "parse_lead_map", "read_cpsc_mat", "read_wfdb", "select_standard_leads", "validate"]


def iter_wfdb_folder(folder: str | os.PathLike[str], source: str = "", checks: Checks | None = None,
                     lead_map: Mapping[str, str] | None = None, **overrides: Any) -> Iterator[Record | RecordError]:
  """Every `.hea` record under `folder` (recursive, sorted by path): a `Record`, or the `RecordError` why not."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder")
  for header in sorted(folder.rglob("*.hea")):
    try:
      yield read_wfdb(header, source=source, checks=checks, lead_map=lead_map, **overrides)
    except RecordError as err:
      err.record_id = header.stem
      yield err
