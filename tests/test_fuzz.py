"""Every file reader, fed generated hostile inputs, reads them or refuses them with a DataError naming the file.

The property tests draw mutated and generated inputs from `benchmarks.fuzz` (the benchmark runs 10,000 per reader;
here a few dozen, more with `--hypothesis-profile=fuzz`); the regression tests below are the inputs the fuzzing
found crashing, hanging or allocating what their headers claimed, each rebuilt here from a valid file.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import time
import tracemalloc

import h5py
import numpy as np
import pytest
import scipy.io
import wfdb
from hypothesis import HealthCheck, given, settings

from benchmarks import fuzz
from data_pipelines import contract as contract_lib
from data_pipelines import inputs as inputs_lib
from data_pipelines.errors import DataError
from data_pipelines.generic import labels_csv
from data_pipelines.labels import ludb, ptbxl, snomed
from data_pipelines.readers import iter_code15, iter_numpy, read_cpsc_mat, read_wfdb
from data_pipelines.record import RecordError

settings.register_profile("ci", max_examples=12, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=500, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("STMEM_HYPOTHESIS_PROFILE", "ci"))

# Readers that import JAX (the checkpoint's meta) run last in the list; their first call pays the import.
READERS = [n for n in fuzz.TARGETS if n != "checkpoint_meta"] + ["checkpoint_meta"]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", READERS)
def test_reader_reads_or_refuses_naming_the_file(name, case_dir):
  target = fuzz.TARGETS[name]
  folder = case_dir / name
  folder.mkdir()
  assert fuzz.warm_up(target, folder) == f"{len(target.seed_files())}/{len(target.seed_files())}"

  @given(target.inputs())
  def check(files):
    out = fuzz.run_case(target, folder, files)
    assert out.kind in ("read", "refused"), f"{out.kind}: {out.detail}"

  check()


METER_SCRIPT = """
import json, pathlib, sys, tempfile
sys.path.insert(0, sys.argv[1])
import numpy as np
from benchmarks import fuzz
def target(mib):
  return fuzz.Target(f"{mib} MiB", seeds=lambda: [], mutable=(), text=False,
                     read=lambda folder: np.ones(mib * 2 ** 18, np.float32).sum())
meter = fuzz.AddressSpace(fuzz.MEMORY_LIMIT_BYTES)
folder = pathlib.Path(tempfile.mkdtemp())
out = {mib: fuzz.run_case(target(mib), folder, {"x": b""}, meter=meter) for mib in (8, 48, 200)}
after = np.ones(200 * 2 ** 18, np.float32).sum()  # the bound applies while an input is read, not afterwards
print(json.dumps({"kinds": {m: o.kind for m, o in out.items()}, "peaks": {m: o.peak_bytes for m, o in out.items()},
                  "after": float(after)}))
