"""Fine-tuning a tiny model for a few steps on synthetic ECGs: a report, a checkpoint, selection on validation;
2N steps equal N steps, a SIGTERM and N resumed steps."""
import json
import signal

import numpy as np

from tests.helpers import tiny_checkpoint, truncate_largest_array_file


def test_finetune_writes_report_and_checkpoint(tmp_path, monkeypatch, opened):
  from stmem import checkpoint as ckpt_lib
  from stmem import features
  from stmem.programs import finetune
  ckpt = tiny_checkpoint(tmp_path / "ckpt")

  seen = []  # which records each evaluation pass reads
  original = features.eval_pass

  def spy(step, source, *args, **kwargs):
    seen.append(frozenset(np.asarray(source.indices).tolist()))
    return original(step, source, *args, **kwargs)

  monkeypatch.setattr(features, "eval_pass", spy)
  out = tmp_path / "ft"
  # On the 8 test devices: every batch is split over all of them.
  rc = finetune.main([f"--config={finetune.DEFAULT_CONFIG}:test", f"--config.init_from={ckpt}",
                      "--config.drop_path=0.1", "--config.optim.layer_decay=0.75", "--config.label_smoothing=0.1",
                      "--config.class_weighting=balanced", "--config.data.simulator=1", "--workdir", str(out)])
  assert rc == 0
  assert [s.source for s in opened] == ["synthetic"]  # read through stmem.data.open_pool (tests/test_programs_data.py)
  # Two evaluations on validation during training, validation again for thresholds, then test once, last.
  assert len(seen) == 4 and seen[0] == seen[1] == seen[2] and not (seen[3] & seen[0])
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [3, 6] and all("val_loss" in x and "test" not in str(x) for x in lines)
  row = json.loads((out / "report.json").read_text())["rows"][0]
  assert row["model"] == "fine-tuned" and row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
  encoder, meta = ckpt_lib.load_model(out / "checkpoints", encoder_only=True)
  assert meta["origin"] == "stmem finetune" and len(meta["head"]["label_names"]) == 6  # simulator 1's classes
  assert ckpt_lib.read_item(out / "checkpoints", "head")["kernel"].shape == (64, 6)
  assert meta["step"] in (3, 6)
  assert (out / "train_state" / "6" / "opt_state").is_dir() and any((out / "tensorboard").iterdir())


def test_resume_after_sigterm_equals_uninterrupted(tmp_path, monkeypatch):
  """6 steps straight == 3 steps, a SIGTERM (saved mid-way between evaluations) and 3 resumed steps: parameters to
  1e-6, the same best-so-far step and the same validation losses."""
  import jax

  from configs import finetune as finetune_config
  from stmem import checkpoint as ckpt_lib
  from stmem import data
  from stmem.programs import finetune
  n = 3
  c = finetune_config.get_config("test")
  c.init_from = str(tiny_checkpoint(tmp_path / "ckpt"))
  c.total_steps, c.eval_every, c.num_devices, c.checkpoint.async_save = 2 * n, 2, 1, True
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert finetune.run(c, straight, stop_after=2 * n)["step"] == 2 * n

  original = data.make_iterator

  class SigtermAt:
    """The training iterator; the real SIGTERM arrives while batch `at` is being read (i.e. during step `at`)."""

    def __init__(self, it, at):
      self.it, self.at, self.count = it, at, 0

    def __next__(self):
      self.count += 1
      if self.count == self.at:
        signal.raise_signal(signal.SIGTERM)
      return next(self.it)

    def get_state(self):
      return self.it.get_state()

  monkeypatch.setattr(data, "make_iterator",
                      lambda *a, **k: SigtermAt(original(*a, **k), n) if k.get("train") else original(*a, **k))
  first = finetune.run(c, resumed)
  assert first["preempted"] and first["step"] == n and (resumed / "train_state" / str(n)).is_dir()
  monkeypatch.setattr(data, "make_iterator", original)
  second = finetune.run(c, resumed, stop_after=2 * n)
  assert second["start_step"] == n and second["step"] == 2 * n

  def state(workdir):
    mngr = ckpt_lib.Checkpointer(workdir / "train_state", async_save=False)
    meta = mngr.manager.restore(2 * n, args=ckpt_lib.ocp.args.Composite(meta=ckpt_lib.ocp.args.JsonRestore()))
    mngr.close()
    return jax.tree.leaves(ckpt_lib.read_item(workdir / "train_state" / str(2 * n), "params")), meta["meta"]

  (a, meta_a), (b, meta_b) = state(straight), state(resumed)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-6)
  assert meta_a["best_step"] == meta_b["best_step"] >= 2
  losses = [{l["step"]: l["val_loss"] for l in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())}
            for w in (straight, resumed)]
  assert losses[0] == losses[1] and sorted(losses[0]) == [2, 4, 6]


def test_resumes_from_the_newest_readable_training_checkpoint(tmp_path, capsys):
  """A corrupt latest training checkpoint (a save cut short) is moved aside, said, and the one before it used."""
  from configs import finetune as finetune_config
  from stmem.programs import finetune
  c = finetune_config.get_config("test")
  c.init_from = str(tiny_checkpoint(tmp_path / "ckpt"))
  c.total_steps, c.eval_every, c.num_devices, c.checkpoint.async_save = 6, 2, 1, False
  workdir = tmp_path / "ft"
  assert finetune.run(c, workdir, stop_after=4)["step"] == 4
  states = workdir / "train_state"
  assert sorted(p.name for p in states.iterdir() if p.name.isdigit()) == ["2", "4"]
  truncate_largest_array_file(states / "4")
  capsys.readouterr()
  second = finetune.run(c, workdir, stop_after=6)
  err = capsys.readouterr().err
  assert "skipping unreadable checkpoint: checkpoint step 4" in err and str(states / "4" / "params") in err
  assert "resuming from step 2" in err
  assert second["start_step"] == 2 and second["step"] == 6
  assert (states / "6").is_dir() and (states / "4.unreadable").is_dir()  # the bad step kept aside, never deleted


def test_classifier_without_drop_path_is_the_encoder_plus_head():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from stmem.models import Classifier, Encoder, model_config
  from stmem.programs import finetune
  cfg = model_config("tiny", width=64, depth=2, num_heads=1)
  model = Classifier(Encoder(cfg, rngs=nnx.Rngs(0)), 3, drop_path=0.5, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (2, 3, 2250))
  ids = jnp.array([[0, 5, 7]] * 2)
  mask = jnp.array([[True, True, False], [True, True, True]])
  expected = model.head(model.encoder.features(x, ids, mask)["pooled"])
  np.testing.assert_allclose(model(x, ids, mask), expected, atol=1e-5)
  assert np.abs(np.asarray(model(x, ids, mask, jax.random.key(3)) - expected)).max() > 1e-4  # drop path on


def test_rand_augment_ops_keep_shape_and_absent_leads():
  from stmem import augment
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 2250)).astype(np.float32)
  mask = np.ones(12, bool)
  mask[3] = False
  x[3] = 0
  for name, op in augment.OPS.items():
    y = op(x, np.random.default_rng(1), 0.3)
    assert y.shape == x.shape, name
  np.testing.assert_array_equal(augment.OPS["flip"](x, rng, 0.3), -x)
  y = augment.rand_augment(x, np.random.default_rng(2), num_ops=8, prob=1.0, lead_mask=mask)
  assert not np.allclose(y, x) and np.all(y[3] == 0)
