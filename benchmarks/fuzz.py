"""Fuzzing every file reader: each generated input is read, or refused with a `DataError` naming the file.

    python -m benchmarks.fuzz --inputs 10000 [--readers wfdb_header,cpsc_mat ...] [--out fuzz.json]

Inputs are valid files written here (WFDB records in formats 16, 212, 80, 24, 32 and FLAC, CinC `.hea` + MATLAB v4
`.mat`, CPSC `.mat`, CODE-15 HDF5 + exams.csv, a `.npy` array + metadata CSV, label CSVs, `contract.json`,
`inputs.json`, checkpoint meta and export `config.json`) mutated by hypothesis: bit flips, truncations, inserted,
deleted and duplicated bytes, numbers and words replaced by hostile values (10^12 samples, negative or zero gains,
huge channel counts, NaN, inf, 5000-digit integers), re-encoded text (UTF-16, BOM, CRLF), plus headers, HDF5
layouts and JSON documents generated field by field.

Per input a reader must: return, or raise `DataError` whose message contains the path of one of the input's files;
finish within `TIME_LIMIT_S` of CPU time (a read still running after 15 times that on the clock is stopped); and
use at most `MEMORY_LIMIT_BYTES` more memory than before. Anything else is a failure, printed with the input that
caused it. Memory is bounded one of two ways (`Meter`):
- `AddressSpace` (the default on Linux): the process's address space is limited to what it had before the input plus
  the bound (RLIMIT_AS), so an allocation past it fails (a MemoryError, counted as a memory failure) instead of
  happening; the figure is the growth of the resident set's peak (VmHWM, reset before each input through
  /proc/self/clear_refs).
- `Traced` (`--tracemalloc`, and elsewhere): the tracemalloc peak, which numpy, h5py and scipy buffers count in,
  compared with the bound afterwards. Exact but slow: tracing every allocation takes about 3/4 of the CPU time.

Each reader runs in its own process (so its peak RSS is its own) and prints one JSON object per reader: inputs
tried, read, refused, failures (other exceptions, DataErrors not naming the file, over time, over memory), slowest
input in seconds and peak memory.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

TIME_LIMIT_S = 2.0                  # per input, CPU seconds (wall seconds are reported too; the machine may be shared)
MEMORY_LIMIT_BYTES = 64 * 2 ** 20   # per input, above what was allocated before it (inputs are < 1 MB)

# Values a field is replaced by: the sizes, signs and spellings that readers trip over.
HOSTILE = ["0", "-1", "1", "-0", "2", "12", "1000000000000", "999999999999999999999", "4294967296", "65536",
           "2147483648", "-2147483649", "1e12", "nan", "NaN", "inf", "-inf", "1e308", "1e-308", "-500", "0.5", "3.5",
           "9" * 5000, "", " ", "abc", "\x00", "é", "\u202e", "16x1000000000", "16+1000000000000", "16:1000000000",
           "212", "310", "311", "61", "160", "8", "80", "24", "32", "508", "999", "-16", "1e6/mV", "0/mV",
           "-200(5)/uV", "nan/mV", "200/furlong", "[]", "{}", "null", "true", '"x"', "[[[[[[[[[[", "]}"]
SNIPPETS = [b"\x00", b"\xff" * 8, b"\r\n", b"\r", "é".encode(), "é".encode("latin-1"), b"#", b" ", b"\n", b",",
            b'"', b"\xef\xbb\xbf", b"\xfe\xff", b"\\u0000", b"[" * 2000, b"9" * 5000]
_TOKEN = re.compile(rb"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|[A-Za-z_]+")


# --- byte-level mutations -----------------------------------------------------------------------------------------

def _at(data: bytes, where: int) -> int:
  return where % (len(data) + 1)


def apply_op(data: bytes, op: tuple) -> bytes:
  kind = op[0]
  if kind == "flip" and data:
    i = op[1] % len(data)
    return data[:i] + bytes([data[i] ^ (1 << op[2])]) + data[i + 1:]
  if kind == "set" and data:
    i = op[1] % len(data)
    return data[:i] + bytes([op[2]]) + data[i + 1:]
  if kind == "truncate":
    return data[:_at(data, op[1])]
  if kind == "insert":
    i = _at(data, op[1])
    return data[:i] + op[2] + data[i:]
  if kind == "delete":
    i = _at(data, op[1])
    return data[:i] + data[i + op[2]:]
  if kind == "duplicate":
    i = _at(data, op[1])
    return data[:i] + data[i:i + op[2]] * op[3] + data[i:]
  if kind == "token":
    tokens = list(_TOKEN.finditer(data))
    if not tokens:
      return data
    m = tokens[op[1] % len(tokens)]
    return data[:m.start()] + op[2].encode("utf-8", "surrogatepass") + data[m.end():]
  if kind == "encode":
    text = data.decode("latin-1")
    if op[1] == "crlf":
      return text.replace("\n", "\r\n").encode("latin-1")
    if op[1] == "cr":
      return text.replace("\n", "\r").encode("latin-1")
    return text.encode(op[1])
  return data


positions = st.integers(0, 2 ** 20)
byte_ops = st.one_of(
  st.tuples(st.just("flip"), positions, st.integers(0, 7)),
  st.tuples(st.just("set"), positions, st.integers(0, 255)),
  st.tuples(st.just("truncate"), positions),
  st.tuples(st.just("insert"), positions, st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(SNIPPETS))),
  st.tuples(st.just("delete"), positions, st.integers(1, 64)),
  st.tuples(st.just("duplicate"), positions, st.integers(1, 64), st.integers(1, 8)),
)
text_ops = st.one_of(
  byte_ops,
  st.tuples(st.just("token"), positions, st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))),
  st.tuples(st.just("token"), positions, st.sampled_from(HOSTILE)),
  st.tuples(st.just("encode"), st.sampled_from(["utf-16", "utf-8-sig", "crlf", "cr", "utf-32"])),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
  for op in ops:
    data = apply_op(data, op)
  return data


# --- targets ------------------------------------------------------------------------------------------------------

Files = dict[str, bytes]


@dataclasses.dataclass
class Target:
  """A reader under test: valid inputs (`seeds`), what may be mutated, how to read a folder holding one input."""
  name: str
  seeds: Callable[[], list[Files]]
  mutable: tuple[str, ...]          # file names (of any seed) the byte mutations apply to
  text: bool                        # text files: token and encoding edits too
  read: Callable[[pathlib.Path], Any]
  structured: Callable[[list[Files]], st.SearchStrategy[Files]] | None = None
  _seeds: list[Files] | None = None

  def seed_files(self) -> list[Files]:
    if self._seeds is None:
      self._seeds = self.seeds()
    return self._seeds

  def inputs(self) -> st.SearchStrategy[Files]:
    seeds = self.seed_files()
    mutable = [s for s in seeds if any(n in self.mutable or "*" in self.mutable for n in s)]
    ops = st.lists(text_ops if self.text else byte_ops, min_size=1, max_size=4)

    @st.composite
    def mutated(draw) -> Files:
      files = dict(draw(st.sampled_from(mutable)))
      names = [n for n in files if n in self.mutable or "*" in self.mutable]
      for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)):
        files[name] = mutate(files[name], draw(ops))
      return files

    if self.structured is None:
      return mutated()
    return st.one_of(mutated(), self.structured(seeds))


def _files_of(folder: pathlib.Path) -> Files:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tmp() -> tempfile.TemporaryDirectory:
  return tempfile.TemporaryDirectory(prefix="stmem-fuzz-seed-")


def _ecg(leads: int, samples: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / 500.0
  beats = np.sin(2 * np.pi * 1.2 * t) ** 15
  return beats[None] * rng.uniform(0.5, 1.5, (leads, 1)) + 0.02 * rng.standard_normal((leads, samples))


# WFDB ------------------------------------------------------------------------------------------------------------

_WFDB_FORMATS = ("16", "212", "80", "24", "32", "516")


def _wfdb_seeds() -> list[Files]:
  import wfdb
  seeds = []
  for i, fmt in enumerate(_WFDB_FORMATS):
    with _tmp() as d:
      leads = ["I", "II", "V1"] if i % 2 else ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5",
                                                "V6"]
      x = _ecg(len(leads), 1000, seed=i).T
      wfdb.wrsamp("r", fs=500, units=["mV"] * len(leads), sig_name=leads, p_signal=x, fmt=[fmt] * len(leads),
                  write_dir=d, comments=["Age: 61", "Sex: Female", "Dx: 164934002,426783006"])
      seeds.append(_files_of(pathlib.Path(d)))
  seeds.append(_cinc_mat_files())
  return seeds


def _cinc_mat_files(name: str = "r", leads: int = 2, samples: int = 1000) -> Files:
  """A CinC-style record: MATLAB v4 `val` int16 at 1000 adu/mV, format `16+24`."""
  import scipy.io
  digital = np.round(_ecg(leads, samples, seed=7) * 1000).astype(np.int16)
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"val": digital}, format="4")
  names = ["I", "II", "V1", "V2"][:leads]
  lines = [f"{name} {leads} 500 {samples} 09:01:00 05/06/2016"]
  lines += [f"{name}.mat 16+24 1000/mV 16 0 {int(digital[k, 0])} 0 0 {names[k]}" for k in range(leads)]
  lines += ["# Age: 61", "# Sex: Male", "# Dx: 164934002"]
  return {f"{name}.hea": ("\r\n".join(lines) + "\r\n").encode(), f"{name}.mat": buf.getvalue()}


def _read_wfdb(folder: pathlib.Path) -> Any:
  from data_pipelines.readers import read_wfdb
  return read_wfdb(folder / "r.hea")


_FIELD = st.one_of(st.sampled_from(HOSTILE), st.integers(-2 ** 40, 2 ** 45).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8))


def _wfdb_headers(seeds: list[Files]) -> st.SearchStrategy[Files]:
  """Headers written field by field over a seed's signal file: counts, rates, lengths, formats, gains, offsets,
  skews, samples per frame, baselines and units drawn from valid and hostile values."""

  @st.composite
  def header(draw) -> Files:
    seed = draw(st.sampled_from(seeds))
    signal_file = next(n for n in seed if not n.endswith(".hea"))
    nsig = draw(st.one_of(st.integers(0, 14), st.sampled_from([10 ** 6, 10 ** 12])))
    fs = draw(st.one_of(st.sampled_from(["500", "250", "0", "-500", "1e12", "nan", "500/1000", "360:500"]), _FIELD))
    nsamp = draw(st.one_of(st.sampled_from(["1000", "0", "", "999", "1001", "10", str(10 ** 12), "-5", "nan"]),
                           _FIELD))
    lines = [" ".join(p for p in ["r", str(nsig), fs, nsamp] if p) + draw(st.sampled_from(["", " 09:01:00"]))]
    for k in range(draw(st.integers(0, min(nsig, 14) + 1))):
      fmt = draw(st.one_of(st.sampled_from(["16", "212", "80", "24", "32", "61", "160", "310", "311", "8", "508",
                                            "516", "524", "16+24"]),
                           st.tuples(st.sampled_from(["16", "212", "80"]),
                                     st.sampled_from(["x", "x1000000000", "x4", ":", ":1000000000", "+",
                                                      "+1000000000000", "+3"]),
                                     st.one_of(st.just(""), _FIELD)).map("".join), _FIELD))
      gain = draw(st.one_of(st.sampled_from(["200/mV", "1000/mV", "-200/mV", "0/mV", "1e-300/mV", "nan/mV", "200",
                                             "200(0)/uV", "200(-1000000000)/V", "inf/mV", "200/furlong"]), _FIELD))
      rest = [draw(st.one_of(st.sampled_from(["16", "12", "0", "-1", "64", "1000000"]), _FIELD)) for _ in range(4)]
      name = draw(st.sampled_from(["I", "II", "V1", "aVR", "ECG", "II", ""]))
      lines.append(" ".join([signal_file, fmt, gain, *rest, name]))
    if draw(st.booleans()):
      lines.append("# Age: " + draw(_FIELD))
    files = dict(seed)
    files["r.hea"] = "\n".join(lines).encode("utf-8", "surrogatepass")
    return files

  return header()


# CPSC .mat -------------------------------------------------------------------------------------------------------

def _cpsc_seeds() -> list[Files]:
  import scipy.io
  seeds = []
  for i, (samples, dtype) in enumerate(((1000, np.float64), (1500, np.int16), (800, np.float32))):
    buf = io.BytesIO()
    data = (_ecg(12, samples, seed=i) * (1000 if dtype == np.int16 else 1)).astype(dtype)
    scipy.io.savemat(buf, {"ECG": {"sex": "Female", "age": 61, "data": data}}, do_compression=i == 1)
    seeds.append({"A0001.mat": buf.getvalue()})
  return seeds


def _read_cpsc(folder: pathlib.Path) -> Any:
  from data_pipelines.readers import read_cpsc_mat
  return read_cpsc_mat(folder / "A0001.mat")


# CODE-15 HDF5 + exams.csv -------------------------------------------------------------------------------------------

def _write_h5(tracings: np.ndarray, exam_ids: np.ndarray, **kw: Any) -> bytes:
  import h5py
  buf = io.BytesIO()
  with h5py.File(buf, "w") as f:
    f.create_dataset("tracings", data=tracings, **kw)
    f.create_dataset("exam_id", data=exam_ids)
  return buf.getvalue()


_EXAMS_CSV = (b"exam_id,age,is_male,nn_predicted_age,1dAVb,RBBB,LBBB,SB,ST,AF,patient_id,death,timey,normal_ecg,"
              b"trace_file\n101,54,True,50.1,False,True,False,False,False,False,7,,,False,exams_part0.hdf5\n"
              b"102,60,False,61.0,False,False,False,True,False,True,7.0,,,False,exams_part0.hdf5\n")


def _code15_seeds() -> list[Files]:
  tr = np.zeros((3, 1024, 12), np.float32)
  tr[0, 50:950] = _ecg(12, 900, seed=1).T
  tr[1, 100:1000] = _ecg(12, 900, seed=2).T
  ids = np.asarray([101, 102, 0], np.int64)
  return [{"exams_part0.hdf5": _write_h5(tr, ids), "exams.csv": _EXAMS_CSV},
          {"exams_part0.hdf5": _write_h5(tr, ids, chunks=(1, 256, 12), compression="gzip"), "exams.csv": _EXAMS_CSV},
          {"exams_part0.hdf5": _write_h5(tr.astype(np.int16), ids.astype(np.int32), chunks=True)}]


def _code15_layouts(seeds: list[Files]) -> st.SearchStrategy[Files]:
  """HDF5 files whose datasets claim odd shapes, dtypes and sizes (chunked and never written: 10^12 exams cost
  nothing on disk)."""

  @st.composite
  def layout(draw) -> Files:
    import h5py
    buf = io.BytesIO()
    n = draw(st.sampled_from([0, 1, 3, 10 ** 6, 10 ** 12]))
    t = draw(st.sampled_from([0, 1, 1024, 10 ** 6, 10 ** 9]))
    leads = draw(st.sampled_from([12, 11, 1, 0]))
    dtype = draw(st.sampled_from(["f4", "f8", "i2", "u1", "c8", "S4", "f2", "?"]))
    n_ids = draw(st.sampled_from([n, 3, 0, 10 ** 12]))
    id_dtype = draw(st.sampled_from(["i8", "f8", "S8", "u8"]))
    with h5py.File(buf, "w") as f:
      shape = (n, t, leads)
      chunk = tuple(max(1, min(s, c)) for s, c in zip(shape, (1, 256, 12)))
      if draw(st.booleans()) and n * t * leads <= 3 * 1024 * 12:
        ds = f.create_dataset("tracings", shape=shape, dtype=dtype)
        if ds.size and dtype not in ("S4",):
          with contextlib.suppress(OSError, TypeError):  # a conversion HDF5 lacks: the dataset stays unwritten
            ds[...] = np.ones(shape, dtype)
      else:
        f.create_dataset("tracings", shape=shape, dtype=dtype, chunks=chunk if all(shape) else None,
                         maxshape=(None, None, None) if not all(shape) else None)
      if draw(st.booleans()):
        if n_ids <= 3:
          f.create_dataset("exam_id", data=np.arange(1, n_ids + 1).astype(id_dtype))
        else:
          f.create_dataset("exam_id", shape=(n_ids,), dtype=id_dtype, chunks=(1024,), fillvalue=None)
      else:
        f.create_group("exam_id")
    return {"exams_part0.hdf5": buf.getvalue(), "exams.csv": _EXAMS_CSV}

  return layout()


def _read_code15(folder: pathlib.Path) -> Any:
  from data_pipelines.readers import iter_code15
  return list(iter_code15(folder))


# numpy + CSV -----------------------------------------------------------------------------------------------------

def _numpy_seeds() -> list[Files]:
  seeds = []
  for i, (dtype, n) in enumerate(((np.float32, 3), (np.int16, 2), (np.float64, 1))):
    buf = io.BytesIO()
    np.save(buf, (_ecg(3, 600, seed=i)[None].repeat(n, 0) * (1000 if dtype == np.int16 else 1)).astype(dtype))
    rows = ["record_id,patient_id,age,sex,AF,NORM"] + [f"r{k},p{k},{50 + k},{'MF'[k % 2]},{k % 2},true"
                                                         for k in range(n)]
    seeds.append({"ecg.npy": buf.getvalue(), "meta.csv": ("\n".join(rows) + "\n").encode()})
  return seeds


def _read_numpy(folder: pathlib.Path) -> Any:
  from data_pipelines.readers import iter_numpy
  return list(iter_numpy(folder / "ecg.npy", folder / "meta.csv", fs=500.0, leads="I,II,V1"))


def _npy_headers(seeds: list[Files]) -> st.SearchStrategy[Files]:
  """`.npy` headers claiming other shapes, dtypes and orders over a seed's data."""

  @st.composite
  def npy(draw) -> Files:
    seed = dict(draw(st.sampled_from(seeds)))
    data = seed["ecg.npy"]
    body = data[10 + int.from_bytes(data[8:10], "little"):]
    dims = st.one_of(st.sampled_from([0, 1, 3, 600, 10 ** 12, 2 ** 62]), st.integers(-5, 2 ** 63))
    shape = draw(st.lists(dims, min_size=0, max_size=4))
    descr = draw(st.sampled_from(["<f4", ">f8", "<i2", "|u1", "<c16", "|O", "<U4", "|V8", "|b1", "<M8[s]",
                                  "[('a', '<f4')]", "<f2", "'<f4'", "nonsense"]))
    fortran = draw(st.sampled_from(["False", "True", "1", "None"]))
    quoted = descr if descr.startswith("[") else repr(descr)
    header = f"{{'descr': {quoted}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    seed["ecg.npy"] = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body
    return seed

  return npy()


