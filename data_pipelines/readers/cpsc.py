"""CPSC2018 original MATLAB files: a struct `ECG` with `sex`, `age` and `data` (12, T) in mV at 500 Hz, no header.

The lead order is not written in the file; the challenge documents it as the standard order I, II, III, aVR, aVL,
aVF, V1-V6, and that is the one place this project trusts a position.
"""
from __future__ import annotations

import io
import os
import pathlib
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.io

from data_pipelines import leads as leads_lib
from data_pipelines.readers import common
from data_pipelines.record import Record, RecordError

CPSC_FS = 500.0
CPSC_LEADS = leads_lib.LEADS  # as documented by the challenge


_MI_INT32, _MI_MATRIX, _MI_COMPRESSED = 5, 14, 15
# MATLAB v5's data types (8, 10 and 11 are reserved): scipy's reader crashes the process on any other.
_MI_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 18})
_MAX_INFLATE = 256 << 20  # a CPSC record is about 1 MB uncompressed


def mat5_problem(raw: bytes) -> str | None:
  """Why a MATLAB v5 file's elements claim more than its bytes hold (None when they do not, or it is not v5).

  Why: scipy allocates what each element's tag claims (bytes, and arrays of the dimensions it states) before it
  finds the data short; a damaged tag claims gigabytes. Every element, nested and compressed ones included, must fit
  its parent, and an array's dimensions must not outnumber its bytes.
  """
  if len(raw) < 128 or 0 in raw[:4] or raw[126:128] not in (b"IM", b"MI"):
    return None  # MATLAB v4 or not MATLAB: scipy's own checks, from memory
  order = "<" if raw[126:128] == b"IM" else ">"
  return _elements(raw, 128, len(raw), order, top=True)


def _elements(buf: bytes, pos: int, end: int, order: str, top: bool = False, depth: int = 0) -> str | None:
  if depth > 32:
    return "elements nested more than 32 deep"
  while pos + 8 <= end:
    kind, size = struct.unpack_from(order + "II", buf, pos)
    if kind & 0xFFFF not in _MI_TYPES:
      return f"an element of unknown type {kind & 0xFFFF} at byte {pos}"
    if kind >> 16:  # a small element: type and size in the first 4 bytes, the data in the next 4
      if kind >> 16 > 4:
        return f"a small element claiming {kind >> 16} bytes at byte {pos}"
      pos += 8
      continue
    if size > end - pos - 8:
      return f"an element at byte {pos} claims {size} bytes where {end - pos - 8} remain"
    body = pos + 8
    if kind == _MI_COMPRESSED:
      inflate = zlib.decompressobj()
      try:
        data = inflate.decompress(buf[body:body + size], _MAX_INFLATE)
      except zlib.error as e:
        return f"a compressed element at byte {pos} does not inflate ({e})"
      if inflate.unconsumed_tail:
        return f"a compressed element at byte {pos} inflates beyond {_MAX_INFLATE} bytes"
      problem = _elements(data, 0, len(data), order, depth=depth + 1)
    elif kind == _MI_MATRIX:
      problem = _matrix(buf, body, body + size, order, depth)
    else:
      problem = None
    if problem:
      return problem
    pos = body + size + (0 if top and kind == _MI_COMPRESSED else -size % 8)
  return None


def _matrix(buf: bytes, pos: int, end: int, order: str, depth: int) -> str | None:
  """A miMATRIX body: flags (8 bytes), dimensions (int32, at least 2), name, data; the dimensions must not claim more
  entries than bytes. (scipy's reader crashes the process on an array whose dimensions are packed as a small
  element: it takes them for none.)"""
  if end == pos:
    return None  # an empty element: an empty array
  if end - pos < 24:
    return f"an array at byte {pos} cut off before its dimensions"
  kind, size = struct.unpack_from(order + "II", buf, pos + 16)
  if kind != _MI_INT32 or size < 8 or size % 4 or size > end - pos - 24:
    return f"an array at byte {pos} without its dimensions (an int32 element of at least 2 values)"
  dims = struct.unpack_from(order + f"{size // 4}i", buf, pos + 24)
  count = 1
  for d in dims:
    if d < 0:
      return f"an array with a negative dimension {d}"
    count *= d
  if count > end - pos:
    return f"an array claiming {count} entries in {end - pos} bytes"
  return _elements(buf, pos, end, order, depth=depth + 1)


def read_cpsc_mat(path: str | os.PathLike[str], source: str = "CPSC2018", checks: common.Checks | None = None,
                  lead_map: Mapping[str, str] | None = None, **overrides: Any) -> Record:
  """One CPSC2018 `.mat` record in mV, validated. Raises `RecordError` naming the file."""
  path = os.fspath(path)
  try:
    # From memory, not the file: scipy reads each element with file.read(claimed size), and a file object allocates
    # the whole claim up front (a damaged tag claiming gigabytes would); an in-memory stream returns what there is.
    with open(path, "rb") as f:
      raw = f.read()
    problem = mat5_problem(raw)
    if problem:
      raise RecordError(path, common.UNREADABLE, problem)
    mat = scipy.io.loadmat(io.BytesIO(raw), squeeze_me=True, struct_as_record=False)
  except RecordError:
    raise
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
