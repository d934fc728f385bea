"""Evaluators while pretraining trains (stmem.evaluators): the figures land in metrics.jsonl under eval/NAME/ at the
configured steps, and `stmem probe` on the final checkpoint scores what the in-training probe logged at that step."""
import json

import pytest

# The probe's settings, as `stmem probe` options and as the pretraining evaluator's: small enough for CI.
# Block 1 of the tiny model's 2 beside the last, the MLP head beside the linear one.
PROBE = {"data.num_synthetic": 60, "lead_sets": "12,I", "use_splits": False, "cv_folds": 3, "l2_grid": "(0.01,1.0,100.0)", "lbfgs_steps": 20,
         "bootstrap": 50, "seed": 3, "blocks": "last,1", "heads": "linear,mlp", "mlp_hidden": 32, "mlp_steps": 40,
         "mlp_snapshots": 2}
# The metrics' names: a block other than `last` and a head other than `linear` are named, the defaults are not.
NAMES = [f"{ls}{b}{h}" for ls in ("12", "I") for b in ("", "/1") for h in ("", "/mlp")]


def _lines(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_logs_evaluators_and_stmem_probe_agrees(tmp_path):
  from stmem import programs
  run = tmp_path / "run"
  evals = ["--config.evals.probe.every=3", "--config.evals.heldout.every=2",
           *(f"--config.evals.probe.{k}={v}" for k, v in PROBE.items()),
           "--config.evals.probe.random_baseline=False", "--config.evals.heldout.data.num_synthetic=16",
           "--config.evals.heldout.batch_size=8"]
  assert programs.run(["pretrain", "--config", "pretrain:tiny", "--workdir", str(run), "--config.total_steps=4",
                       "--config.log_every=4", "--config.checkpoint.every=4", "--config.data.num_synthetic=32",
                       "--config.transfer_guard=disallow", *evals]) == 0
  lines = {x["step"]: x for x in _lines(run)}
  # held-out every 2 steps, the probe every 3, both at the end; a step without either writes no line.
  assert sorted(lines) == [2, 3, 4]
  assert {k for k in lines[2] if k.startswith("eval/")} == {"eval/heldout/loss", "eval/heldout/seconds"}
  assert {k for k in lines[3] if k.startswith("eval/")} == {
    "eval/probe/seconds", *(f"eval/probe/{n}/{m}" for n in NAMES for m in ("auroc", "auroc_lo", "auroc_hi"))}
  assert "eval/heldout/loss" in lines[4] and "eval/probe/12/auroc" in lines[4] and "loss" in lines[4]
  assert "loss" not in lines[2] and "loss" not in lines[3]  # training metrics only at log steps
  assert lines[4]["eval/heldout/loss"] != lines[2]["eval/heldout/loss"]  # the live parameters, not a copy
  assert all(0 <= lines[s][f"eval/probe/{n}/auroc"] <= 1 for s in (3, 4) for n in NAMES)

  out = tmp_path / "probe"
  assert programs.run(["probe", "--config", "probe:synthetic", f"--config.init_from={run}", "--workdir", str(out),
                       "--config.random_baseline=False", *(f"--config.{k}={v}" for k, v in PROBE.items())]) == 0
  rows = json.loads((out / "report.json").read_text())["rows"]
  assert {r["lead_set"] for r in rows} == {"12", "I"} and len(rows) == len(NAMES)
  assert {(r["block"], r["head"]) for r in rows} == {(b, h) for b in ("last", "1") for h in ("linear", "mlp")}
  for r in rows:
    name = r["lead_set"] + ("/1" if r["block"] == "1" else "") + ("/mlp" if r["head"] == "mlp" else "")
    assert abs(r["auroc"] - lines[4][f"eval/probe/{name}/auroc"]) < 1e-6, name


def test_evaluators_turn_off_and_refuse_bad_blocks(tmp_path):
  import ml_collections

  from data_pipelines.contract import Contract
  from data_pipelines.errors import UsageError
  from stmem import configflags, evaluators, sharding
  config, _ = configflags.parse(["--config", "pretrain:tiny", "--config.evals=", "--workdir", str(tmp_path)],
                                "stmem pretrain", None)
  assert not config.evals
  config, _ = configflags.parse(["--config", "pretrain:tiny", "--config.evals.probe=", "--workdir", str(tmp_path)],
                                "stmem pretrain", None)
  mesh = sharding.make_mesh([("data", -1)])
  built = evaluators.from_config(config.evals, contract=Contract(filter_stage="offline"), mesh=mesh)
  assert [name for name, _, _ in built] == ["heldout"]  # the emptied probe is off
  assert evaluators.due(built, 100, 200) and evaluators.due(built, 7, 7) and not evaluators.due(built, 7, 200)
  bad = ml_collections.ConfigDict({"x": {"type": "fid", "every": 1}})
  with pytest.raises(UsageError, match="evals.x.type"):
    evaluators.from_config(bad, contract=Contract(), mesh=mesh)
  with pytest.raises(UsageError, match="evals.x.every"):
    evaluators.from_config(ml_collections.ConfigDict({"x": {"type": "heldout", "every": 0}}), contract=Contract(),
                           mesh=mesh)


def test_heldout_masks_are_fixed(tmp_path):
  """Two runs on the same parameters give the same loss (same ECGs, same masks), and a parameter change moves it."""
  import ml_collections
  from flax import nnx

  from data_pipelines.contract import Contract
  from stmem import evaluators, sharding
  from stmem.models import model_config, pretraining_model
  mesh = sharding.make_mesh([("data", -1)])
  block = ml_collections.ConfigDict({"data": {"source": "synthetic", "num_synthetic": 16}, "seed": 5,
                                     "batch_size": 8})
  heldout = evaluators.HeldOut(block, contract=Contract(filter_stage="offline"), mesh=mesh)
  assert len(heldout.batches) == 2
  cfg = model_config("tiny", width=64, depth=1, num_heads=1, decoder_width=64, decoder_heads=1)
  graphdef, params = nnx.split(pretraining_model(cfg, rngs=nnx.Rngs(0)))
  model = evaluators.Model(graphdef, params, cfg)
  a, b = heldout.run(model), heldout.run(model)
  assert a == b
  other = nnx.split(pretraining_model(cfg, rngs=nnx.Rngs(1)))[1]
  assert heldout.run(evaluators.Model(graphdef, other, cfg)) != a


def test_probe_defaults_are_the_probe_programs():
  """A probe block names only what it changes: the rest is what `stmem probe` uses by default."""
  import configs.probe as probe_config
  from stmem import evaluators
  c = probe_config.get_config(probe_config.PRESETS[0])  # the file's defaults
  for key, value in evaluators.PROBE_DEFAULTS.items():
    if key in ("tasks", "lead_sets"):  # an evaluator probes the simulator's classes on 12 leads unless told
      continue
    if key == "heads":  # the shared preset (the first) fits both heads; the file's default, and an evaluator's, is
      assert c[key] == "linear,mlp" and probe_config.get_config("test")[key] == value  # the linear one
      continue
    assert c[key] == value, key