# label CSVs ------------------------------------------------------------------------------------------------------

def _label_seeds() -> list[Files]:
  return [
    {"labels.csv": b"A00001,N\nA00002,A\nA00003,N,O\nA00004,~\n"},
    {"labels.csv": b"record_id,AF,NORM,age\nr1,1,0,50\nr2,0,1,61.5\nr3,true,false,\n"},
    {"labels.csv": b"\xef\xbb\xbfrecord,rhythm\nr1.hea,AF\nr2.mat,SR\n"},
    {"dx_mapping.csv": b"dx_name,snomed_code,abbreviation,scored\natrial fibrillation,164889003,AF,True\n"
                       b"sinus rhythm,426783006,SNR,1\nbradycardia,426627000,Brady,0\n"},
    {"ptbxl_database.csv": b"ecg_id,patient_id,age,sex,scp_codes,strat_fold,filename_lr,filename_hr\n"
                           b"1,15709.0,56.0,1,\"{'NORM': 100.0, 'SR': 0.0}\",3,records100/00000/00001_lr,"
                           b"records500/00000/00001_hr\n2,13243.0,,0,\"{'AFIB': 80.0}\",10,a,b\n"},
    {"scp_statements.csv": b",description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass\n"
                           b"NORM,normal ECG,1.0,,,NORM,NORM\nAFIB,atrial fibrillation,,,1.0,,\n"},
    {"ludb.csv": b"ID,Sex,Age,Rhythms,Electric axis of the heart,Conduction abnormalities,Extrasystolies,"
                 b"Hypertrophies,Cardiac pacing,Ischemia,Non-specific repolarization abnormalities,Other states\n"
                 b"1,F,51,Sinus rhythm,Electric axis of the heart: normal,,,,,,,\n"
                 b"2,M,89+,\"Atrial fibrillation\nSinus rhythm\",Electric axis of the heart: left,,,,,,,\n"},
  ]


