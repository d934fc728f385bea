"""TFDS builders end to end on the shared real records: shapes, labels, side files, quarantine, --strict, overlap."""
from __future__ import annotations

import csv
import json
import pathlib
import shutil

import numpy as np
import pytest

from data_pipelines import overlap, prepare
from data_pipelines.labels import ludb as ludb_labels
from stmem import data
from data_pipelines.contract import Contract


def _prepare(name: str, manual: pathlib.Path, out: pathlib.Path, *extra: str) -> int:
  return prepare.main([name, "--manual_dir", str(manual), "--data_dir", str(out), "--quiet", *extra])


def _all(prepared: data.Prepared) -> list[dict]:
  return [prepared.source[i] for i in range(len(prepared.source))]


@pytest.fixture(scope="module")
def ludb_dir(shared_data, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("prepared_ludb")
  assert _prepare("ludb", shared_data / "ludb", out) == 0
  return out / "ludb"


@pytest.fixture(scope="module")
def cinc_dir(shared_data, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("prepared_cinc")
  assert _prepare("cinc", shared_data / "cinc2021", out) == 0
  return out / "cinc"


def test_direct_decode_equals_tfds_decode(cinc_dir):
  # The pipeline decodes prepared examples from their bytes (data_pipelines/example_codec.py); tfds's own decode is
  # the truth: every feature of every example, same type, dtype, shape and value.
  prepared = data.open_prepared(cinc_dir, "train")
  ours, theirs = prepared.source, prepared.source.tfds_source
  assert len(ours) == len(theirs) > 10
  for i in range(len(theirs)):
    want, got = theirs[i], ours[i]
    assert sorted(got) == sorted(want)
    for k, v in want.items():
      assert type(got[k]) is type(v), k
      if isinstance(v, np.ndarray):
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert want["sex"] in (0, 1) and want["labels"].sum() >= 0  # scalars, text and tensors all exercised
  batch = ours.__getitems__([3, 0, 3])
  np.testing.assert_array_equal(batch[0]["signal"], theirs[3]["signal"])
  np.testing.assert_array_equal(batch[1]["signal"], theirs[0]["signal"])


def test_direct_decode_of_negative_and_empty_values():
  # Negative integers are 10-byte varints, empty labels an empty list: both as tfds decodes them.
  from data_pipelines import builder_base, example_codec
  for labels in (np.array([0, 1], np.float32), np.zeros((0,), np.float32)):
    feats = builder_base.features(len(labels), Contract())
    ex = {"signal": np.random.default_rng(0).standard_normal((12, 2500)).astype(np.float32),
          "lead_mask": np.arange(12) != 4, "record_id": "r1", "patient_id": "p1", "source": "x", "window": 3,
          "labels": labels, "age": -1.0, "sex": -1, "content_hash": "abc",
          "valid_samples": 2500}
    serialized = feats.serialize_example(ex)
    want = feats.deserialize_example_np(serialized)
    got = example_codec.Decoder.like(want)(serialized)
    assert got["sex"] == -1 and got["age"] == -1.0 and got["window"] == 3 and got["labels"].shape == labels.shape
    for k, v in want.items():
      assert type(got[k]) is type(v), k
      np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_direct_decode_of_unpacked_lists_takes_the_general_walk():
  # tfds packs every list; another writer may not. An Example whose int64 list is unpacked (one varint field per
  # value) and whose float list is unpacked (fixed32 fields) decodes to the same values as the packed encoding.
  import struct
  from data_pipelines import example_codec

  def ld(number, payload):  # a length-delimited field
    n, out = len(payload), bytearray([number << 3 | 2])
    while True:
      out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
      n >>= 7
      if not n:
        return bytes(out) + payload

  def entry(key, feature):
    return ld(1, ld(1, key.encode()) + ld(2, feature))

  unpacked_ints = ld(3, bytes([0x08, 5, 0x08, 0xAC, 0x02]))                     # Int64List [5, 300]
  unpacked_floats = ld(2, b"".join(b"\x0d" + struct.pack("<f", v) for v in (1.5, -2.0)))
  packed_ints = ld(3, ld(1, bytes([5, 0xAC, 0x02])))
  packed_floats = ld(2, ld(1, struct.pack("<2f", 1.5, -2.0)))
  for ints, floats in ((unpacked_ints, unpacked_floats), (packed_ints, packed_floats)):
    got = example_codec.parse(ld(1, entry("n", ints) + entry("x", floats)))
    assert got["n"][0] == "int" and got["n"][1].tolist() == [5, 300]
    assert got["x"][0] == "float" and got["x"][1].tolist() == [1.5, -2.0]


def test_raw_folder_in_memory_equals_the_prepared_dataset(cinc_dir, shared_data):
  # One path: a raw folder read in memory (data.open_pool) gives the examples `stmem prepare` wrote, split by split.
  prepared = data.open_pool(data.DatasetSpec("prepared", path=str(cinc_dir)))
  raw = data.open_pool(data.DatasetSpec("raw", path=str(shared_data / "cinc2021"), name="cinc"), prepared.contract)
  assert raw.label_names == prepared.label_names and raw.quarantine["total"] == 0
  assert sorted(raw.record_id) == sorted(prepared.record_id) and len(raw.record_id) == 50
  at = {r: i for i, r in enumerate(prepared.record_id)}
  for i, rid in enumerate(raw.record_id):
    a, b = raw.source[i], prepared.source[at[rid]]
    assert raw.split[i] == prepared.split[at[rid]]
    np.testing.assert_array_equal(a["signal"], b["signal"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["content_hash"] == b["content_hash"].decode() and a["sex"] == b["sex"]


def test_ludb_all_records_with_labels_and_side_files(ludb_dir, shared_data):
  prepared = data.open_prepared(ludb_dir, "train")
  examples = _all(prepared)
  assert len(examples) == 200
  ex = examples[0]
  assert ex["signal"].shape == (12, 2500) and ex["signal"].dtype == np.float32
  assert ex["lead_mask"].shape == (12,) and ex["lead_mask"].dtype == bool and ex["lead_mask"].all()
  assert len(ex["content_hash"]) == 40 and ex["source"] == b"ludb"
  assert prepared.label_names == ("af_or_flutter", "sinus_rhythm", "lvh", "axis_normal", "axis_left_deviation")
  table = ludb_labels.load_ludb(shared_data / "ludb" / "ludb.csv")
  for ex in examples:
    row = table[ex["record_id"].decode()]
    assert ex["labels"][0] == ludb_labels.af_or_flutter(row)
    assert ex["labels"][2] == ludb_labels.lvh(row)
    assert ex["sex"] == {"M": 1, "F": 0, None: -1}[row.sex]
  labels = np.stack([ex["labels"] for ex in examples])
  assert labels[:, 0].sum() == 18 and labels[:, 2].sum() == 108  # README: AF/AFL 18/200, LVH 108/200
  assert (labels[:, 3].sum(), labels[:, 4].sum()) == (75, 66)
  assert len({ex["content_hash"] for ex in examples}) == 200
  folder = pathlib.Path(prepared.folder)
  # `stmem prepare` filters once per record by default (the input pipeline's cheap path).
  assert Contract.from_json((folder / "contract.json").read_text()) == Contract(filter_stage="offline")
  assert (folder / "quarantine.jsonl").read_text() == ""
  summary = json.loads((folder / "summary.json").read_text())
  assert summary["records_read"] == 200 and summary["examples_written"] == 200 and summary["quarantined"] == 0


def test_cinc_sample_splits_and_snomed_labels(cinc_dir):
  names = json.loads((pathlib.Path(data.open_prepared(cinc_dir, "train").folder) / "labels.json").read_text())
  assert "426177001" in names and "713427006" in names and "59118001" not in names  # equivalents merged
  by_id = {}
  for split in ("train", "validation", "test"):
    for ex in _all(data.open_prepared(cinc_dir, split)):
      by_id[ex["record_id"].decode()] = (split, ex)
  assert len(by_id) == 50
  split, e = by_id["E07500"]  # Dx 67741000119109,426177001 (LAE, SB); Age 78; Male
  assert e["labels"].shape == (len(names),) and e["labels"][names.index("426177001")] == 1.0
  assert e["labels"].sum() == 1.0 and e["age"] == 78.0 and e["sex"] == 1
  assert by_id["HR06000"][1]["source"] == b"cinc/ptb-xl" and by_id["HR06000"][1]["sex"] == 0
  assert by_id["JS20000"][1]["source"] == b"cinc/ningbo"


def test_corrupted_record_is_quarantined_and_strict_names_it(shared_data, tmp_path, capsys):
  manual = tmp_path / "cinc"
  shutil.copytree(shared_data / "cinc2021", manual)
  bad = manual / "E07501.mat"
  bad.write_bytes(bad.read_bytes()[:100])
  assert _prepare("cinc", manual, tmp_path / "out") == 0
  folder = data.open_prepared(tmp_path / "out" / "cinc", "train").folder
  summary = json.loads((pathlib.Path(folder) / "summary.json").read_text())
  assert summary["records_read"] == 50 and summary["records_written"] == 49
  assert summary["quarantined_by_reason"] == {"unreadable": 1}
  lines = [json.loads(x) for x in (pathlib.Path(folder) / "quarantine.jsonl").read_text().splitlines()]
  assert len(lines) == 1 and "E07501" in lines[0]["path"] and lines[0]["reason"] == "unreadable"
  assert "unreadable: 1" in capsys.readouterr().out

  assert _prepare("cinc", manual, tmp_path / "strict", "--strict") == 1
  err = capsys.readouterr().err
  assert "E07501" in err and "unreadable" in err


def test_generic_numpy_builder(tmp_path):
  rng = np.random.default_rng(0)
  t = np.arange(5000) / 500.0
  ecgs = (np.sin(2 * np.pi * 1.2 * t)[None, None] * rng.uniform(0.5, 2, (6, 12, 1))).astype(np.float32)
  ecgs = np.moveaxis(ecgs, 1, 2)  # (N, T, leads): NTL layout
  ecgs[5, 100, 3] = np.nan
  np.save(tmp_path / "ecgs.npy", ecgs)
  with open(tmp_path / "meta.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["record_id", "patient_id", "age", "sex", "af"])
    for i in range(6):
      w.writerow([f"r{i}", f"p{i // 2}", 40 + i, "M" if i % 2 else "F", i % 2])
  code = _prepare("generic", tmp_path, tmp_path / "out", "--array", "ecgs.npy", "--metadata_csv", "meta.csv",
                  "--source_fs", "500", "--leads", "12", "--layout", "NTL", "--filter_stage", "offline")
  assert code == 0
  prepared = data.open_prepared(tmp_path / "out", "train")
  examples = sorted(_all(prepared), key=lambda e: e["record_id"])
  assert [e["record_id"] for e in examples] == [b"r0", b"r1", b"r2", b"r3", b"r4"]  # r5 holds a NaN
  assert prepared.label_names == ("af",) and prepared.contract.filter_stage == "offline"
  assert [float(e["labels"][0]) for e in examples] == [0, 1, 0, 1, 0]
  assert examples[1]["patient_id"] == b"p0" and examples[1]["sex"] == 1 and examples[0]["sex"] == 0
  assert examples[2]["age"] == 42.0 and examples[0]["signal"].shape == (12, 2500)
  summary = json.loads((pathlib.Path(prepared.folder) / "summary.json").read_text())
  assert summary["quarantined_by_reason"] == {"non_finite": 1}
  batch = next(data.make_iterator(prepared.source, prepared.contract, batch_size=2, train=False))
  assert batch["signal"].shape == (2, 3, 12, 2250) and batch["labels"].shape == (2, 1)


def test_generic_folder_reads_cpsc_originals_beside_wfdb_records(shared_data, tmp_path):
  # CPSC2018's downloads are MATLAB structs with no header; a CinC record's .mat belongs to its .hea. One folder
  # holding both yields every record, each read by its own reader (a CinC .mat read as CPSC would be quarantined).
  folder = tmp_path / "mine"
  folder.mkdir()
  for name in ("A1980.mat", "A1981.mat"):
    shutil.copy(shared_data / "cpsc2018" / name, folder / name)
  for suffix in (".hea", ".mat"):
    shutil.copy(shared_data / "cinc2021" / f"E07500{suffix}", folder / f"E07500{suffix}")
  pool = data.open_pool(data.DatasetSpec("raw", path=str(folder), name="generic"))
  assert pool.quarantine["total"] == 0
  assert sorted(set(pool.record_id)) == ["A1980", "A1981", "E07500"]
  a1980 = pool.source[list(pool.record_id).index("A1980")]
  assert a1980["age"] == 52.0 and a1980["sex"] == 1  # the struct's ECG.age and ECG.sex ("Male")
  assert a1980["signal"].shape[0] == 12 and np.isfinite(a1980["signal"]).all()


def _ptbxl_like(shared_data: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """A PTB-XL download layout holding the 10 records CinC 2021 redistributes as HR06000..HR06009.

  The samples are CinC's own digital values written as PTB-XL's 500 Hz WFDB files (format 16, gain 1000/mV, as in
  PTB-XL), so the overlap check must find all 10 despite the different file names and containers. ecg_id 1 has
  only its 100 Hz file here, so it is quarantined as unreadable in a 500 Hz build.
  """
  import wfdb
  root.mkdir()
  shutil.copy(shared_data / "ptbxl" / "scp_statements.csv", root / "scp_statements.csv")
  shutil.copy(shared_data / "ptbxl" / "ptbxl_database_excerpt.csv", root / "ptbxl_database.csv")
  for i in range(6000, 6010):
    rec = wfdb.rdrecord(str(shared_data / "cinc2021" / f"HR{i:05d}"), physical=False)
    folder = root / "records500" / "06000"
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(f"{i:05d}_hr", fs=rec.fs, units=["mV"] * 12, sig_name=rec.sig_name, d_signal=rec.d_signal,
                fmt=["16"] * 12, adc_gain=rec.adc_gain, baseline=rec.baseline, write_dir=str(folder))
  return root


def test_overlap_finds_ptbxl_records_inside_cinc(shared_data, cinc_dir, tmp_path, capsys):
  manual = _ptbxl_like(shared_data, tmp_path / "ptbxl_download")
  code = _prepare("ptbxl", manual, tmp_path / "out", "--task", "superdiagnostic", "--check_overlap", str(cinc_dir))
  assert code == 0
  out = capsys.readouterr().out
  assert "overlap: 10 record(s)" in out and "unreadable: 1" in out
  ptbxl_dir = tmp_path / "out" / "ptbxl"
  test = data.open_prepared(ptbxl_dir, "test")
  assert test.label_names == ("CD", "HYP", "MI", "NORM", "STTC")
  pairs = overlap.find_overlap(cinc_dir, ptbxl_dir)
  assert sorted(p["a"]["record_id"] for p in pairs) == [f"HR{i:05d}" for i in range(6000, 6010)]
  assert all(p["b"]["record_id"] == p["a"]["record_id"][2:] + "_hr" for p in pairs)
  assert overlap.main([str(cinc_dir), str(ptbxl_dir), "--fail_on_overlap"]) == 1
  assert overlap.main([str(cinc_dir), str(cinc_dir.parent.parent / "nothing")]) == 2
  ex = next(e for e in _all(test) if e["record_id"] == b"06000_hr")
  assert ex["patient_id"] == b"5028" and ex["age"] == 59.0 and ex["sex"] == 0  # PTB-XL sex 1 = female
  assert ex["labels"][3] == 1.0  # NORM


def test_code15_builder_end_to_end(tmp_path, capsys):
  from tests.helpers import write_code15_folder
  manual, truth = write_code15_folder(tmp_path / "code15")
  assert _prepare("code15", manual, tmp_path / "out", "--filter_stage", "per_crop") == 0
  out = capsys.readouterr().out
  assert "records read:      4" in out and "too_short: 1" in out and "flat_record: 1" in out
  prepared = data.open_prepared(tmp_path / "out" / "code15", "train")
  examples = {e["record_id"].decode(): e for e in _all(prepared)}
  assert sorted(examples) == ["101", "201"]  # 102 is 7.3 s (< one 10 s window), 202 is all zeros
  assert prepared.label_names == ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")
  e = examples["101"]
  assert e["source"] == b"code15" and e["patient_id"] == b"7" and e["age"] == 54.0 and e["sex"] == 1
  assert e["labels"].tolist() == [0, 1, 0, 0, 0, 0] and e["signal"].shape == (12, 2500)
  # The stored window is the exam resampled 400 -> 250 Hz, leads by name (DI..V6 -> I..V6), in mV.
  from data_pipelines import transforms
  np.testing.assert_allclose(e["signal"], transforms.resample(truth[101], 400.0, 250.0), atol=1e-5)
  # The 7.3 s exams of CODE-15 are kept with shorter stored windows, as the builder's docstring advises.
  assert _prepare("code15", manual, tmp_path / "short", "--record_seconds", "7", "--window_seconds", "6") == 0
  short = data.open_prepared(tmp_path / "short" / "code15", "train")
  assert sorted(e["record_id"].decode() for e in _all(short)) == ["101", "102", "201"]
  assert short.contract.record_samples == 1750 and short.contract.window == 1500


def test_ptbxl_builder_reads_the_native_100hz_record(shared_data, tmp_path):
  # The real PTB-XL layout: records100/00000/00001_lr.{hea,dat} and the metadata files, as downloaded.
  manual = tmp_path / "ptbxl"
  (manual / "records100" / "00000").mkdir(parents=True)
  for ext in (".hea", ".dat"):
    shutil.copy(shared_data / "ptbxl" / f"00001_lr{ext}", manual / "records100" / "00000" / f"00001_lr{ext}")
  shutil.copy(shared_data / "ptbxl" / "scp_statements.csv", manual / "scp_statements.csv")
  # Only ecg_id 1 of the excerpt has its 100 Hz file here: keep its metadata row (the header and that row).
  rows = (shared_data / "ptbxl" / "ptbxl_database_excerpt.csv").read_text().splitlines()
  (manual / "ptbxl_database.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.startswith("1,")]) + "\n")
  assert _prepare("ptbxl", manual, tmp_path / "out", "--task", "superdiagnostic", "--sampling_rate", "100") == 0
  summary = json.loads(next((tmp_path / "out" / "ptbxl").glob("*/summary.json")).read_text())
  assert summary["records_written"] == 1 and summary["quarantined"] == 0
  (split,) = summary["examples_per_split"]
  (ex,) = _all(data.open_prepared(tmp_path / "out" / "ptbxl", split))
  assert ex["record_id"] == b"00001_lr" and ex["source"] == b"ptb-xl"
  assert ex["signal"].shape == (12, 2500) and ex["lead_mask"].all()  # 100 Hz -> 250 Hz, AVR/AVL by name
  names = data.open_prepared(tmp_path / "out" / "ptbxl", split).label_names
  assert ex["labels"][names.index("NORM")] == 1.0 and ex["labels"].sum() == 1.0  # scp_codes NORM, LVOLT, SR
