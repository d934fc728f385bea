"""Real files as people download them: a CinC 2017-like WFDB folder prepared by one command, probed and embedded.

The folder is written here from real LUDB samples (lead I, resampled to 300 Hz) and carries each quirk of the
PhysioNet/CinC 2017 AliveCor download: a record line with a base date wfdb rejects (the date first, ISO style),
CRLF line ends, one channel named `ECG`, MATLAB v4 `.mat` signals (`16+24` format), a headerless `REFERENCE.csv` of
`record,label`, and lengths from 9 to 61 s. Nothing is converted by hand: `README_COMMAND` (the command of the data
page's "Files as published", docs/data.md) prepares it, and probe and embed read the prepared folder.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
import scipy.signal

from stmem import cli
from tests.helpers import tiny_checkpoint

PROBE_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "probe.py")
FS = 300
# Seconds per record: the 9 s one is padded (--pad_short), the long ones give every full 10 s window.
LENGTHS = (9, 10, 12, 61, 10, 15, 20, 10, 30, 10, 11, 45, 10, 9.5, 25, 10)
CLASSES = ("N", "A", "O", "~")
# The documented command (docs/data.md), with DIR / OUT filled in by the test.
README_COMMAND = ("prepare generic --manual_dir {raw} --data_dir {out} --lead_map ECG=I --labels_csv REFERENCE.csv "
                  "--pad_short true --source cinc2017 --quiet")


def write_cinc2017_like(shared_data: pathlib.Path, folder: pathlib.Path) -> dict[str, str]:
  """Records A00001... from consecutive LUDB lead I strips; returns {record: class}. Record A00016 repeats the
  samples of A00002 under another name (an internal duplicate)."""
  from data_pipelines.readers import read_wfdb
  folder.mkdir(parents=True)
  strips, k = [], 1
  need = sum(int(np.ceil(s / 10)) for s in LENGTHS)
  while len(strips) < need:
    r = read_wfdb(shared_data / "ludb" / f"{k}.hea")
    strips.append(scipy.signal.resample(r.signal[r.leads.index("I")], 10 * FS))  # 500 Hz -> 300 Hz
    k += 1
  labels, at = {}, 0
  for i, seconds in enumerate(LENGTHS):
    name = f"A{i + 1:05d}"
    n = int(np.ceil(seconds / 10))
    x = np.concatenate(strips[at:at + n])[:int(seconds * FS)] if name != "A00016" else previous[:10 * FS]
    at += n
    if name == "A00002":
      previous = x
    digital = np.round(x * 1000).astype(np.int16)[None]  # 1000 adu/mV, as the AliveCor export
    scipy.io.savemat(folder / f"{name}.mat", {"val": digital}, format="4")
    header = (f"{name} 1 {FS} {digital.shape[1]} 2016-06-05 09:{i:02d}:00\r\n"
              f"{name}.mat 16+24 1000/mV 16 0 {int(digital[0, 0])} 0 0 ECG\r\n")
    (folder / f"{name}.hea").write_bytes(header.encode())
    labels[name] = CLASSES[i % len(CLASSES)]
  (folder / "REFERENCE.csv").write_text("".join(f"{r},{c}\n" for r, c in labels.items()))
  return labels


@pytest.fixture(scope="module")
def cinc2017(shared_data, tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp("cinc2017")
  labels = write_cinc2017_like(shared_data, root / "training2017")
  out = root / "prepared"
  command = README_COMMAND.format(raw=root / "training2017", out=out).split()
  return {"raw": root / "training2017", "out": out, "labels": labels, "command": command}


def test_the_data_page_shows_the_command():
  page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
  assert "--lead_map ECG=I --labels_csv REFERENCE.csv --pad_short true" in page


def test_prepare_cinc2017_folder_with_one_command(cinc2017, capsys):
  assert cli.main(cinc2017["command"]) == 0
  printed = capsys.readouterr().out
  folder = next((cinc2017["out"] / "generic").glob("*/summary.json")).parent
  summary = json.loads((folder / "summary.json").read_text())
  assert summary["records_read"] == len(LENGTHS) and summary["quarantined"] == 0, summary
  assert summary["records_padded"] == 2  # the 9 s and 9.5 s records; nothing else is padded
  windows = sum(max(int(s // 10), 1) for s in LENGTHS)
  assert summary["examples_written"] == windows
  assert summary["length_seconds"]["min"] == 9.0 and summary["length_seconds"]["max"] == 61.0
  assert summary["length_seconds"]["bins"] == [["5-10 s", 2], ["10-15 s", 8], ["15-20 s", 1], ["20-30 s", 2],
                                              ["30-60 s", 2], ["60-120 s", 1]]
  assert json.loads((folder / "labels.json").read_text()) == sorted(CLASSES)
  assert summary["label_kind"] == "multiclass" and summary["label_counts"] == {"A": 4, "N": 4, "O": 4, "~": 4}
  assert summary["duplicate_records"] == 1 and summary["duplicate_groups"] == [["train/A00002", "train/A00016"]]
  assert summary["records_with_notes"] == len(LENGTHS) and "left out '2016-06-05 09:00:00'" in summary["first_note"]
  index = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
  assert all("wfdb could not read" in r["notes"][0] for r in index)
  assert "read leniently:    16 record(s)" in printed
  assert "record lengths:    9-61 s (median 10.5 s): 5-10 s 2, 10-15 s 8," in printed and "duplicates:        1 record(s)" in printed
  from data_pipelines.contract import Contract
  from stmem import data
  opened = data.open_prepared(cinc2017["out"] / "generic", "train")
  examples = [opened.source[i] for i in range(len(opened.source))]
  first = next(ex for ex in examples if ex["record_id"] in ("A00001", b"A00001"))
  assert first["lead_mask"].tolist() == [True] + [False] * 11  # ECG became lead I
  assert int(first["valid_samples"]) == 9 * 250 and not np.isnan(first["signal"]).any()
  assert np.all(first["signal"][0, 9 * 250:] == 0)  # padded with zeros, marked by valid_samples
  assert all(int(ex["valid_samples"]) == Contract().record_samples for ex in examples
             if ex["record_id"] not in ("A00001", b"A00001", "A00014", b"A00014"))


def test_overlap_of_a_dataset_with_itself_lists_its_internal_duplicates(cinc2017, capsys):
  if not (cinc2017["out"] / "generic").exists():
    assert cli.main(cinc2017["command"]) == 0
  capsys.readouterr()
  folder = str(cinc2017["out"] / "generic")
  assert cli.main(["overlap", folder, folder]) == 0
  printed = capsys.readouterr().out
  assert "1 record(s) of" in printed and "repeat another's samples (1 group(s))" in printed
  assert "cinc2017/A00002 [train] == cinc2017/A00016 [train]" in printed
  assert cli.main(["overlap", folder, folder, "--fail_on_overlap"]) == 1
  capsys.readouterr()
  assert cli.main(["overlap", folder, str(next(pathlib.Path(folder).glob("*/summary.json")).parent), "--json"]) == 0
  saved = json.loads(capsys.readouterr().out)
  assert saved["duplicated"] == 1 and [r["record_id"] for r in saved["groups"][0]] == ["A00002", "A00016"]


@pytest.fixture(scope="module")
def prepared(cinc2017) -> pathlib.Path:
  if not (cinc2017["out"] / "generic").exists():
    assert cli.main(cinc2017["command"]) == 0
  return cinc2017["out"] / "generic"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
  return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_probe_prepared_cinc2017_on_lead_i_reports_each_class(prepared, ckpt, tmp_path):
  workdir = tmp_path / "probe"
  assert cli.main(["probe", f"--config={PROBE_CONFIG}:test", "--config.tasks=prepared",
                   f"--config.data.data_dir={prepared}", "--config.kind=multiclass", "--config.lead_sets=I",
                   "--config.random_baseline=False",
                   f"--config.init_from={ckpt}", "--config.cv_folds=4", "--workdir", str(workdir)]) == 0
  saved = json.loads((workdir / "report.json").read_text())
  (row,) = saved["rows"]
  assert row["task"] == "cinc2017" and row["lead_set"] == "I"  # named by its data, not `prepared`
  assert [c["class"] for c in row["classes"]] == sorted(CLASSES)
  assert all(c["n_positive"] > 0 and c["auroc_lo"] <= c["auroc"] <= c["auroc_hi"] for c in row["classes"])
  # Each stored window is scored; a class with fewer than 10 of them is flagged in the notes.
  windows = {c: sum(max(int(s // 10), 1) for i, s in enumerate(LENGTHS) if CLASSES[i % 4] == c) for c in CLASSES}
  assert {c["class"]: c["n_positive"] for c in row["classes"]} == windows
  # One note names every small class: "...: fewer than 10 ... for class(es) A 4 positive, ~ 3 positive; ..."
  (small,) = [n for n in saved["notes"] if "fewer than 10" in n and "mean little" in n]
  flagged = {item.rsplit(" ", 2)[0] for item in small.split("class(es) ", 1)[1].split(";")[0].split(", ")}
  assert flagged == {c for c, n in windows.items() if n < 10} != set()
  md = (workdir / "report.md").read_text()
  # The per-class table has a row for the noisy class `~` (its name is a Markdown-safe cell).
  assert any(line.startswith("| cinc2017 | checkpoint | I |") and "| ~ |" in line for line in md.splitlines()), md


def test_embed_prepared_cinc2017(prepared, ckpt, tmp_path):
  prefix = str(tmp_path / "emb")
  assert cli.main(["embed", "--init_from", str(ckpt), "--data_dir", str(prepared), "--split", "train",
                   "--out", prefix, "--lead_set", "I", "--no_progress"]) == 0
  z = np.load(prefix + ".npz")
  summary = json.loads(next(prepared.glob("*/summary.json")).read_text())
  assert len(z["record_id"]) == summary["examples_written"] and list(z["lead_names"]) == ["I"]
  assert np.isfinite(z["pooled"]).all() and z["pooled"].shape[1] == 64


def test_prepare_help_lists_builders_and_their_options(capsys):
  from data_pipelines import prepare
  with pytest.raises(SystemExit):
    prepare.main(["--help"])
  printed = capsys.readouterr().out
  for name in prepare.BUILDERS:
    assert f"\n  {name} " in printed
  with pytest.raises(SystemExit):
    prepare.main(["generic", "--help"])
  printed = capsys.readouterr().out
  for option in ("--lead_map", "--labels_csv", "--id_column", "--label_columns", "--pad_short", "--array"):
    assert option in printed
  assert "rename file channels to standard leads" in printed and "(default: train=1)" in printed
  with pytest.raises(SystemExit):
    prepare.main(["ptbxl", "--help"])
  assert "--sampling_rate" in capsys.readouterr().out


def test_every_builder_option_has_a_meaning():
  import inspect

  from data_pipelines import prepare
  for name in prepare.BUILDERS:
    cls = prepare.builder_class(name)
    own = {k for k, v in inspect.signature(cls.__init__).parameters.items() if v.kind == v.KEYWORD_ONLY}
    assert own <= set(prepare.builder_options(cls)), (name, own - set(prepare.builder_options(cls)))


def test_unlabelled_and_short_records_are_quarantined_with_their_reason(shared_data, tmp_path):
  raw = tmp_path / "raw"
  write_cinc2017_like(shared_data, raw)
  # A00001 is 9 s; A00004... have no row; Z99999 is no record of the folder.
  (raw / "REFERENCE.csv").write_text("A00001,N\nA00002,N\nA00003,A\nZ99999,O\n")
  for extra, written, reasons in (([], 2, {"no_label": len(LENGTHS) - 3, "too_short": 1}),
                                  (["--pad_short", "true"], 3, {"no_label": len(LENGTHS) - 3})):
    out = tmp_path / f"out{len(extra)}"
    assert cli.main(["prepare", "generic", "--manual_dir", str(raw), "--data_dir", str(out), "--lead_map", "ECG=I",
                     "--labels_csv", "REFERENCE.csv", "--quiet", *extra]) == 0
    folder = next((out / "generic").glob("*/summary.json")).parent
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["records_written"] == written and summary["quarantined_by_reason"] == reasons
    assert summary["notes"] == ["1 row(s) of REFERENCE.csv name no record in the folder (e.g. Z99999)"]
    if not extra:
      (line,) = [q for q in map(json.loads, (folder / "quarantine.jsonl").read_text().splitlines())
                 if q["reason"] == "too_short"]
      assert "A00001" in line["path"] and "--pad_short true" in line["detail"]
  assert cli.main(["prepare", "generic", "--manual_dir", str(raw), "--data_dir", str(tmp_path / "bad"),
                   "--lead_map", "ECG", "--quiet"]) == 2


def test_crops_of_a_padded_record_stay_inside_the_recording(prepared):
  from stmem import data
  opened = data.open_prepared(prepared, "train")
  ids = [opened.source[i]["record_id"] for i in range(len(opened.source))]
  ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
  padded, full = ids.index("A00001"), ids.index("A00002")  # 9 s (padded to 10 s) and 10 s
  subset = data.Subset(opened.source, [padded, full])
  (batch,) = list(data.make_iterator(subset, opened.contract, batch_size=2, train=False, worker_count=0))
  crops = batch["signal"][:, :, 0]  # (record, crop, samples) of lead I
  assert crops.shape[1] == 3 and not np.array_equal(crops[1, 0], crops[1, 2])  # 10 s: crops at 0, 0.5 s, 1 s
  np.testing.assert_array_equal(crops[0, 0], crops[0, 2])  # 9 s: every crop is the recording's 9 s, no padding
  for epoch in range(3):  # training crops too start where the recording still fills a crop: at 0 here
    (train,) = list(data.make_iterator(data.Subset(opened.source, [padded]), opened.contract, batch_size=1,
                                       train=True, seed=epoch, worker_count=0, num_epochs=1))
    np.testing.assert_allclose(train["signal"][0, 0], crops[0, 0], atol=1e-6)


def test_embed_reads_the_raw_folder_with_the_lead_map_of_its_config(cinc2017, ckpt, tmp_path):
  # No `stmem prepare`: embed's own config names the channel (config.data.lead_map, as `prepare --lead_map`).
  prefix = str(tmp_path / "raw")
  common = ["embed", "--init_from", str(ckpt), "--records", str(cinc2017["raw"]), "--lead_set", "I", "--no_progress"]
  assert cli.main(common + ["--config.data.lead_map=ECG=I", "--out", prefix]) == 0
  z = np.load(prefix + ".npz")
  long_enough = {f"A{i + 1:05d}" for i, s in enumerate(LENGTHS) if s >= 10}  # 9 s records are not padded here
  assert {str(r).split("/")[-1].split("_")[0] for r in z["record_id"]} == long_enough
  assert list(z["lead_names"]) == ["I"] and np.isfinite(z["pooled"]).all()
  # A record longer than 10 s gives a row per full window, told apart by `window` (61 s: windows 0-5).
  rows = [(str(r).split("/")[-1].split("_")[0], int(w)) for r, w in zip(z["record_id"], z["window"])]
  assert len(set(rows)) == len(rows)
  assert sorted(w for r, w in rows if r == "A00004") == [0, 1, 2, 3, 4, 5]
  assert pq.read_table(prefix + ".parquet").column("window").to_pylist() == z["window"].tolist()
  # Without the map no channel is a standard lead: every record is skipped, and the message says how to name them.
  assert cli.main(common + ["--out", str(tmp_path / "none")]) != 0
