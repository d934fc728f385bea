"""Probe, fine-tune and embed on datasets written by `stmem prepare` (ArrayRecord shards + contract.json).

LUDB is prepared under the checkpoint's own contract (one `train` split, so the probe cross-validates by patient);
the CinC sample at 500 Hz with offline filtering and its own train/validation/test splits, so every program must
adapt the data to the checkpoint's contract (resampled to 250 Hz on read, filtered once, not twice).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from data_pipelines import prepare
from stmem import data
from tests.helpers import tiny_checkpoint

PROBE_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "probe.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
  return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def ludb(shared_data, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("prepared")
  assert prepare.main(["ludb", "--manual_dir", str(shared_data / "ludb"), "--data_dir", str(out), "--quiet"]) == 0
  return out / "ludb"


@pytest.fixture(scope="module")
def cinc_500hz(shared_data, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("prepared")
  assert prepare.main(["cinc", "--manual_dir", str(shared_data / "cinc2021"), "--data_dir", str(out), "--quiet",
                       "--fs", "500", "--filter_stage", "offline",
                       "--splits", "train=0.5,validation=0.25,test=0.25"]) == 0
  return out / "cinc"


def _probe(ckpt, data_dir, workdir, *extra) -> dict:
  from stmem.programs import probe
  assert probe.main([f"--config={PROBE_CONFIG}:test", "--config.tasks=prepared", f"--config.init_from={ckpt}",
                     f"--config.data.data_dir={data_dir}", "--workdir", str(workdir), *extra]) == 0
  return json.loads((workdir / "report.json").read_text())


def test_probe_on_prepared_ludb_cross_validates_by_patient(ckpt, ludb, tmp_path):
  report = _probe(ckpt, ludb, tmp_path / "probe", "--config.labels=af_or_flutter,lvh", "--config.lead_sets=12,I")
  rows = report["rows"]
  assert {(r["model"], r["lead_set"]) for r in rows} == {(m, s) for m in ("checkpoint", "random init")
                                                          for s in ("12", "I")}
  for r in rows:
    assert r["n_records"] == 200 and r["n_patients"] == 200  # every record scored once, across the folds
    assert r["protocol"] == "5-fold patient-grouped cross-validation"
    assert r["n_positive"] == "18/108"  # LUDB's AF/flutter and LVH positives (../shared/data/README.md)
    assert r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"]
  assert (tmp_path / "probe" / "auroc_ludb.png").exists()  # the task is named by its data, not `prepared`


def test_probe_adapts_a_500hz_offline_filtered_dataset(ckpt, cinc_500hz, tmp_path):
  report = _probe(ckpt, cinc_500hz, tmp_path / "probe", "--config.labels=427084000", "--config.lead_sets=II",
                  "--config.random_baseline=False")
  notes = " ".join(report["notes"])
  assert "fs: data 500.0 vs checkpoint 250.0" in notes and "filter_stage: data 'offline'" in notes
  assert "window: data 4500 vs checkpoint 2250" in notes
  (row,) = report["rows"]
  assert row["protocol"] == "train/validation/test splits"
  test = data.open_prepared(cinc_500hz, "test")
  assert row["n_records"] == len(test.source)  # scored on the test split only


def test_finetune_on_prepared_data_selects_on_validation_and_tests_once(ckpt, cinc_500hz, tmp_path):
  from stmem.programs import finetune
  out = tmp_path / "ft"
  assert finetune.main([f"--config={finetune.DEFAULT_CONFIG}:test", "--config.task=prepared",
                        f"--config.data.data_dir={cinc_500hz}", "--config.labels=427084000,426783006",
                        "--config.kind=multilabel", f"--config.init_from={ckpt}", "--workdir", str(out)]) == 0
  row = json.loads((out / "report.json").read_text())["rows"][0]
  assert row["model"] == "fine-tuned" and row["n_records"] == len(data.open_prepared(cinc_500hz, "test").source)
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert lines and all("val_loss" in x for x in lines)


def test_embed_of_a_prepared_split_equals_the_encoder_on_the_pipeline(ckpt, cinc_500hz, tmp_path):
  import jax.numpy as jnp

  from stmem import features

  from stmem.programs import embed
  out = tmp_path / "emb" / "cinc_test"
  assert embed.main(["--init_from", str(ckpt), "--data_dir", str(cinc_500hz), "--split", "test", "--out", str(out),
                     "--crops", "mean3", "--no_progress"]) == 0
  with np.load(str(out) + ".npz") as f:
    pooled, record_id, meta_checkpoint = f["pooled"], f["record_id"], str(f["checkpoint"])
  assert meta_checkpoint == "tiny"  # the checkpoint's name, not a path of this machine

  # Independently: the checkpoint's encoder on the evaluation crops of the adapted test split, averaged per record.
  loaded = features.load_encoder(ckpt)
  test = data.open_prepared(cinc_500hz, "test")
  source, contract, _ = features.adapt(loaded.contract, test.contract, test.source)
  assert contract.fs == 250.0 and contract.filter_stage == "offline"
  it = data.make_iterator(source, contract, batch_size=4, train=False, process_index=0, process_count=1)
  rows, ids = [], []
  for b in it:
    assert b["signal"].shape[:2] == (4, 3)  # records, crops
    per_crop = [np.asarray(loaded.encoder.features(jnp.asarray(b["signal"][:, k]), jnp.asarray(b["lead_ids"]),
                                                   jnp.asarray(b["lead_mask"]))["pooled"]) for k in range(3)]
    rows.append(np.mean(per_crop, axis=0)[b["valid"]])
    ids += [r.decode() for r in b["record_id"][b["valid"]]]
  assert list(record_id) == ids and len(ids) == len(test.source)
  np.testing.assert_allclose(pooled, np.concatenate(rows), atol=1e-5)