def _read_labels(folder: pathlib.Path) -> Any:
  from data_pipelines.generic import labels_csv
  from data_pipelines.labels import ludb, ptbxl, snomed
  readers = {"labels.csv": labels_csv.load, "dx_mapping.csv": snomed.load_dx_mapping,
             "ptbxl_database.csv": ptbxl.load_database, "scp_statements.csv": ptbxl.load_statements,
             "ludb.csv": ludb.load_ludb}
  (name,) = [n for n in readers if (folder / n).exists()]
  return readers[name](folder / name)


# JSON documents --------------------------------------------------------------------------------------------------

_JSON_VALUES = st.recursive(
  st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=8),
            st.sampled_from([10 ** 12, -1, 0, float("nan"), float("inf"), "", "mV", "fft", "per_crop", "I"])),
  lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children,
                                                                              max_size=4)),
  max_leaves=8)


_DEEP = "\x00deeper than the parser goes\x00"  # replaced by 100,000 nested lists once the document is text


def _json_edits(seeds: list[Files], file: str) -> st.SearchStrategy[Files]:
  """A seed's JSON document with values replaced, keys deleted or added, nested deep, or the whole document
  replaced by another JSON value."""

  @st.composite
  def edited(draw) -> Files:
    seed = dict(draw(st.sampled_from([s for s in seeds if file in s])))
    doc = json.loads(seed[file])
    for _ in range(draw(st.integers(1, 4))):
      node, path = doc, []
      while isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        path.append((node, key))
        node = node[key]
      if not path:
        if draw(st.integers(0, 9)) == 0:
          doc = draw(_JSON_VALUES)
        continue
      parent, key = path[-1]
      action = draw(st.sampled_from(["replace", "replace", "delete", "add", "deep"]))
      if action == "replace":
        parent[key] = draw(_JSON_VALUES)
      elif action == "delete":
        del parent[key]
      elif action == "add":
        parent[draw(st.text(max_size=6))] = draw(_JSON_VALUES)
      else:
        parent[key] = _DEEP if draw(st.booleans()) else [[[[[[1]]]]]]
    seed[file] = json.dumps(doc).replace(json.dumps(_DEEP), "[" * 100_000 + "]" * 100_000).encode()
    return seed

  return edited()


