"""The report of records that were skipped and why: one JSON line per record, counts by reason.

Preparing a dataset never stops on a bad record and never drops one silently: each `RecordError` lands here, and
the summary is printed and stored beside the prepared data.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Any, TextIO

from data_pipelines.record import RecordError


class Quarantine:
  """Appends `{path, record_id, reason, detail}` lines to `path` (None keeps counts only); use as a context manager."""

  def __init__(self, path: str | os.PathLike[str] | None):
    self.path = pathlib.Path(path) if path is not None else None
    self.counts: collections.Counter[str] = collections.Counter()
    self._file: TextIO | None = None
    if self.path is not None:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "w")

  def add(self, error: RecordError, record_id: str | None = None) -> None:
    """Record one skipped record; `record_id` defaults to the error's, else the file's stem."""
    if record_id is None:
      record_id = getattr(error, "record_id", None) or pathlib.Path(error.path).stem
    self.counts[error.reason] += 1
    if self._file is not None:
      line = {"path": error.path, "record_id": str(record_id), "reason": error.reason, "detail": error.detail}
      self._file.write(json.dumps(line) + "\n")
      self._file.flush()

  def __len__(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> dict[str, Any]:
    """{"total": n, "by_reason": {reason: n}} with reasons sorted by count."""
    return {"total": len(self), "by_reason": dict(self.counts.most_common())}

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "Quarantine":
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

