"""Readers on files the tests write: CODE-15 HDF5 layout, numpy + CSV, CPSC structs, WFDB units; and `validate`."""
from __future__ import annotations

import csv
import pathlib

import h5py
import numpy as np
import pytest
import scipy.io
import wfdb

from data_pipelines import leads as leads_lib
from data_pipelines.errors import UsageError
from data_pipelines.readers import (Checks, Record, RecordError, iter_code15, iter_numpy, parse_lead_map, read_cpsc_mat,
                                    read_wfdb, select_standard_leads, validate)
from data_pipelines.readers.code15 import CODE15_LEADS, strip_zero_padding
from tests.helpers import ecg_like as _ecg, write_code15_folder, write_csv as _write_csv


# --- CODE-15 ----------------------------------------------------------------------------------------------------

@pytest.fixture
def code15_folder(tmp_path) -> tuple[pathlib.Path, dict[int, np.ndarray]]:
  return write_code15_folder(tmp_path)


def test_code15_reads_strips_padding_and_labels(code15_folder):
  folder, truth = code15_folder
  items = list(iter_code15(folder))
  records = {r.record_id: r for r in items if isinstance(r, Record)}
  errors = [e for e in items if isinstance(e, RecordError)]
  assert sorted(records) == ["101", "102", "201"]  # exam_id 0 filler skipped
  assert [(e.record_id, e.reason) for e in errors] == [("202", "flat_record")]
  r = records["101"]
  assert r.fs == 400.0 and r.leads == leads_lib.LEADS and r.signal.shape == (12, 4000)
  np.testing.assert_allclose(r.signal, truth[101], atol=1e-6)  # DI..V6 by name; AVR/AVL not swapped
  assert r.patient_id == "7" and r.metadata["age"] == 54 and r.metadata["sex"] == "M"
  assert r.metadata["labels"] == {"1dAVb": 0.0, "RBBB": 1.0, "LBBB": 0.0, "SB": 0.0, "AF": 0.0, "ST": 0.0}
  assert records["102"].signal.shape == (12, 2934) and records["102"].metadata["labels"]["AF"] == 1.0
  assert records["201"].metadata["sex"] == "F" and records["201"].patient_id == "9"


def test_code15_units_scale_and_min_seconds(code15_folder):
  folder, truth = code15_folder
  scaled = {r.record_id: r for r in iter_code15(folder, units_scale=0.1) if isinstance(r, Record)}
  np.testing.assert_allclose(scaled["101"].signal, truth[101] * 0.1, atol=1e-6)
  assert scaled["101"].metadata["units_scale"] == 0.1
  items = list(iter_code15(folder, min_seconds=9.0))
  short = [e for e in items if isinstance(e, RecordError) and e.reason == "too_short"]
  assert [e.record_id for e in short] == ["102"]


def test_code15_bad_layout(tmp_path):
  with h5py.File(tmp_path / "exams_part0.hdf5", "w") as f:
    f["tracings"] = np.zeros((2, 4096, 8), np.float32)
    f["exam_id"] = np.arange(1, 3)
  (tmp_path / "exams_part1.hdf5").write_bytes(b"not hdf5 at all")
  errors = list(iter_code15(tmp_path))
  assert [e.reason for e in errors] == ["bad_header", "unreadable"]


def test_strip_zero_padding_keeps_inner_zeros():
  x = np.zeros((10, 2))
  x[2, 0], x[4, 1], x[7, 0] = 1, 2, 3
  assert strip_zero_padding(x).shape == (6, 2) and strip_zero_padding(np.zeros((5, 2))).shape == (0, 2)


def test_code15_lead_names_are_known():
  assert [leads_lib.canonical_name(n) for n in CODE15_LEADS] == list(leads_lib.LEADS)