def _contract_seeds() -> list[Files]:
  from data_pipelines.contract import Contract
  return [{"contract.json": (Contract().to_json() + "\n").encode()},
          {"contract.json": Contract(fs=500.0, window=4500, record_samples=5000, leads=("I", "II"),
                                     highpass_hz=None, filter_stage="offline").to_json().encode()}]


def _read_contract(folder: pathlib.Path) -> Any:
  from data_pipelines import contract
  return contract.read(folder / "contract.json")


def _inputs_seeds() -> list[Files]:
  from data_pipelines import inputs
  with _tmp() as d:
    pathlib.Path(d, "a.hea").write_text("a 1 500 10\n")
    doc = inputs.fingerprint("ludb", d, {"fs": 250, "splits": "train=1"})
  return [{"inputs.json": (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()}]


def _read_inputs(folder: pathlib.Path) -> Any:
  from data_pipelines import inputs
  recorded = inputs.read(folder)
  new = {"dataset": "ludb", "options": {"fs": "250"}, "manual_dir": "/x", "files_sha1": "0", "files": 1, "bytes": 1}
  return inputs.differences(recorded, new) if recorded is not None else None


def _checkpoint_seeds() -> list[Files]:
  from data_pipelines.contract import Contract
  from stmem.checkpoint import EXPORT_FORMAT, make_meta
  from stmem.models import model_config
  cfg = model_config("tiny", width=64, depth=1, num_heads=1, decoder_width=64, decoder_heads=1)
  meta = make_meta(cfg, Contract(), config={"total_steps": 10}, step=5, origin="test")
  export = {"format": EXPORT_FORMAT, "weights": {"file": "model.safetensors"}, "model": meta["model"],
            "contract": meta["contract"], "fingerprint": "0123456789abcdef", "training": {"step": 5, "config": {}}}
  return [{"checkpoints/5/meta/metadata": json.dumps(meta).encode(), "checkpoints/5/meta/commit_success.txt": b"done",
           "checkpoints/5/_CHECKPOINT_METADATA": b"{}"},
          {"config.json": json.dumps(export, indent=2).encode(), "model.safetensors": b"\x08\x00\x00\x00\x00\x00"
                                                                                        b"\x00\x00{}      "}]


def _read_checkpoint_meta(folder: pathlib.Path) -> Any:
  from stmem import checkpoint
  path = folder if (folder / "config.json").exists() else folder / "checkpoints" / "5"
  meta, _, _ = checkpoint.read_meta(path)
  return checkpoint.model_config_from_meta(meta), checkpoint.contract_from_meta(meta)


TARGETS = {t.name: t for t in [
  Target("wfdb_header", _wfdb_seeds, ("r.hea",), True, _read_wfdb, _wfdb_headers),
  Target("wfdb_signal", _wfdb_seeds, ("r.dat", "r.mat"), False, _read_wfdb),
  Target("cpsc_mat", _cpsc_seeds, ("A0001.mat",), False, _read_cpsc),
  Target("code15_hdf5", _code15_seeds, ("exams_part0.hdf5",), False, _read_code15, _code15_layouts),
  Target("code15_csv", _code15_seeds, ("exams.csv",), True, _read_code15),
  Target("numpy_array", _numpy_seeds, ("ecg.npy",), False, _read_numpy, _npy_headers),
  Target("numpy_csv", _numpy_seeds, ("meta.csv",), True, _read_numpy),
  Target("label_csv", _label_seeds, ("*",), True, _read_labels),
  Target("contract_json", _contract_seeds, ("contract.json",), True, _read_contract,
         lambda s: _json_edits(s, "contract.json")),
  Target("inputs_json", _inputs_seeds, ("inputs.json",), True, _read_inputs, lambda s: _json_edits(s, "inputs.json")),
  Target("checkpoint_meta", _checkpoint_seeds, ("checkpoints/5/meta/metadata", "config.json"), True,
         _read_checkpoint_meta,
         lambda s: st.one_of(_json_edits(s, "checkpoints/5/meta/metadata"), _json_edits(s, "config.json"))),
]}


# --- running one input --------------------------------------------------------------------------------------------

class _Timeout(BaseException):
  pass


class _OutOfTime(Exception):
  """Raised by the next input once a reader's `--budget_s` is spent: hypothesis stops generating."""


def _alarm(signum, frame):
  raise _Timeout()


class Traced:
  """Memory per input from tracemalloc: the peak of Python's and numpy's allocations above those before it."""
  name = "tracemalloc"

  def __enter__(self):
    self._started = not tracemalloc.is_tracing()
    if self._started:
      tracemalloc.start()
    tracemalloc.reset_peak()
    self._before = tracemalloc.get_traced_memory()[0]
    return self

  def __exit__(self, *exc) -> None:
    self.peak = tracemalloc.get_traced_memory()[1] - self._before
    if self._started:
      tracemalloc.stop()

  def over(self, limit: int) -> bool:
    return self.peak > limit


class AddressSpace:
  """Memory per input on Linux: the address space limited to its size before the input plus the bound (RLIMIT_AS:
  an allocation past it fails with MemoryError), and the resident set's peak growth (VmHWM, reset per input)."""
  name = "rlimit_as"

  def __init__(self, limit: int):
    self.limit = limit

  @staticmethod
  def available() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/statm")

  @staticmethod
  def _status(field: str) -> int:
    with open("/proc/self/status") as f:
      return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

  def __enter__(self):
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # the peak resident set starts again from the current one
    self._before = self._status("VmRSS")
    with open("/proc/self/statm") as f:
      size = int(f.read().split()[0]) * resource.getpagesize()
    self._hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (size + self.limit, self._hard))
    return self

  def __exit__(self, *exc) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (self._hard, self._hard))
    self.peak = max(0, self._status("VmHWM") - self._before)

  def over(self, limit: int) -> bool:
    return False  # the limit was enforced while the input was read: past it, the read itself failed


