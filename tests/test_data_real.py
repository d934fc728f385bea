"""Every reader on the real files in ../shared/data, and corrupted copies of them reaching every bad-input reason."""
from __future__ import annotations

import csv
import json
import pathlib
import shutil

import numpy as np
import pytest
import wfdb

from data_pipelines import leads as leads_lib
from data_pipelines import transforms
from data_pipelines.labels import ludb as ludb_labels
from data_pipelines.labels import ptbxl, snomed
from data_pipelines.quarantine import Quarantine
from data_pipelines.readers import REASONS, RecordError, iter_wfdb_folder, read_cpsc_mat, read_wfdb
from data_pipelines.contract import Contract


@pytest.fixture(scope="module")
def manifest(shared_data) -> dict[str, dict[str, str]]:
  with open(shared_data / "manifest_12lead_labeled.csv", newline="") as f:
    return {row["record"]: row for row in csv.DictReader(f)}


def test_all_ludb_records(shared_data, manifest):
  records = list(iter_wfdb_folder(shared_data / "ludb", source="LUDB"))
  errors = [r for r in records if isinstance(r, RecordError)]
  assert not errors
  assert sorted(int(r.record_id) for r in records) == list(range(1, 201))
  for r in records:
    assert r.leads == leads_lib.LEADS  # lowercase `i ii ... avr` mapped by name
    assert r.fs == 500.0 and r.signal.shape == (12, 5000) and r.signal.dtype == np.float32
    row = manifest[f"ludb/{r.record_id}"]
    assert r.metadata["sex"] == row["sex"]
    if row["age"].startswith(">"):  # ludb.csv caps ages (`>89`) where the header keeps them (90)
      assert r.metadata["age"] > float(row["age"][1:])
    else:
      assert r.metadata["age"] == float(row["age"])
    # Physical units: every lead of a real 12-lead ECG swings between 0.05 and 10 mV, whatever the gain.
    ptp = np.ptp(r.signal, axis=1)
    assert (ptp > 0.05).all() and (ptp < 10).all(), (r.record_id, ptp)


def test_ludb_per_lead_gain_is_applied(shared_data):
  r = read_wfdb(shared_data / "ludb" / "1.hea")
  raw = wfdb.rdrecord(str(shared_data / "ludb" / "1"), physical=False)
  for i, name in enumerate(raw.sig_name):
    expected = (raw.d_signal[:, i] - raw.baseline[i]) / raw.adc_gain[i]
    np.testing.assert_allclose(r.signal[r.leads.index(leads_lib.canonical_name(name))], expected, atol=1e-5)


def test_all_cinc_records(shared_data, manifest):
  records = list(iter_wfdb_folder(shared_data / "cinc2021", source="CinC2021"))
  assert len(records) == 50 and not [r for r in records if isinstance(r, RecordError)]
  mapping = snomed.load_dx_mapping(shared_data / "cinc2021" / "dx_mapping.csv")
  # Two Chapman-Ningbo records carry V2, V4 and V6 as constant lines: marked absent, never fed as signal.
  flat = {r.record_id: r.metadata["flat_leads"] for r in records if "flat_leads" in r.metadata}
  assert flat == {"JS20004": ["V2", "V4", "V6"], "JS20008": ["V2", "V4", "V6"]}
  raw = wfdb.rdrecord(str(shared_data / "cinc2021" / "JS20004")).p_signal
  assert np.ptp(raw[:, [7, 9, 11]], axis=0).max() == 0 and np.ptp(raw[:, :7], axis=0).min() > 0
  for r in records:
    expected_leads = tuple(n for n in leads_lib.LEADS if n not in flat.get(r.record_id, []))
    assert r.leads == expected_leads and r.fs == 500.0 and r.signal.shape == (len(expected_leads), 5000)
    row = manifest[f"cinc2021/{r.record_id}"]
    assert r.metadata["dx"] == row["labels_raw"].split(";")
    assert snomed.names(r.metadata["dx"], mapping) == row["labels_abbrev"].split(";")
    assert r.metadata["sex"] == row["sex"]
    assert r.patient_id == r.record_id
    assert 0.3 < np.median(np.ptp(r.signal, axis=1)) < 6  # mV; a unit slip would be 1000 times off
  stach = sum(int("427084000" in r.metadata["dx"]) for r in records)
  assert stach == 23  # the sinus tachycardia task of the data README


