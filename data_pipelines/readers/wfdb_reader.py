"""WFDB records: PhysioNet `.hea` + `.dat` (formats 16, 212, ...) and CinC `.hea` + MATLAB v4 `.mat` signal files.

The `wfdb` library does the decoding; this module converts to millivolts by the header's units, keeps standard
leads by name, and turns header comments (`# Age:`, `# Sex:`, `# Dx:`, LUDB's `#<age>:`) into metadata.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import wfdb

from data_pipelines.readers import common
from data_pipelines.record import Record, RecordError

# Multiplier from a header's amplitude unit to millivolts; WFDB writes no unit as mV.
_TO_MV = {"mv": 1.0, "": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}
_COMMENT_FIELD = re.compile(r"^\s*<?([A-Za-z][A-Za-z0-9 _/()-]*?)>?\s*:\s*(.*?)\s*$")
_MITDB_DEMOGRAPHICS = re.compile(r"^\s*(\d+|\?+)\s+([MF?])\b")
_PATIENT_FOLDER = re.compile(r"^patient\d+$", re.IGNORECASE)


def record_path(path: str | os.PathLike[str]) -> str:
  """The record path wfdb wants: the header path without `.hea`."""
  text = os.fspath(path)
  return text[:-4] if text.endswith(".hea") else text


def parse_comments(comments: list[str]) -> dict[str, Any]:
  """Header comments -> metadata: `age`, `sex`, `dx` (list of codes) where present, every `key: value` under
  its lower-case key, and the raw lines under `comments`."""
  meta: dict[str, Any] = {"comments": list(comments)}
  for line in comments:
    m = _COMMENT_FIELD.match(line)
    if m:
      key, value = m.group(1).strip().lower(), m.group(2)
      meta.setdefault(key, value)
  if "age" not in meta:  # MIT-BIH writes "69 M 1085 1629 x1"
    for line in comments:
      m = _MITDB_DEMOGRAPHICS.match(line)
      if m:
        meta["age"], meta["sex"] = m.group(1), m.group(2)
        break
  if "age" in meta:
    meta["age"] = common.parse_age(meta["age"])
  if "sex" in meta:
    meta["sex"] = common.parse_sex(meta["sex"])
  if "dx" in meta:
    meta["dx"] = [c.strip() for c in str(meta["dx"]).split(",") if c.strip()]
  return meta


def _patient_id(meta: dict[str, Any], path: pathlib.Path) -> str | None:
  for key in ("patient_id", "patient", "subject_id"):
    if meta.get(key):
      return str(meta[key])
  if _PATIENT_FOLDER.match(path.parent.name):  # PTB diagnostic: patient001/s0010_re
    return path.parent.name
  return None


def _record_line(lines: list[str]) -> int | None:
  """Index of the record line: the first line that is neither blank nor a comment."""
  for i, line in enumerate(lines):
    if line.strip() and not line.lstrip().startswith("#"):
      return i
  return None


def lenient_header(text: str) -> tuple[str, str]:
  """(header text wfdb can parse, what was left out): the base time and date of the record line are dropped.

  Why: WFDB wants `HH:MM:SS DD/MM/YYYY` after the sample count, and exporters write other things there (CinC 2017's
  AliveCor headers, ISO dates, the date first); wfdb then refuses the whole header with a `strptime` message,
  although nothing stmem reads depends on when the recording started. Line ends are normalised (CRLF, CR) too.
  Returns ("", "") when there is nothing after the sample count to leave out.
  """
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  i = _record_line(lines)
  if i is None:
    return "", ""
  fields = lines[i].split()
  if len(fields) <= 4:  # name, signals, rate, samples: no base time or date to leave out
    return "", ""
  lines[i] = " ".join(fields[:4])
  return "\n".join(lines), " ".join(fields[4:])


# Bytes one sample takes in each fixed-size WFDB format; 0 is a null signal (no file).
_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3, "311": 4 / 3, "24": 3,
                     "32": 4}
_FLAC_FORMATS = ("508", "516", "524")
_FLAC_SAMPLES_PER_BYTE = 64  # ECGs compress to a few bits per sample; a header claiming more is not believed
_MAX_HEADER_BYTES = 1 << 20  # headers are a few kB; comments included
_MAX_NULL_SAMPLES = 10 ** 7   # a null (format 0) signal has no file to measure its claimed length against


def _int(text: str, hea: str, what: str) -> int:
  try:
    return int(text)
  except ValueError:  # beyond Python's 4300-digit limit for int()
    raise RecordError(hea, common.BAD_HEADER, f"{what} {text[:20]}... is not a usable number") from None


def check_claims(base: str, hea: str) -> None:
  """Refuse a header whose signal count or length its own lines and signal files cannot hold, before wfdb reads it.

  Why: wfdb believes the header; one that claims 10^12 samples, a million signals or a billion samples per frame
  makes it allocate (or loop over) that much before it finds the file is short. Checked with wfdb's own syntax: the
  signal lines a header has must cover the signals it counts, and each signal file must hold the bytes that the
  sample count, samples per frame, byte offset and formats add up to (FLAC files at most 64 samples per byte).
  Anything this check cannot parse is left to wfdb, which refuses it.
  """
  from wfdb.io.header import rx_record, rx_signal
  with open(hea, "rb") as f:
    raw = f.read(_MAX_HEADER_BYTES + 1)
  if len(raw) > _MAX_HEADER_BYTES:
    raise RecordError(hea, common.BAD_HEADER, f"more than {_MAX_HEADER_BYTES} bytes: not a WFDB header")
  lines = [line for line in raw.decode("latin-1").replace("\r\n", "\n").replace("\r", "\n").split("\n")
           if line.strip() and not line.lstrip().startswith("#")]
  record = rx_record.match(lines[0]) if lines else None
  if record is None:
    return
  counted = _int(record["n_seg"] or record["n_sig"], hea, "signal count")
  if counted > len(lines) - 1:
    what = "segments" if record["n_seg"] else "signals"
    raise RecordError(hea, common.BAD_HEADER, f"the record line counts {counted} {what} but {len(lines) - 1} lines "
                                              "follow it")
  if record["n_seg"] or not record["sig_len"]:
    return  # segments are headers of their own; without a length wfdb measures the file
  sig_len = _int(record["sig_len"], hea, "sample count")
  need: dict[str, list[float]] = {}  # file -> [byte offset, bytes per sample (all signals of the file)]
  flac: dict[str, int] = {}          # FLAC file -> samples claimed
  folder = os.path.dirname(base)
  for line in lines[1:1 + counted]:
    sig = rx_signal.match(line)
    if sig is None:
      return
    spf = _int(sig["samps_per_frame"] or "1", hea, "samples per frame")
    skew = _int(sig["skew"] or "0", hea, "skew")
    offset = _int(sig["byte_offset"] or "0", hea, "byte offset")
    if skew > sig_len:
      raise RecordError(hea, common.BAD_HEADER, f"signal skew {skew} is longer than the record ({sig_len} samples)")
    fmt, name = sig["fmt"], sig["file_name"]
    if fmt == "0" or name == "~":
      if sig_len * spf > _MAX_NULL_SAMPLES:
        raise RecordError(hea, common.BAD_HEADER, f"a null signal of {sig_len * spf} samples")
    elif fmt in _FLAC_FORMATS:
      flac[name] = flac.get(name, 0) + sig_len * spf
    elif fmt in _BYTES_PER_SAMPLE:
      entry = need.setdefault(name, [offset, 0.0])
      entry[0] = max(entry[0], offset)
      entry[1] += _BYTES_PER_SAMPLE[fmt] * spf
  for name, (offset, per_sample) in need.items():
    size = _size(os.path.join(folder, name))
    wanted = offset + math.ceil(sig_len * per_sample)
    if size is not None and wanted > size + 4:
      raise RecordError(hea, common.UNREADABLE, f"the header claims {sig_len} samples, {wanted} bytes of {name}, "
                                                f"which holds {size} bytes")
  for name, samples in flac.items():
    size = _size(os.path.join(folder, name))
    if size is not None and samples > _FLAC_SAMPLES_PER_BYTE * max(size, 1):
      raise RecordError(hea, common.UNREADABLE, f"the header claims {samples} samples in {name}, a FLAC file of "
                                                f"{size} bytes")


def _size(path: str) -> int | None:
  """The size of the file at `path`; None when there is no file there, or the name is one the file system refuses
  (too long, a NUL byte): not for the reader to fail on, wfdb reports the signal file missing."""
  try:
    return os.path.getsize(path) if os.path.isfile(path) else None
  except (OSError, ValueError):
    return None


def _decode(base: str, hea: str) -> tuple[Any, Any]:
  """(header, record) from wfdb; RecordError `bad_header` / `unreadable` naming `hea`."""
  check_claims(base, hea)
  try:
    header = wfdb.rdheader(base)
  except Exception as e:  # wfdb raises assorted types for malformed text
    raise RecordError(hea, common.BAD_HEADER, f"{type(e).__name__}: {e}") from None
  if not header.sig_name or not header.fs:
    raise RecordError(hea, common.BAD_HEADER, "no signals or no sampling rate")
  try:
    rec = wfdb.rdrecord(base, physical=True)
  except Exception as e:
    raise RecordError(hea, common.UNREADABLE, f"{type(e).__name__}: {e}") from None
  return header, rec


def _decode_leniently(base: str, hea: str, first: RecordError) -> tuple[Any, Any, str]:
  """`_decode` of the header with its base time/date left out (`lenient_header`), beside links to the signal files,
  in a temporary folder; re-raises `first` when the header still does not read without them."""
  with open(hea, encoding="ascii", errors="ignore", newline="") as f:
    text, ignored = lenient_header(f.read())
  if not ignored:
    raise first
  name = pathlib.Path(base).name
  with tempfile.TemporaryDirectory(prefix="stmem-wfdb-") as tmp:
    pathlib.Path(tmp, name + ".hea").write_text(text)
    folder = pathlib.Path(base).parent
    for line in text.split("\n")[(_record_line(text.split("\n")) or 0) + 1:]:
      fields = line.split()
      inside = fields and not os.path.isabs(fields[0]) and ".." not in pathlib.PurePath(fields[0]).parts
      if inside and not fields[0].startswith("#") and _size(str(folder / fields[0])) is not None:  # links stay in tmp
        target = pathlib.Path(tmp, fields[0])
        target.parent.mkdir(parents=True, exist_ok=True)  # a signal file in a subfolder of the record's
        if not target.exists():
          try:
            os.symlink(os.path.abspath(folder / fields[0]), target)
          except OSError:  # no symlinks on this file system: copy instead
            shutil.copyfile(folder / fields[0], target)
    try:
      header, rec = _decode(os.path.join(tmp, name), hea)
    except RecordError as second:
      if second.reason == common.BAD_HEADER:  # not (only) the date: the header's own error says more
        raise first from None
      raise  # the header reads now, and the signal is what fails
  return header, rec, f"header: left out {ignored!r} after the sample count, which wfdb could not read ({first.detail})"


def read_wfdb(path: str | os.PathLike[str], source: str = "", checks: common.Checks | None = None,
              lead_map: Mapping[str, str] | None = None, **overrides: Any) -> Record:
  """One WFDB record (path with or without `.hea`) in mV, standard leads by name, validated.

  A header whose base time or date wfdb rejects is read without them (`lenient_header`); what was left out is in
  `metadata['notes']`. `lead_map` (`common.parse_lead_map`) names channels the file names otherwise.
  Raises `RecordError`: `bad_header` when the header cannot be parsed, `unreadable` when the signal file is
  missing, truncated or corrupt, and the `validate` reasons.
  """
  base = record_path(path)
  hea = base + ".hea"
  if not os.path.exists(hea):
    raise RecordError(hea, common.UNREADABLE, "no such header file")
  notes = []
  try:
    header, rec = _decode(base, hea)
  except RecordError as e:
    if e.reason != common.BAD_HEADER:
      raise
    header, rec, note = _decode_leniently(base, hea, e)
    notes.append(note)
  signal = rec.p_signal
  if signal is None or signal.ndim != 2:
    raise RecordError(hea, common.UNREADABLE, "no samples decoded")
  if header.sig_len and signal.shape[0] != header.sig_len:
    raise RecordError(hea, common.UNREADABLE, f"{signal.shape[0]} samples, header says {header.sig_len}")
  scale = []
  for name, unit in zip(rec.sig_name, rec.units or [""] * len(rec.sig_name)):
    factor = _TO_MV.get(str(unit or "").strip().lower())
    if factor is None:
      raise RecordError(hea, common.BAD_HEADER, f"lead {name}: amplitude unit {unit!r} is not a voltage")
    scale.append(factor)
  signal = signal.T * np.asarray(scale)[:, None]
  selected, lead_names, dropped = common.select_standard_leads(signal, rec.sig_name, hea, lead_map)
  meta = parse_comments(list(rec.comments or []))
  meta["units"] = "mV"
  if notes:
    meta["notes"] = notes
  record_id = pathlib.Path(base).name
  record = Record(signal=selected.astype(np.float32), fs=float(rec.fs), leads=lead_names, record_id=record_id,
                  patient_id=_patient_id(meta, pathlib.Path(base)) or record_id, source=source, path=hea,
                  dropped_leads=dropped, metadata=meta)
  return common.validate(record, checks, **overrides)