@dataclasses.dataclass
class Outcome:
  kind: str            # "read", "refused", or the failure: "exception", "unnamed", "timeout", "memory"
  seconds: float
  peak_bytes: int
  detail: str = ""
  wall: float = 0.0    # seconds on the clock (the limit applies to `seconds`, CPU time: the machine may be shared)


def write_case(folder: pathlib.Path, files: Files) -> None:
  for p in folder.iterdir():
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
  for name, data in files.items():
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def run_case(target: Target, folder: pathlib.Path, files: Files, time_limit: float = TIME_LIMIT_S,
             memory_limit: int = MEMORY_LIMIT_BYTES, meter: Traced | AddressSpace | None = None) -> Outcome:
  """Write `files` into `folder` and read them with `target`; the outcome as the module docstring defines it (memory
  measured by `meter`, tracemalloc's by default)."""
  from data_pipelines.errors import DataError
  write_case(folder, files)
  meter = meter or Traced()
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.setitimer(signal.ITIMER_REAL, 15 * time_limit)  # a hung read is stopped, and fails
  start, cpu_start = time.perf_counter(), time.process_time()
  kind, detail = "read", ""
  paths = [str(folder / n) for n in files] + [str(folder)]
  try:
    with meter:
      result = target.read(folder)
    if isinstance(result, list):  # a folder reader: each item a record, or a DataError refusing one
      refusals = [r for r in result if isinstance(r, DataError)]
      unnamed = [r for r in refusals if not any(p in str(r) for p in paths)]
      if unnamed:
        kind, detail = "unnamed", f"DataError not naming the file: {unnamed[0]}"
      elif result and len(refusals) == len(result):
        kind = "refused"
  except DataError as e:
    kind = "refused"
    if not any(p in str(e) for p in paths):
      kind, detail = "unnamed", f"DataError not naming the file: {e}"
  except _Timeout:
    kind, detail = "timeout", "stopped by the alarm"
  except MemoryError as e:  # past the address-space bound (or out of memory)
    kind, detail = "memory", f"MemoryError past the {memory_limit / 2 ** 20:.0f} MiB bound: {str(e)[:300]}"
  except Exception as e:  # noqa: BLE001 - every other exception is the failure being counted
    import traceback
    kind, detail = "exception", "".join(traceback.format_exception(e)[-3:])[-1500:]
  finally:
    wall, seconds = time.perf_counter() - start, time.process_time() - cpu_start
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
  peak = meter.peak
  if kind in ("read", "refused") and seconds > time_limit:
    kind, detail = "timeout", f"{seconds:.2f} s of CPU > {time_limit} s"
  if kind in ("read", "refused") and meter.over(memory_limit):
    kind, detail = "memory", f"{peak / 2 ** 20:.1f} MiB > {memory_limit / 2 ** 20:.0f} MiB"
  return Outcome(kind, seconds, peak, detail, wall)