def test_cinc_mat_matches_raw_int16_over_gain(shared_data):
  import scipy.io
  r = read_wfdb(shared_data / "cinc2021" / "HR06000")  # units written `mv`, lower case
  raw = scipy.io.loadmat(shared_data / "cinc2021" / "HR06000.mat")["val"]
  np.testing.assert_allclose(r.signal, raw / 1000.0, atol=1e-6)


def test_ptbxl_native_record_with_excerpt_metadata(shared_data):
  r = read_wfdb(shared_data / "ptbxl" / "00001_lr.hea", source="PTB-XL")
  assert r.leads == leads_lib.LEADS  # `AVR AVL AVF` mapped by name
  assert r.fs == 100.0 and r.signal.shape == (12, 1000)
  database = ptbxl.load_database(shared_data / "ptbxl" / "ptbxl_database_excerpt.csv")
  row = database[int(r.record_id.split("_")[0])]
  assert row.filename_lr.endswith(r.record_id)
  assert row.patient_id == "15709" and row.split == "train" and row.sex == "F"


def test_ptbxl_excerpt_agrees_with_cinc_copies(shared_data):
  """The HR06000-HR06009 CinC records are PTB-XL 6000-6009 (`HR{ecg_id:05d}`): same sex and age."""
  database = ptbxl.load_database(shared_data / "ptbxl" / "ptbxl_database_excerpt.csv")
  for i in range(6000, 6010):
    r = read_wfdb(shared_data / "cinc2021" / f"HR{i:05d}")
    assert r.record_id == f"HR{i:05d}"
    ecg_id = int(r.record_id[2:])
    assert database[ecg_id].sex == r.metadata["sex"]
    assert database[ecg_id].age == r.metadata["age"]