# --- numpy + CSV ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NLT", "NTL"])
def test_numpy_reader(tmp_path, layout):
  data = np.stack([_ecg(3, 1000, seed=i) for i in range(3)]).astype(np.float32)  # (N, L, T)
  np.save(tmp_path / "x.npy", data if layout == "NLT" else data.transpose(0, 2, 1))
  _write_csv(tmp_path / "meta.csv", [
    {"record_id": "a", "patient_id": "p1", "age": 50, "sex": "female", "af": 1},
    {"record_id": "b", "patient_id": "", "age": "", "sex": "M", "af": 0},
    {"record_id": "c", "patient_id": "p2", "age": 70, "sex": "M", "af": 0}])
  items = list(iter_numpy(tmp_path / "x.npy", tmp_path / "meta.csv", fs=250, leads=["avr", "DII", "resp"],
                          layout=layout))
  assert [r.record_id for r in items] == ["a", "b", "c"]
  a = items[0]
  assert a.leads == ("aVR", "II") and a.dropped_leads == ("resp",) and a.fs == 250.0
  np.testing.assert_allclose(a.signal, data[0, :2], atol=1e-6)
  assert a.patient_id == "p1" and a.metadata["sex"] == "F" and a.metadata["labels"] == {"af": 1.0}
  assert items[1].patient_id == "b" and items[1].metadata["age"] is None


def test_numpy_reader_bad_rows_and_mismatch(tmp_path):
  data = np.stack([_ecg(2, 1000, seed=i) for i in range(3)])
  data[1, 0, 10] = np.nan
  data[2] = 0.0
  np.save(tmp_path / "x.npy", data)
  _write_csv(tmp_path / "meta.csv", [{"record_id": k} for k in "abc"])
  items = list(iter_numpy(tmp_path / "x.npy", tmp_path / "meta.csv", fs=500, leads="I+II"))
  assert isinstance(items[0], Record)
  assert [(e.record_id, e.reason) for e in items[1:]] == [("b", "non_finite"), ("c", "flat_record")]
  _write_csv(tmp_path / "short.csv", [{"record_id": "a"}])
  with pytest.raises(RecordError, match="1 CSV rows for 3 ECGs"):
    list(iter_numpy(tmp_path / "x.npy", tmp_path / "short.csv", fs=500, leads="I+II"))
  with pytest.raises(RecordError) as info:
    list(iter_numpy(tmp_path / "x.npy", tmp_path / "meta.csv", fs=500, leads="12"))
  assert info.value.reason == "bad_header"


# --- CPSC struct ------------------------------------------------------------------------------------------------