def warm_up(target: Target, folder: pathlib.Path) -> str:
  """Read every seed once, unmeasured (imports and first-call caches are not the inputs' cost); "k/n" seeds read.
  Every seed is a valid file, so all of them should be."""
  outcomes = [run_case(target, folder, files, time_limit=60.0, memory_limit=2 ** 40) for files in target.seed_files()]
  return f"{sum(o.kind == 'read' for o in outcomes)}/{len(outcomes)}"


def _settings(n: int) -> settings:
  return settings(max_examples=n, deadline=None, database=None, derandomize=False, print_blob=False,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))


def fuzz(target: Target, n: int, keep_failures: pathlib.Path | None = None,
         budget_s: float | None = None, meter: Traced | AddressSpace | None = None) -> dict[str, Any]:
  """`n` generated inputs read by `target`; the counts, slowest input and peak memory (measured by `meter`,
  tracemalloc's by default)."""
  meter = meter or Traced()
  counts = {"read": 0, "refused": 0, "exception": 0, "unnamed": 0, "timeout": 0, "memory": 0}
  worst = {"seconds": 0.0, "wall": 0.0, "peak_bytes": 0}
  failures: list[dict[str, Any]] = []
  start = time.time()
  warnings.simplefilter("ignore")  # readers warn about what they read (complex casts, deprecations): not counted
  with tempfile.TemporaryDirectory(prefix=f"stmem-fuzz-{target.name}-") as tmp:
    folder = pathlib.Path(tmp) / "case"
    folder.mkdir()
    seeds_read = warm_up(target, folder)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @_settings(n)
    @given(target.inputs())
    def one(files: Files) -> None:
      if budget_s is not None and time.time() - start > budget_s:
        raise _OutOfTime()
      out = run_case(target, folder, files, meter=meter)
      counts[out.kind] += 1
      if sum(counts.values()) % 250 == 0:  # progress, so that a run stopped early still leaves figures
        print(json.dumps({"reader": target.name, "inputs": sum(counts.values()), **counts,
                          "slowest_cpu_s": round(worst["seconds"], 4)}), file=sys.stderr, flush=True)
      worst["seconds"] = max(worst["seconds"], out.seconds)
      worst["wall"] = max(worst["wall"], out.wall)
      worst["peak_bytes"] = max(worst["peak_bytes"], out.peak_bytes)
      if out.kind not in ("read", "refused"):
        failures.append({"kind": out.kind, "detail": out.detail})
        if keep_failures is not None:
          case = keep_failures / target.name / str(len(failures))
          case.mkdir(parents=True, exist_ok=True)
          write_case(case, files)
          (case.parent / f"{case.name}.why.txt").write_text(f"{out.kind}: {out.detail}\n")

    tracing = isinstance(meter, Traced)
    if tracing:
      tracemalloc.start()
    try:
      with contextlib.redirect_stdout(sys.stderr):  # hypothesis reports the stopping input on stdout: not ours
        one()
    except _OutOfTime:
      pass
    finally:
      if tracing:
        tracemalloc.stop()
  tried = sum(counts.values())
  return {"reader": target.name, "seeds_read": seeds_read, "inputs": tried, "read": counts["read"],
          "refused": counts["refused"], "other_exceptions": counts["exception"], "unnamed_refusals": counts["unnamed"],
          "over_time": counts["timeout"], "over_memory": counts["memory"],
          "slowest_cpu_s": round(worst["seconds"], 4), "slowest_wall_s": round(worst["wall"], 3),
          "memory_meter": meter.name, "peak_memory_mib": round(worst["peak_bytes"] / 2 ** 20, 2),
          "rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1),
          "wall_s": round(time.time() - start, 1), "failures": failures[:5]}