def test_mitdb_format_212(shared_data):
  r = read_wfdb(shared_data / "mitdb" / "100")
  assert r.leads == ("II", "V5")  # MLII -> II
  assert r.fs == 360.0 and r.signal.shape == (2, 650000)
  assert r.absent_leads == ("I", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V6")
  assert r.metadata["age"] == 69 and r.metadata["sex"] == "M"
  # header: gain 200 adu/mV, baseline 1024, first samples 995 and 1011
  np.testing.assert_allclose(r.signal[:, 0], [(995 - 1024) / 200, (1011 - 1024) / 200], atol=1e-6)
  windows = transforms.prepare_record_windows(r, Contract())
  assert windows.shape == (180, 12, 2500)  # 30 min 5.6 s -> 180 full 10 s windows
  mask = transforms.lead_mask(r, Contract())
  assert mask.tolist() == [n in ("II", "V5") for n in leads_lib.LEADS]
  assert not windows[:, ~mask].any() and windows[:, mask].std() > 0.1


def test_ptb_fifteen_leads_frank_dropped(shared_data):
  r = read_wfdb(shared_data / "ptbdb" / "s0010_re.hea")
  assert r.leads == leads_lib.LEADS
  assert r.dropped_leads == ("vx", "vy", "vz")
  assert r.fs == 1000.0 and r.signal.shape == (12, 38400)
  assert r.metadata["sex"] == "F" and r.metadata["age"] == 81
  assert transforms.prepare_record_windows(r, Contract()).shape == (3, 12, 2500)


def test_cpsc2018_mat(shared_data):
  paths = sorted((shared_data / "cpsc2018").glob("*.mat"))
  assert len(paths) == 10
  for p in paths:
    r = read_cpsc_mat(p)
    assert r.record_id == p.stem and r.leads == leads_lib.LEADS and r.fs == 500.0
    assert 10.0 <= r.seconds <= 60.0
    assert r.metadata["sex"] in ("M", "F") and r.metadata["age"] > 0
    assert 0.3 < np.median(np.ptp(r.signal, axis=1)) < 6  # mV; a unit slip would be 1000 times off
  assert read_cpsc_mat(paths[0]).metadata == {"age": 52.0, "sex": "M", "units": "mV"}


def test_lead_spellings_agree(shared_data):
  """`avr` (LUDB), `AVR` (PTB-XL native), `aVR` (CinC) all land in the aVR slot."""
  spellings = {}
  for path in (shared_data / "ludb" / "1", shared_data / "ptbxl" / "00001_lr", shared_data / "cinc2021" / "E07500"):
    header = wfdb.rdheader(str(path))
    spellings[header.sig_name[3]] = read_wfdb(path).leads[3]
  assert spellings == {"avr": "aVR", "AVR": "aVR", "aVR": "aVR"}


def test_ptbxl_labels_on_excerpt(shared_data):
  statements = ptbxl.load_statements(shared_data / "ptbxl" / "scp_statements.csv")
  database = ptbxl.load_database(shared_data / "ptbxl" / "ptbxl_database_excerpt.csv")
  assert sorted(database) == [1] + list(range(6000, 6010))
  assert database[1].scp_codes == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
  assert ptbxl.task_labels(database[1].scp_codes, statements, "all") == ["LVOLT", "NORM", "SR"]
  assert ptbxl.task_labels(database[6001].scp_codes, statements, "superdiagnostic") == ["STTC"]
  assert ptbxl.task_labels(database[6002].scp_codes, statements, "subdiagnostic") == ["IRBBB", "NORM"]
  assert ptbxl.task_labels(database[6002].scp_codes, statements, "superdiagnostic") == ["CD", "NORM"]
  assert ptbxl.task_labels(database[6003].scp_codes, statements, "rhythm") == ["STACH"]
  assert ptbxl.task_labels(database[1].scp_codes, statements, "form") == ["LVOLT"]
  assert {ecg_id: row.split for ecg_id, row in database.items() if row.split != "train"} == {6000: "test",
                                                                                            6004: "test"}
  classes = ptbxl.task_classes(statements, "superdiagnostic")
  hot = np.stack([ptbxl.multi_hot(ptbxl.task_labels(r.scp_codes, statements, "superdiagnostic"), classes)
                  for r in database.values()])
  assert classes == ["CD", "HYP", "MI", "NORM", "STTC"] and hot.sum() == 12  # 10 NORM, 1 STTC, 1 CD


def test_ludb_labels_match_manifest(shared_data, manifest):
  labels = ludb_labels.load_ludb(shared_data / "ludb" / "ludb.csv")
  assert len(labels) == 200
  for record_id, row in labels.items():
    m = manifest[f"ludb/{record_id}"]
    assert ludb_labels.af_or_flutter(row) == int(m["af_or_afl"])
    assert ludb_labels.lvh(row) == int(m["ludb_lvh"])
    assert ludb_labels.sinus_rhythm(row) == int(m["sinus_rhythm"]), record_id
    assert (row.axis or "") == m["ludb_axis"]
    assert row.sex == m["sex"]


# --- corrupted copies -------------------------------------------------------------------------------------------

def _copy_ludb(shared_data: pathlib.Path, tmp_path: pathlib.Path, name: str = "1") -> pathlib.Path:
  for ext in (".hea", ".dat"):
    shutil.copy(shared_data / "ludb" / f"1{ext}", tmp_path / f"{name}{ext}")
  if name != "1":
    text = (tmp_path / f"{name}.hea").read_text().replace("1.dat", f"{name}.dat")
    (tmp_path / f"{name}.hea").write_text(f"{name}" + text[1:])
  return tmp_path / name


def _edit_samples(base: pathlib.Path, edit) -> None:
  samples = np.fromfile(f"{base}.dat", dtype="<i2").reshape(-1, 12)
  edit(samples)
  samples.tofile(f"{base}.dat")


def _reason(path, **kw) -> str:
  with pytest.raises(RecordError) as info:
    read_wfdb(path, **kw)
  assert str(path.name) in info.value.path
  return info.value.reason


def test_truncated_dat(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  data = (tmp_path / "1.dat").read_bytes()
  (tmp_path / "1.dat").write_bytes(data[:len(data) // 3])
  assert _reason(base) == "unreadable"
  (tmp_path / "1.dat").write_bytes(data[:24 * 100])  # whole frames, still fewer than the header's 5000
  assert _reason(base) == "unreadable"


def test_truncated_mat_and_212(shared_data, tmp_path):
  for src, name in ((shared_data / "cinc2021" / "E07500", "E07500"), (shared_data / "mitdb" / "100", "100")):
    shutil.copy(f"{src}.hea", tmp_path / f"{name}.hea")
    signal_file = next(p for p in src.parent.glob(f"{name}.*") if p.suffix in (".mat", ".dat"))
    (tmp_path / signal_file.name).write_bytes(signal_file.read_bytes()[:1000])
    assert _reason(tmp_path / name) == "unreadable"


def test_missing_signal_file(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  (tmp_path / "1.dat").unlink()
  assert _reason(base) == "unreadable"


def test_garbage_header(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  (tmp_path / "1.hea").write_text("this is not a header\n\x00\x01 at all\n")
  assert _reason(base) == "bad_header"


def test_nan_samples(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  _edit_samples(base, lambda s: s.__setitem__((slice(100, 110), 4), -32768))  # WFDB's invalid-sample marker
  assert _reason(base) == "non_finite"
  r = read_wfdb(base, allow_non_finite=True)  # kept on request; the NaN window is dropped when windowing
  assert np.isnan(r.signal).sum() == 10
  assert transforms.prepare_record_windows(r, Contract()).shape[0] == 0


def test_flat_lead_marked_absent(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  _edit_samples(base, lambda s: s.__setitem__((slice(None), 3), 7))  # aVR constant
  r = read_wfdb(base)
  assert r.metadata["flat_leads"] == ["aVR"]
  assert "aVR" not in r.leads and r.absent_leads == ("aVR",) and r.signal.shape == (11, 5000)
  np.testing.assert_array_equal(transforms.lead_mask(r, Contract()), [n != "aVR" for n in leads_lib.LEADS])


def test_flat_record(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  _edit_samples(base, lambda s: s.__setitem__(slice(None), 0))
  assert _reason(base) == "flat_record"


def test_too_short(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  assert _reason(base, min_seconds=10.5) == "too_short"
  header = (tmp_path / "1.hea").read_text().replace("1 12 500 5000", "1 12 500 200", 1)
  (tmp_path / "1.hea").write_text(header)
  assert _reason(base) == "too_short"  # 0.4 s < the default 1 s


def test_unknown_leads(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  lines = (tmp_path / "1.hea").read_text().splitlines()
  lines[1:13] = [line.rsplit(" ", 1)[0] + f" ch{i}" for i, line in enumerate(lines[1:13])]
  (tmp_path / "1.hea").write_text("\n".join(lines) + "\n")
  assert _reason(base) == "unknown_leads"


def test_unsupported_fs(shared_data, tmp_path):
  base = _copy_ludb(shared_data, tmp_path)
  header = (tmp_path / "1.hea").read_text().replace("1 12 500 5000", "1 12 50 5000", 1)
  (tmp_path / "1.hea").write_text(header)
  assert _reason(base) == "unsupported_fs"
  assert read_wfdb(base, min_fs=40).fs == 50.0


def test_folder_with_bad_records_goes_to_quarantine(shared_data, tmp_path):
  folder = tmp_path / "mixed"
  folder.mkdir()
  _copy_ludb(shared_data, folder, "1")
  _edit_samples(_copy_ludb(shared_data, folder, "2"), lambda s: s.__setitem__(slice(None), 5))
  _copy_ludb(shared_data, folder, "3")
  (folder / "3.hea").write_text("garbage\n")
  with Quarantine(tmp_path / "quarantine.jsonl") as q:
    good = []
    for item in iter_wfdb_folder(folder):
      if isinstance(item, RecordError):
        q.add(item)
      else:
        good.append(item)
  assert [r.record_id for r in good] == ["1"]
  assert q.summary() == {"total": 2, "by_reason": {"flat_record": 1, "bad_header": 1}}
  lines = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
  assert [(line["record_id"], line["reason"]) for line in lines] == [("2", "flat_record"), ("3", "bad_header")]
  assert all(line["path"].endswith(".hea") for line in lines)
  assert set(q.counts) <= set(REASONS)
