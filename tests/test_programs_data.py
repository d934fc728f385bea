"""Every downstream program gets its examples one way: `stmem.data.open_pool`, over prepared, raw and simulated data.

The programs are run for real (tiny checkpoint, a few steps) on 40 LUDB records as a raw folder, the same records
prepared by `stmem prepare`, and simulated ECGs; a spy on `open_pool` (the `opened` fixture of conftest.py)
records what each run asked for, so a program that opened files itself, or read through a second path, fails.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from data_pipelines import prepare
from stmem import data
from tests.helpers import tiny_checkpoint

N_RECORDS = 40  # enough for non-empty 80/10/10 patient-hash splits (32/2/6) and 5 cross-validation folds


@pytest.fixture(scope="module")
def sources(shared_data, tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("programs")
  raw = root / "raw" / "ludb"  # a data root holding ludb/, as the probe's data_root expects
  raw.mkdir(parents=True)
  shutil.copy(shared_data / "ludb" / "ludb.csv", raw)
  for i in range(1, N_RECORDS + 1):
    for ext in ("hea", "dat"):
      shutil.copy(shared_data / "ludb" / f"{i}.{ext}", raw)
  assert prepare.main(["ludb", "--manual_dir", str(raw), "--data_dir", str(root / "prepared"), "--quiet"]) == 0
  return {"root": root / "raw", "raw": raw, "prepared": root / "prepared", "ckpt": tiny_checkpoint(root / "ckpt")}


def test_probe_reads_prepared_raw_and_simulated_data_through_open_pool(sources, opened, tmp_path):
  from stmem.programs import probe
  out = tmp_path / "probe"
  assert probe.main([f"--config={probe.DEFAULT_CONFIG}:test", f"--config.init_from={sources['ckpt']}",
                     "--config.tasks=synthetic,ludb_sex,prepared", f"--config.data.records={sources['root']}",
                     f"--config.data.data_dir={sources['prepared']}", "--config.labels=sinus_rhythm",
                     "--config.data.num_synthetic=120", "--config.data.simulator=1", "--config.lead_sets=12",
                     "--config.random_baseline=False", "--workdir", str(out)]) == 0
  assert sorted(s.source for s in opened) == ["prepared", "raw", "synthetic"]
  assert {s.name for s in opened if s.source == "raw"} == {"ludb"}
  rows = {r["task"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
  assert rows["synthetic"]["n_records"] == 8  # simulator 1's patient-hash test split of 120 (fixed splits)
  # The prepared task's row is named after its dataset (the report names the data, not "prepared").
  (prepared_row,) = [r for name, r in rows.items() if name not in ("synthetic", "ludb_sex")]
  assert rows["ludb_sex"]["n_records"] == N_RECORDS and prepared_row["n_records"] == N_RECORDS  # 5-fold CV
  # Raw and prepared LUDB are the same examples: the same sinus-rhythm count through both paths.
  raw = data.open_pool(data.DatasetSpec("raw", path=str(sources["raw"]), name="ludb"))
  assert prepared_row["n_positive"] == int(raw.labels[:, raw.label_names.index("sinus_rhythm")].sum())


@pytest.mark.parametrize("source", ["raw", "prepared"])
def test_finetune_reads_raw_and_prepared_data_through_open_pool(sources, opened, tmp_path, source):
  # Simulated data: tests/test_finetune.py's run, which checks its open_pool call the same way.
  from stmem.programs import finetune
  task = {"raw": ["--config.task=ludb_sex", f"--config.data.records={sources['root']}", "--config.kind=multilabel"],
          "prepared": ["--config.task=prepared", f"--config.data.data_dir={sources['prepared']}",
                       "--config.labels=sinus_rhythm", "--config.kind=multilabel"]}[source]
  out = tmp_path / "ft"
  assert finetune.main([f"--config={finetune.DEFAULT_CONFIG}:test", f"--config.init_from={sources['ckpt']}",
                        "--config.total_steps=3", *task, "--workdir", str(out)]) == 0
  assert [s.source for s in opened] == [source]
  row = json.loads((out / "report.json").read_text())["rows"][0]
  # The test rows: the patient-hash split (80/10/10) of data without fixed splits, 6 of the 40 LUDB records.
  assert row["n_records"] == 6


def test_embed_reads_each_kind_of_data_through_open_pool(sources, opened, tmp_path):
  from stmem.programs import embed
  common = ["--init_from", str(sources["ckpt"]), "--batch_size", "16", "--no_progress"]
  runs = {"prepared": ["--data_dir", str(sources["prepared"]), "--split", "train"],
          "raw": ["--records", str(sources["raw"])], "synthetic": ["--num_synthetic", "6"]}
  ids = {}
  for kind, args in runs.items():
    prefix = str(tmp_path / kind)
    assert embed.main([*common, *args, "--out", prefix]) == 0
    with np.load(prefix + ".npz") as z:
      assert z["pooled"].shape == (N_RECORDS if kind != "synthetic" else 6, 64)
      ids[kind] = dict(zip(z["record_id"], z["pooled"]))
  assert [s.source for s in opened] == list(runs)
  # Raw folder and prepared dataset: the same records (their values differ by where the band-pass ran: the prepared
  # copy was filtered once per record, the raw read follows the checkpoint's per-crop contract).
  assert sorted(ids["raw"]) == sorted(ids["prepared"]) == sorted(str(i) for i in range(1, N_RECORDS + 1))


def test_pretrain_reads_a_raw_folder_through_open_pool(sources, opened, tmp_path):
  """`stmem pretrain --config.data.source=raw`: the LUDB recordings, read in memory as `stmem prepare ludb` would
  prepare them, through the config's data block (`stmem.data.spec_from_config`) and `open_pool`."""
  from stmem import checkpoint as ckpt_lib
  from stmem import programs
  workdir = tmp_path / "pretrain"
  assert programs.run(["pretrain", "--config", "pretrain:tiny", "--config.data.source=raw",
                       f"--config.data.records={sources['raw']}", "--config.data.name=ludb",
                       "--config.total_steps=2", "--config.warmup_steps=1", "--config.batch_size=8",
                       "--config.checkpoint.every=2", "--config.checkpoint.async_save=False", "--config.log_every=1",
                       "--config.evals=", "--workdir", str(workdir)]) == 0  # evaluators read data of their own
  assert len(opened) == 1
  (spec,) = opened
  assert (spec.source, spec.name, spec.path) == ("raw", "ludb", str(sources["raw"]))
  assert (workdir / "checkpoints" / "2").is_dir()
  meta, _, step = ckpt_lib.read_meta(workdir)
  assert step == 2 and meta["config"]["data"]["source"] == "raw"