def _read_back(f) -> str:
  f.seek(0)
  text = f.read()
  f.close()
  return text


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--inputs", type=int, default=10_000, help="generated inputs per reader")
  p.add_argument("--readers", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
  p.add_argument("--budget_s", type=float, default=None, help="stop each reader after this many seconds")
  p.add_argument("--keep_failures", default=None, help="folder to write every failing input into")
  p.add_argument("--out", default=None, help="also write the JSON here")
  p.add_argument("--jobs", type=int, default=1, help="readers fuzzed at once, each in its own process")
  p.add_argument("--in_process", action="store_true", help="run the readers in this process (one at a time)")
  p.add_argument("--tracemalloc", action="store_true",
                 help="measure memory with tracemalloc (exact, about 4x slower) instead of the address-space bound")
  args = p.parse_args(argv)
  meter = Traced() if args.tracemalloc or not AddressSpace.available() else AddressSpace(MEMORY_LIMIT_BYTES)
  names = [n.strip() for n in args.readers.split(",") if n.strip()]
  unknown = [n for n in names if n not in TARGETS]
  if unknown:
    p.error(f"unknown reader(s) {unknown}; readers are {', '.join(TARGETS)}")
  keep = pathlib.Path(args.keep_failures) if args.keep_failures else None
  results: dict[str, dict[str, Any]] = {}
  if args.in_process or len(names) == 1:
    for name in names:
      results[name] = fuzz(TARGETS[name], args.inputs, keep_failures=keep, budget_s=args.budget_s, meter=meter)
      print(json.dumps(results[name]), file=sys.stderr, flush=True)
  else:  # one process per reader (its peak RSS is its own), `--jobs` at a time
    pending, running = list(names), {}
    while pending or running:
      while pending and len(running) < args.jobs:
        name = pending.pop(0)
        cmd = [sys.executable, "-m", "benchmarks.fuzz", "--inputs", str(args.inputs), "--readers", name]
        cmd += ["--budget_s", str(args.budget_s)] if args.budget_s else []
        cmd += ["--keep_failures", args.keep_failures] if args.keep_failures else []
        cmd += ["--tracemalloc"] if args.tracemalloc else []
        logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files, not pipes: they never fill up
        running[name] = (subprocess.Popen(cmd, stdout=logs[0], stderr=logs[1], text=True), logs)
      for name, (proc, logs) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[name]
        out, err = (_read_back(f) for f in logs)
        try:
          results[name] = json.loads(out)["readers"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
          results[name] = {"reader": name, "crashed": proc.returncode, "stderr": err[-2000:]}
        print(json.dumps(results[name]), file=sys.stderr, flush=True)
      time.sleep(0.5)
  results = [results[n] for n in names]
  report = {"time_limit_s": TIME_LIMIT_S, "memory_limit_mib": MEMORY_LIMIT_BYTES // 2 ** 20, "readers": results}
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  bad = [r for r in results if r.get("crashed") is not None or any(r.get(k) for k in (
    "other_exceptions", "unnamed_refusals", "over_time", "over_memory"))]
  return 1 if bad else 0


if __name__ == "__main__":
  with contextlib.suppress(KeyboardInterrupt):
    sys.exit(main())