"""


def test_the_address_space_bound_stops_an_allocation_past_it():
  """The benchmark's default meter: an input whose read allocates past the bound fails as a memory failure (the
  allocation never happens), one below it reads, with its resident peak measured; the process is free afterwards."""
  import subprocess
  import sys
  if not fuzz.AddressSpace.available():
    pytest.skip("needs /proc/self/clear_refs (Linux)")
  r = subprocess.run([sys.executable, "-c", METER_SCRIPT, str(pathlib.Path(__file__).resolve().parents[1])],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.splitlines()[-1])
  assert got["kinds"] == {"8": "read", "48": "read", "200": "memory"}
  assert 40 * 2 ** 20 < got["peaks"]["48"] < fuzz.MEMORY_LIMIT_BYTES and got["peaks"]["8"] < got["peaks"]["48"]
  assert got["after"] == 200 * 2 ** 18


# --- regression cases: what the fuzzing found ----------------------------------------------------------------------

def _peak(fn) -> tuple[int, BaseException | None]:
  """(bytes allocated at the peak while `fn` ran, what it raised)."""
  tracemalloc.start()
  try:
    fn()
    raised = None
  except BaseException as e:  # noqa: BLE001 - returned to the test to assert on
    raised = e
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return peak, raised


def _wfdb_record(folder: pathlib.Path, fmt: str = "16") -> pathlib.Path:
  wfdb.wrsamp("r", fs=500, units=["mV"] * 2, sig_name=["I", "II"], p_signal=fuzz._ecg(2, 1000).T, fmt=[fmt] * 2,
              write_dir=str(folder))
  return folder / "r.hea"


def _edit_header(hea: pathlib.Path, record_line: str | None = None, fmt: str | None = None) -> None:
  lines = hea.read_text().splitlines()
  if record_line is not None:
    lines[0] = record_line
  if fmt is not None:
    lines[1:3] = [" ".join([line.split()[0], fmt, *line.split()[2:]]) for line in lines[1:3]]
  hea.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("record_line, fmt, reason", [
  ("r 2 500 1000000000000", None, "unreadable"),     # 10^12 samples in a 4 kB file
  ("r 1000000 500 1000", None, "bad_header"),        # a million signals, two signal lines (wfdb spun for minutes)
  (None, "16x1000000000", "unreadable"),             # a billion samples per frame
  (None, "16:100000000", "bad_header"),              # a skew longer than the record
  ("r 2 500 " + "9" * 5000, None, "bad_header"),     # beyond Python's int() digit limit
])
def test_wfdb_header_claims_beyond_its_file_are_refused_before_allocating(tmp_path, record_line, fmt, reason):
  hea = _wfdb_record(tmp_path)
  _edit_header(hea, record_line, fmt)
  start = time.process_time()
  peak, raised = _peak(lambda: read_wfdb(hea))
  assert isinstance(raised, RecordError) and raised.reason == reason and str(hea) in str(raised), raised
  assert peak < 16 * 2 ** 20 and time.process_time() - start < 2.0


def test_wfdb_flac_header_claiming_more_samples_than_the_file_holds(tmp_path):
  hea = _wfdb_record(tmp_path, fmt="516")
  _edit_header(hea, "r 2 500 100000000000")
  peak, raised = _peak(lambda: read_wfdb(hea))
  assert isinstance(raised, RecordError) and raised.reason == "unreadable" and "FLAC" in str(raised)
  assert peak < 16 * 2 ** 20


def test_cpsc_mat_tag_claiming_gigabytes_is_not_allocated(tmp_path):
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"ECG": {"sex": "Female", "age": 61, "data": fuzz._ecg(12, 500)}})
  raw = bytearray(buf.getvalue())
  raw[0] = 0  # now read as MATLAB v4, whose header (the v5 text) claims a matrix of gigabytes
  path = tmp_path / "A0001.mat"
  path.write_bytes(bytes(raw))
  peak, raised = _peak(lambda: read_cpsc_mat(path))
  assert isinstance(raised, RecordError) and raised.reason == "unreadable" and str(path) in str(raised)
  assert peak < 64 * 2 ** 20


@pytest.mark.parametrize("damage", ["dimensions as a small element", "unknown data type"])
def test_cpsc_mat_damage_that_crashed_scipy_is_refused(tmp_path, damage):
  """scipy's reader crashed the process (SIGSEGV) on these, each made by one changed byte and found by the fuzzing
  benchmark: a struct field whose dimensions tag became a small element, and the age field's data tag whose type
  became 44 (no MATLAB type). The reader refuses the file before scipy sees it."""
  import struct
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"ECG": {"sex": "Female", "age": 61, "data": fuzz._ecg(12, 500)}})
  raw = bytearray(buf.getvalue())
  sex = raw.index(b"sex\0\0age\0\0data\0") + 16  # the first field's miMATRIX, after the 15 bytes of names
  age = sex + 8 + struct.unpack_from("<I", raw, sex + 4)[0]
  assert struct.unpack_from("<I", raw, sex)[0] == struct.unpack_from("<I", raw, age)[0] == 14
  if damage == "dimensions as a small element":
    dims = sex + 8 + 16  # after the element tag and the flags
    assert struct.unpack_from("<II", raw, dims) == (5, 8)
    raw[dims + 2] = 1    # type 5 with a size in the upper half: a small element of one byte
    expected = "without its dimensions"
  else:
    data = age + 8 + 16 + 16 + 8  # after the tag, flags, dimensions and the empty name
    assert struct.unpack_from("<I", raw, data)[0] == 12  # int64
    raw[data] ^= 0x20
    expected = "unknown type 44"
  path = tmp_path / "A0001.mat"
  path.write_bytes(bytes(raw))
  with pytest.raises(RecordError, match=expected) as e:
    read_cpsc_mat(path)
  assert e.value.reason == "unreadable" and str(path) in str(e.value) and "RecordError" not in str(e.value)


def _code15_part(folder: pathlib.Path, make) -> pathlib.Path:
  path = folder / "exams_part0.hdf5"
  with h5py.File(path, "w") as f:
    make(f)
  return path


@pytest.mark.parametrize("make, says", [
  (lambda f: (f.create_group("tracings"), f.create_dataset("exam_id", data=[1])), "need datasets"),
  (lambda f: (f.create_dataset("tracings", data=np.full((1, 8, 12), "a", "S1")),
              f.create_dataset("exam_id", data=[1])), "real numbers"),
  (lambda f: (f.create_dataset("tracings", shape=(10 ** 12, 4096, 12), dtype="f4", chunks=(1, 256, 12)),
              f.create_dataset("exam_id", shape=(10 ** 12,), dtype="i8", chunks=(1024,))), "claims"),
])
def test_code15_part_files_that_are_not_code15_are_refused_per_file(tmp_path, make, says):
  part = _code15_part(tmp_path, make)
  start = time.process_time()
  peak, raised = _peak(lambda: list(iter_code15(tmp_path)))
  assert raised is None
  (err,) = list(iter_code15(tmp_path))
  assert isinstance(err, RecordError) and err.path == str(part) and says in str(err)
  assert peak < 16 * 2 ** 20 and time.process_time() - start < 2.0


@pytest.mark.parametrize("csv_bytes, says", [
  (b"id,age\n1,50\n", "no column 'exam_id'"),
  (b"exam_id,age\nnan,50\n", "data row 1"),
  (b"exam_id,age\n\xff\xfe,50\n", "not a readable CSV"),
])
def test_code15_exams_csv_damage_is_a_data_error_naming_it(tmp_path, csv_bytes, says):
  _code15_part(tmp_path, lambda f: (f.create_dataset("tracings", data=np.ones((1, 8, 12), "f4")),
                                    f.create_dataset("exam_id", data=[1])))
  (tmp_path / "exams.csv").write_bytes(csv_bytes)
  with pytest.raises(DataError, match=says) as info:
    list(iter_code15(tmp_path))
  assert str(tmp_path / "exams.csv") in str(info.value)


def test_numpy_array_of_text_and_metadata_csv_not_utf8_are_refused(tmp_path):
  np.save(tmp_path / "ecg.npy", np.full((1, 3, 600), "x"))
  (tmp_path / "meta.csv").write_text("record_id\nr0\n")
  with pytest.raises(RecordError, match="not real numbers"):
    list(iter_numpy(tmp_path / "ecg.npy", tmp_path / "meta.csv", fs=500, leads="I,II,V1"))
  np.save(tmp_path / "ecg.npy", fuzz._ecg(3, 600)[None])
  (tmp_path / "meta.csv").write_bytes(b"record_id\nr\xe90\n")
  with pytest.raises(DataError, match="not a readable CSV") as info:
    list(iter_numpy(tmp_path / "ecg.npy", tmp_path / "meta.csv", fs=500, leads="I,II,V1"))
  assert str(tmp_path / "meta.csv") in str(info.value)


@pytest.mark.parametrize("name, text, read", [
  ("labels.csv", b"A00001,N\nA0\xff0002,A\n", labels_csv.load),
  ("dx_mapping.csv", b"dx_name,snomed_code\nAF,164889003\n", snomed.load_dx_mapping),  # no abbreviation column
  ("ptbxl_database.csv", b"ecg_id,patient_id,scp_codes,strat_fold\n1,2,\"{'NORM': 100.0\",3\n", ptbxl.load_database),
  ("ptbxl_database.csv", b"ecg_id,patient_id,scp_codes,strat_fold\ninf,2,{},3\n", ptbxl.load_database),
  ("scp_statements.csv", b",description,diagnostic\nNORM,normal,1\n", ptbxl.load_statements),
  ("ludb.csv", b"Sex,Age\nF,51\n", ludb.load_ludb),
])
def test_label_tables_that_do_not_parse_name_the_file(tmp_path, name, text, read):
  path = tmp_path / name
  path.write_bytes(text)
  with pytest.raises(DataError) as info:
    read(path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("text, says", [
  ('{"fs": "250"}', "sampling rate"),
  ('{"window": -5}', "positive whole number"),
  ('{"leads": ["I", "I"]}', "each once"),
  ('{"fs": NaN}', "sampling rate"),
  ("[" * 100_000, "not readable JSON"),
  ('{"window": ' + "9" * 5000 + "}", "not readable JSON"),
  ("[1, 2]", "JSON object"),
])
def test_contract_json_that_is_not_a_contract_is_refused_naming_it(tmp_path, text, says):
  path = tmp_path / "contract.json"
  path.write_text(text)
  with pytest.raises(contract_lib.BadContract, match=says) as info:
    contract_lib.read(path)
  assert str(path) in str(info.value) and isinstance(info.value, DataError)


@pytest.mark.parametrize("doc", ["[]", '{"options": {}}', "\"x\"", "{" * 50_000])
def test_inputs_json_that_is_not_a_fingerprint_is_refused_naming_it(tmp_path, doc):
  (tmp_path / "inputs.json").write_text(doc)
  with pytest.raises(DataError, match="--overwrite") as info:
    inputs_lib.read(tmp_path)
  assert str(tmp_path / "inputs.json") in str(info.value)


def _deep(meta):
  return json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("edit, says", [
  (lambda m: json.dumps({**m, "model": {**m["model"], "width": "wide"}}), "model config"),
  (lambda m: json.dumps({**m, "model": {**m["model"], "colour": 1}}), "model config"),
  (lambda m: json.dumps({**m, "contract": {"fs": -1}}), "sampling rate"),
  (lambda m: json.dumps({**m, "step": "5"}), "step"),
  (_deep, "not readable JSON"),
])
def test_checkpoint_meta_that_cannot_be_a_model_is_refused_naming_it(tmp_path, edit, says):
  from stmem import checkpoint
  seed = fuzz.TARGETS["checkpoint_meta"].seed_files()[0]
  text = edit(json.loads(seed["checkpoints/5/meta/metadata"]))
  fuzz.write_case(tmp_path, {**seed, "checkpoints/5/meta/metadata": text.encode()})
  with pytest.raises(DataError, match=says) as info:
    checkpoint.read_meta(tmp_path / "checkpoints" / "5")
  assert str(tmp_path / "checkpoints" / "5" / "meta" / "metadata") in str(info.value)


def test_wfdb_lenient_reading_links_no_signal_file_outside_its_temporary_folder(tmp_path):
  import tempfile
  import uuid
  name = f"stmem-escape-{uuid.uuid4().hex}.dat"
  (tmp_path / name).write_bytes(b"\x00" * 4000)
  (tmp_path / "sub").mkdir()
  hea = tmp_path / "sub" / "r.hea"
  hea.write_text(f"r 1 500 1000 2016-06-05 09:01:00\n../{name} 16 200/mV 16 0 0 0 0 I\n")  # a date wfdb refuses
  with pytest.raises(RecordError):
    read_wfdb(hea)
  assert not os.path.lexists(os.path.join(tempfile.gettempdir(), name))


def test_wfdb_signal_file_name_too_long_for_the_file_system(tmp_path):
  hea = _wfdb_record(tmp_path)
  text = hea.read_text().replace("r.dat", "r." + "9" * 5000, 1)
  hea.write_text(text.replace("\n", " 2016-06-05\n", 1))  # a base date wfdb refuses: the lenient path links files
  with pytest.raises(RecordError) as info:
    read_wfdb(hea)
  assert str(hea) in str(info.value)