def test_cpsc_struct_roundtrip_and_errors(tmp_path):
  data = _ecg(12, 5000)
  scipy.io.savemat(tmp_path / "A0001.mat", {"ECG": {"sex": "Female", "age": 61, "data": data}})
  r = read_cpsc_mat(tmp_path / "A0001.mat")
  assert r.record_id == "A0001" and r.leads == leads_lib.LEADS and r.metadata["sex"] == "F"
  np.testing.assert_allclose(r.signal, data, atol=1e-6)
  scipy.io.savemat(tmp_path / "wrong.mat", {"val": data})
  with pytest.raises(RecordError) as info:
    read_cpsc_mat(tmp_path / "wrong.mat")
  assert info.value.reason == "bad_header" and "wrong.mat" in str(info.value)
  (tmp_path / "broken.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 20)
  with pytest.raises(RecordError) as info:
    read_cpsc_mat(tmp_path / "broken.mat")
  assert info.value.reason == "unreadable"


# --- WFDB written here ------------------------------------------------------------------------------------------

def test_wfdb_microvolts_converted_and_duplicate_leads_refused(tmp_path):
  signal = _ecg(3, 2000).T  # (T, 3)
  wfdb.wrsamp("uv", fs=500, units=["uV", "mV", "mV"], sig_name=["I", "MLII", "V1"],
              p_signal=signal * np.array([1000.0, 1.0, 1.0]), fmt=["16"] * 3, write_dir=str(tmp_path),
              comments=["Age: NaN", "Sex: Unknown", "Dx: 426783006"])
  r = read_wfdb(tmp_path / "uv.hea")
  assert r.leads == ("I", "II", "V1") and r.dropped_leads == ()  # MLII is lead II
  np.testing.assert_allclose(r.signal[0], signal[:, 0], atol=1e-3)
  assert r.metadata["age"] is None and r.metadata["sex"] is None and r.metadata["dx"] == ["426783006"]
  # MLII and II both claim lead II: one is mislabelled and nothing says which, so the record is refused.
  wfdb.wrsamp("dup", fs=500, units=["mV"] * 3, sig_name=["I", "MLII", "II"], p_signal=signal, fmt=["16"] * 3,
              write_dir=str(tmp_path))
  with pytest.raises(RecordError) as info:
    read_wfdb(tmp_path / "dup.hea")
  assert info.value.reason == "duplicate_leads" and "dup.hea" in str(info.value) and "'MLII', 'II'" in str(info.value)


def test_wfdb_missing_header(tmp_path):
  with pytest.raises(RecordError) as info:
    read_wfdb(tmp_path / "nothing")
  assert info.value.reason == "unreadable"


def _write_mat_record(folder: pathlib.Path, name: str, record_line_tail: str, line_end: str = "\r\n",
                      channel: str = "ECG", samples: int = 3000) -> np.ndarray:
  """A CinC 2017-style record: MATLAB v4 `val` int16 at 1000 adu/mV, format `16+24`, one channel."""
  x = _ecg(1, samples)[0]
  digital = np.round(x * 1000).astype(np.int16)[None]
  scipy.io.savemat(folder / f"{name}.mat", {"val": digital}, format="4")
  text = (f"{name} 1 300 {samples}{record_line_tail}{line_end}"
          f"{name}.mat 16+24 1000/mV 16 0 {int(digital[0, 0])} 0 0 {channel}{line_end}# Age: 61{line_end}")
  (folder / f"{name}.hea").write_bytes(text.encode())
  return digital[0] / 1000.0


@pytest.mark.parametrize("tail", [" 2016-06-05 09:01:00", " 05/06/2016 09:01:00", " 09:01:00 2016-06-05"])
def test_wfdb_base_date_wfdb_rejects_is_left_out_and_noted(tmp_path, tail):
  _write_mat_record(tmp_path, "A1", tail)
  with pytest.raises(ValueError):  # what wfdb itself does with these headers
    wfdb.rdheader(str(tmp_path / "A1"))
  r = read_wfdb(tmp_path / "A1.hea", lead_map={"ecg": "I"})
  assert r.leads == ("I",) and r.fs == 300.0 and r.signal.shape == (1, 3000) and r.metadata["age"] == 61.0
  np.testing.assert_allclose(r.signal[0], _ecg(1, 3000)[0], atol=1e-3)
  (note,) = r.metadata["notes"]
  assert repr(tail.strip()) in note and "wfdb could not read" in note


@pytest.mark.parametrize("line_end", ["\r\n", "\n"])
def test_wfdb_crlf_single_channel_and_lead_map(tmp_path, line_end):
  truth = _write_mat_record(tmp_path, "B1", " 09:01:00 05/06/2016", line_end)
  with pytest.raises(RecordError) as info:
    read_wfdb(tmp_path / "B1.hea")
  assert info.value.reason == "unknown_leads" and "--lead_map" in str(info.value)
  r = read_wfdb(tmp_path / "B1.hea", lead_map=parse_lead_map("ECG=I"))
  assert r.leads == ("I",) and "notes" not in r.metadata and r.metadata["comments"] == ["Age: 61"]
  np.testing.assert_allclose(r.signal[0], truth, atol=1e-6)


def test_wfdb_garbage_header_is_still_bad_header(tmp_path):
  (tmp_path / "G.hea").write_text("G one three hundred\n")
  with pytest.raises(RecordError) as info:
    read_wfdb(tmp_path / "G.hea")
  assert info.value.reason == "bad_header"


def test_parse_lead_map():
  assert parse_lead_map("ECG=I, mlii = II,V=v1") == {"ecg": "I", "mlii": "II", "v": "V1"}
  assert parse_lead_map(None) == {} and parse_lead_map({"ECG": "avr"}) == {"ecg": "aVR"}
  for bad, says in (("ECG", "is not FILE_NAME=LEAD"), ("ECG=X1", "'X1' is not a standard lead")):
    with pytest.raises(UsageError, match=says):
      parse_lead_map(bad)


# --- validate ---------------------------------------------------------------------------------------------------

def _record(signal: np.ndarray, fs: float = 500.0, leads=("I", "II", "V1")) -> Record:
  return Record(signal=np.asarray(signal, np.float32), fs=fs, leads=tuple(leads), record_id="r", path="r.hea")


def test_validate_reasons():
  good = _ecg(3, 1000)
  assert validate(_record(good)).leads == ("I", "II", "V1")
  cases = {
    "too_short": (_record(good[:, :100]), {}),
    "unsupported_fs": (_record(good, fs=50.0), {}),
    "unknown_leads": (_record(np.zeros((0, 1000)), leads=()), {}),
    "non_finite": (_record(np.where(np.arange(1000) == 5, np.inf, good)), {"allow_non_finite": True}),
    "flat_record": (_record(np.ones((3, 1000))), {}),
  }
  for reason, (record, kw) in cases.items():
    with pytest.raises(RecordError) as info:
      validate(record, **kw)
    assert info.value.reason == reason and info.value.path == "r.hea"


def test_validate_flat_and_missing_leads():
  x = _ecg(3, 1000)
  x[1] = 0.25
  out = validate(_record(x))
  assert out.leads == ("I", "V1") and out.metadata["flat_leads"] == ["II"] and out.signal.shape == (2, 1000)
  y = _ecg(3, 1000)
  y[2] = np.nan  # a lead never recorded: absent when gaps are allowed, refused otherwise
  assert validate(_record(y), Checks(allow_non_finite=True)).leads == ("I", "II")
  with pytest.raises(RecordError, match="non_finite"):
    validate(_record(y))
  z = _ecg(3, 1000)
  z[0] = 0.001 * np.sign(np.sin(np.arange(1000)))
  assert validate(_record(z), flat_tolerance=0.01).leads == ("II", "V1")


def test_select_standard_leads():
  x = np.arange(12, dtype=float).reshape(4, 3)
  signal, names, dropped = select_standard_leads(x, ["vx", "AVL", "d1", "V2"], "p")
  assert names == ("aVL", "I", "V2") and dropped == ("vx",) and signal[:, 0].tolist() == [3, 6, 9]
  with pytest.raises(RecordError) as info:  # two spellings of one lead: which signal is aVL cannot be known
    select_standard_leads(x, ["vx", "AVL", "d1", "aVL"], "p")
  assert info.value.reason == "duplicate_leads" and "aVL" in str(info.value)
  with pytest.raises(RecordError) as info:
    select_standard_leads(x, ["a", "b", "c", "d"], "p")
  assert info.value.reason == "unknown_leads"


# --- labels for a folder from a CSV -----------------------------------------------------------------------------

def test_labels_csv_pairs_and_tables(tmp_path):
  from data_pipelines.errors import DataError
  from data_pipelines.generic import labels_csv
  pairs = tmp_path / "REFERENCE.csv"
  pairs.write_text("A00001,N\r\nA00002,A\r\nA00003.mat,~\r\nA00004,N\r\n")
  t = labels_csv.load(pairs)
  assert t.names == ("A", "N", "~") and t.kind == "multiclass"
  assert t.vector("A00003").tolist() == [0, 0, 1] and t.vector("A00004").tolist() == [0, 1, 0]
  with pytest.raises(RecordError) as info:
    t.vector("A00009", "A00009.hea")
  assert info.value.reason == "no_label" and "REFERENCE.csv" in str(info.value)

  table = tmp_path / "labels.csv"
  table.write_text("record_id,af,lvh,site\nr1,1,0,x\nr2,0,1,y\n")
  t = labels_csv.load(table, label_columns=["af", "lvh"])
  assert t.names == ("af", "lvh") and t.kind == "multilabel" and t.vector("r2").tolist() == [0, 1]
  t = labels_csv.load(table, id_column="record_id", label_columns=["site"])
  assert t.names == ("x", "y") and t.vector("r1").tolist() == [1, 0]  # one column of words: classes
  with pytest.raises(UsageError, match="no column"):
    labels_csv.load(table, label_columns=["rhythm"])
  with pytest.raises(DataError, match="mix words and numbers"):
    labels_csv.load(table)
  (tmp_path / "twice.csv").write_text("A1,N\nA1,A\n")
  with pytest.raises(DataError, match="two rows"):
    labels_csv.load(tmp_path / "twice.csv")


def test_wfdb_lenient_header_with_a_truncated_signal_is_unreadable(tmp_path):
  _write_mat_record(tmp_path, "T1", " 2016-06-05 09:01:00")
  data = (tmp_path / "T1.mat").read_bytes()
  (tmp_path / "T1.mat").write_bytes(data[:len(data) // 2])  # the header reads once the date is left out
  with pytest.raises(RecordError) as info:
    read_wfdb(tmp_path / "T1.hea", lead_map={"ecg": "I"})
  assert info.value.reason == "unreadable" and "T1.hea" in str(info.value)
