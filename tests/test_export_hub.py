"""`stmem export --format hub`: the folder a model hub takes (config.json, model.safetensors, a README.md model card),
and the same folder read back as a checkpoint by `stmem embed`, `probe`, `export` and `convert`."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from stmem import checkpoint, cli
from tests.helpers import tiny_checkpoint


def _stmem(*argv) -> int:
  return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
  """A pretraining workdir: a tiny checkpoint at step 0 and the evaluator figures its metrics.jsonl logged."""
  run = tmp_path_factory.mktemp("run")
  tiny_checkpoint(run / "checkpoints")
  rows = [{"step": 0, "loss": 2.1, "eval/probe/12/auroc": 0.71, "eval/probe/12/auroc_lo": 0.62,
           "eval/probe/12/auroc_hi": 0.80, "eval/probe/seconds": 3.0, "eval/heldout/loss": 0.93},
          {"step": 5, "eval/probe/12/auroc": 0.99}]  # after the checkpoint's step: not its figures
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{cut by a crash")
  return run


@pytest.fixture(scope="module")
def hub(run_dir, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("hub") / "tiny"
  old = os.umask(0o022)
  try:
    assert _stmem("export", "--init_from", run_dir, "--out", out, "--format", "hub") == 0
  finally:
    os.umask(old)
  return out


def test_the_hub_folder_holds_config_weights_and_a_card(hub, run_dir):
  assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
  for f in hub.iterdir():  # every file follows the umask; the weights are not owner-only
    assert f.stat().st_mode & 0o777 == 0o644, (f.name, oct(f.stat().st_mode))
  card = (hub / "README.md").read_text()
  assert card.startswith("---\nlibrary_name: stmem\n")  # the hub's metadata block
  front, body = card.split("\n---\n", 1)
  assert "feature-extraction" in front and "license:" in front
  assert "## Intended use and limitations" in body and "## Input contract" in body
  assert "| sampling rate | 250.0 Hz" in body
  evaluation = body.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
  assert "at step 0" in evaluation
  assert "| `probe/12/auroc` | 0.71 |" in evaluation and "| `heldout/loss` | 0.93 |" in evaluation
  assert "0.99" not in evaluation and "seconds" not in evaluation
  config = json.loads((hub / "config.json").read_text())
  meta, _, _ = checkpoint.read_meta(run_dir)
  encoder, _ = checkpoint.load_model(run_dir, encoder_only=True)
  from flax import nnx
  assert config["fingerprint"] == checkpoint.fingerprint({"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param))})
  assert config["contract"] == meta["contract"]


def test_a_card_without_evaluations_says_so(tmp_path):
  ckpt = tiny_checkpoint(tmp_path / "ckpt")
  assert _stmem("export", "--init_from", ckpt, "--out", tmp_path / "out", "--format", "hub") == 0
  card = (tmp_path / "out" / "README.md").read_text()
  assert "## Evaluation\n\nNot recorded: the run logged no evaluator figures" in card


def test_embed_probe_and_export_take_the_hub_folder_as_a_checkpoint(hub, run_dir, tmp_path, capsys):
  from stmem import features
  a, b = features.load_encoder(run_dir), features.load_encoder(hub)
  assert a.fingerprint == b.fingerprint and a.contract == b.contract and b.meta["encoder_only"]
  for source, prefix in ((run_dir, tmp_path / "from_ckpt"), (hub, tmp_path / "from_hub")):
    assert _stmem("embed", "--config", "embed:test", "--init_from", source, "--num_synthetic", "6",
                  "--out", prefix, "--no_progress") == 0
  one, two = np.load(f"{tmp_path / 'from_ckpt'}.npz"), np.load(f"{tmp_path / 'from_hub'}.npz")
  np.testing.assert_allclose(two["pooled"], one["pooled"], atol=1e-6)
  capsys.readouterr()
  assert _stmem("probe", "--config", "probe:synthetic", "--init_from", hub, "--workdir", tmp_path / "probe",
                "--config.data.num_synthetic=40", "--config.lead_sets=12", "--config.bootstrap=20",
                "--config.random_baseline=false") == 0
  assert a.fingerprint in capsys.readouterr().err
  assert _stmem("export", "--init_from", hub, "--out", tmp_path / "again", "--format", "hub") == 0
  assert json.loads((tmp_path / "again" / "config.json").read_text())["fingerprint"] == a.fingerprint


def test_convert_takes_the_folder_and_prints_the_fingerprint(hub, tmp_path, capsys):
  fp = json.loads((hub / "config.json").read_text())["fingerprint"]
  assert _stmem("convert", "--reference", hub, "--out", tmp_path / "ckpt") == 0
  out = capsys.readouterr()
  assert f"fingerprint {fp}" in out.err and json.loads(out.out)["fingerprint"] == fp
  assert checkpoint.read_meta(tmp_path / "ckpt")[0]["fingerprint"] == fp


def test_changed_weights_are_refused_naming_the_fingerprints(hub, tmp_path, capsys):
  import shutil

  from safetensors.numpy import load_file, save_file
  changed = tmp_path / "changed"
  shutil.copytree(hub, changed)
  tensors = load_file(str(changed / "model.safetensors"))
  name = sorted(tensors)[0]
  tensors[name] = tensors[name] + 1.0
  save_file(tensors, str(changed / "model.safetensors"))
  assert _stmem("embed", "--config", "embed:test", "--init_from", changed, "--num_synthetic", "2",
                "--out", tmp_path / "x", "--no_progress") == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.safetensors" in err[0] and "fingerprint" in err[0], err


def test_folders_stmem_cannot_load_point_to_what_can(tmp_path, capsys):
  weights = tmp_path / "reference"
  weights.mkdir()
  (weights / "st_mem_vit_base.pth").write_bytes(b"")
  graph = tmp_path / "graph"
  graph.mkdir()
  (graph / "model.onnx").write_bytes(b"")
  for folder, needle in ((weights, "stmem convert --reference"), (graph, "--format hub")):
    assert _stmem("embed", "--config", "embed:test", "--init_from", folder, "--num_synthetic", "2",
                  "--out", tmp_path / "x", "--no_progress") != 0
    err = capsys.readouterr().err
    assert needle in err and "no stmem checkpoint here" in err, err


def test_a_prepare_summary_names_labels_without_records_once():
  from data_pipelines import prepare
  stats = {"records_read": 3, "records_written": 3, "examples_written": 3, "examples_per_split": {"train": 3},
           "quarantined": 0, "quarantined_by_reason": {}, "label_counts": {"AF": 2, "LBBB": 0, "SNR": 1, "PVC": 0},
           "label_kind": "multilabel"}
  lines = prepare.summary_lines("cinc", "out", stats)
  labels = next(line for line in lines if line.strip().startswith("labels (multilabel)"))
  assert labels.strip() == "labels (multilabel): AF 2, SNR 1"
  assert any("labels without a record: 2 (LBBB, PVC)" in line for line in lines)
