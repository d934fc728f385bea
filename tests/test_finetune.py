"""Fine-tuning a tiny model for a few steps on synthetic ECGs: a report, a checkpoint, selection on validation."""
import json

import numpy as np

from tests.helpers import tiny_checkpoint


def test_finetune_writes_report_and_checkpoint(tmp_path, monkeypatch):
  from stmem import checkpoint as ckpt_lib
  from stmem.train import features, finetune
  ckpt = tiny_checkpoint(tmp_path / "ckpt")

  seen = []  # which records each evaluation pass reads
  original = features.eval_batches

  def spy(source, *args, **kwargs):
    seen.append(frozenset(np.asarray(source.indices).tolist()))
    return original(source, *args, **kwargs)

  monkeypatch.setattr(features, "eval_batches", spy)
  out = tmp_path / "ft"
  rc = finetune.main([f"--config={finetune.DEFAULT_CONFIG}:test", f"--config.checkpoint={ckpt}",
                      "--config.drop_path=0.1", "--config.layer_decay=0.75", "--config.label_smoothing=0.1",
                      "--config.class_weighting=balanced", "--config.synthetic_n=120", "--workdir", str(out)])
  assert rc == 0
  # Two evaluations on validation during training, validation again for thresholds, then test once, last.
  assert len(seen) == 4 and seen[0] == seen[1] == seen[2] and not (seen[3] & seen[0])
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [3, 6] and all("val_loss" in x and "test" not in str(x) for x in lines)
  row = json.loads((out / "report.json").read_text())["rows"][0]
  assert row["model"] == "fine-tuned" and row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
  encoder, meta = ckpt_lib.load_model(out / "checkpoints", encoder_only=True)
  assert meta["origin"] == "stmem finetune" and len(meta["head"]["label_names"]) == 6
  assert ckpt_lib.read_item(out / "checkpoints", "head")["kernel"].shape == (64, 6)
  assert meta["step"] in (3, 6)


def test_classifier_without_drop_path_is_the_encoder_plus_head():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from stmem.models import Encoder, model_config
  from stmem.train import finetune
  cfg = model_config("tiny", width=64, depth=2, num_heads=1)
  model = finetune.Classifier(Encoder(cfg, rngs=nnx.Rngs(0)), 3, drop_path=0.5, rngs=nnx.Rngs(1))
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
