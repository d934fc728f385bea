"""The linear probe: logistic regression, L2 chosen on validation, lead sets fed by name, the contract check."""
import dataclasses

import numpy as np
import pytest

from stmem import scoring
from data_pipelines.contract import Contract, ContractMismatch
from stmem import linear_heads
from tests.helpers import tiny_checkpoint


def test_logistic_regression_recovers_separable_problem():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 1))
  x = rng.normal(size=(300, 16)) * 3 + 5  # standardisation must undo the offset and scale
  y = (x @ w - (5 * w.sum()) > 0).astype(np.float32)
  heads = linear_heads.fit(x[:200], y[:200], l2s=(1e-2,), steps=100)
  p = heads[0].predict(x[200:])
  assert scoring.auroc(y[200:, 0], p[:, 0]) > 0.97
  assert ((p[:, 0] > 0.5) == (y[200:, 0] > 0)).mean() > 0.9
  direction = heads[0].w[:, 0] / heads[0].std
  assert np.corrcoef(direction, w[:, 0])[0, 1] > 0.9


def test_multiclass_softmax():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(3, 8)) * 4
  c = rng.integers(0, 3, 200)
  x = centres[c] + rng.normal(size=(200, 8))
  y = np.eye(3, dtype=np.float32)[c]
  head = linear_heads.fit(x, y, l2s=(1e-2,), kind="multiclass", steps=60)[0]
  p = head.predict(x)
  np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
  assert (p.argmax(1) == c).mean() > 0.95


def test_l2_is_chosen_on_validation():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(120, 20))
  y = (x[:, :1] + 0.3 * rng.normal(size=(120, 1)) > 0).astype(np.float32)
  grid = (1e-3, 1e-1, 10.0, 1000.0)
  heads = linear_heads.fit(x[:80], y[:80], l2s=grid, steps=60)
  # Validation drawn like training: a weak penalty wins. Validation with labels flipped: the strongest penalty
  # (predictions nearest 0.5) has the least loss, so only validation can have chosen it.
  good, _ = linear_heads.select(heads, x[80:], y[80:], on="loss")
  flipped, scores = linear_heads.select(heads, x[80:], 1 - y[80:], on="loss")
  assert good.l2 < 10.0
  assert flipped.l2 == 1000.0 and np.argmax(scores) == 3


def test_fold_weights_equal_separate_fits():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(60, 5))
  y = (x[:, :1] > 0).astype(np.float32)
  w = np.zeros((2, 60))
  w[0, :30] = 1
  w[1, 30:] = 1
  folds = linear_heads.fit_folds(x, y, w, l2s=(0.1,), steps=40)
  alone = linear_heads.fit(x[30:], y[30:], l2s=(0.1,), steps=40)[0]
  np.testing.assert_allclose(folds[1][0].predict(x), alone.predict(x), atol=1e-4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def synthetic_pool():
  from stmem import data
  pool = data.open_pool(data.DatasetSpec("synthetic", num_synthetic=12, seed=0), Contract())
  return pool, None


def test_lead_set_in_any_order_is_fed_by_name(ckpt, synthetic_pool):
  from stmem import features, sharding
  loaded = features.load_encoder(ckpt)
  pool, _ = synthetic_pool
  mesh = sharding.make_mesh([("data", -1)])  # the probe's pass: every batch split over the 8 test devices
  a = features.extract({"m": loaded}, pool.source, pool.contract, lead_set="V2+I+aVF", batch_size=4, mesh=mesh)
  b = features.extract({"m": loaded}, pool.source, pool.contract, lead_set="I+aVF+V2", batch_size=4, mesh=mesh)
  c = features.extract({"m": loaded}, pool.source, pool.contract, lead_set="I+II+V2", batch_size=4, mesh=mesh)
  np.testing.assert_allclose(a["features"]["m"], b["features"]["m"], atol=2e-5)
  assert np.abs(a["features"]["m"] - c["features"]["m"]).max() > 1e-3
  assert list(a["record_id"]) == list(pool.record_id)
  # Block 1 of this one-block encoder is its last: the usual pooled feature, from the same pass.
  d = features.extract({"m": loaded}, pool.source, pool.contract, lead_set="I+aVF+V2", batch_size=4,
                       blocks=("1", "last"), mesh=mesh)
  np.testing.assert_allclose(d["blocks"]["1"]["m"], b["features"]["m"], atol=2e-5)
  np.testing.assert_array_equal(d["blocks"]["last"]["m"], d["features"]["m"])


def test_contract_mismatch_refused_or_adapted(synthetic_pool):
  from stmem import features
  pool, _ = synthetic_pool
  with pytest.raises(ContractMismatch, match="units"):
    features.adapt(Contract(), dataclasses.replace(pool.contract, units="uV"), pool.source)
  with pytest.raises(ContractMismatch, match="never saw"):
    features.adapt(dataclasses.replace(Contract(), leads=("I", "II")), pool.contract, pool.source, "I+V1")
  # Data at 500 Hz for a 250 Hz checkpoint: resampled on read.
  # (as `stmem prepare --fs 500` writes it: 9 s windows of 4500 samples in 10 s records of 5000)
  fast = dataclasses.replace(pool.contract, fs=500.0, window=4500, record_samples=5000)

  class Doubled:
    def __len__(self):
      return len(pool.source)

    def __getitem__(self, i):
      ex = dict(pool.source[i])
      ex["signal"] = np.repeat(ex["signal"], 2, axis=-1)
      return ex

  source, contract, notes = features.adapt(Contract(), fast, Doubled())
  assert contract.fs == 250.0 and contract.record_samples == 2500 and contract.window == 2250
  assert any("fs" in n for n in notes) and any("window" in n for n in notes)
  assert source[0]["signal"].shape == (12, 2500)


def test_probe_program_on_synthetic(ckpt, tmp_path):
  import json

  from stmem.programs import probe
  out = tmp_path / "probe"
  rc = probe.main(["--config", f"{probe.DEFAULT_CONFIG}:synthetic", f"--config.init_from={ckpt}",
                   "--config.lead_sets=V2+I+aVF", "--config.data.num_synthetic=120", "--config.bootstrap=50",
                   "--config.lbfgs_steps=20", "--config.l2_grid=(0.01,1.0)", "--workdir", str(out)])
  assert rc == 0
  rows = json.loads((out / "report.json").read_text())["rows"]
  assert {r["model"] for r in rows} == {"checkpoint", "random init"}
  # the synthetic preset scores every record by patient-grouped cross-validation (use_splits=False)
  assert all(r["lead_set"] == "V2+I+aVF" and "patient-grouped cross-validation" in r["protocol"] for r in rows)
  assert all(r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"] for r in rows)
  for name in ("report.md", "report.csv", "auroc_synthetic.png", "roc_synthetic.png"):
    assert (out / name).stat().st_size > 0


def _deep_encoder():
  from flax import nnx

  from stmem.models import Encoder, model_config
  return Encoder(model_config("tiny", width=32, depth=3, num_heads=1), rngs=nnx.Rngs(0))


def test_block_features_are_the_blocks_outputs_pooled(ckpt):
  """Features of block 2 and of blocks 1-3 (one forward pass) equal the same pooling applied to the outputs of
  the encoder's blocks run one by one, and differ from the last block's."""
  import jax.numpy as jnp
  from flax import nnx

  from stmem import features
  encoder = _deep_encoder()
  rng = np.random.default_rng(0)
  signal = rng.normal(size=(2, 12, 750)).astype(np.float32)
  lead_ids = np.tile(np.arange(12, dtype=np.int32), (2, 1))
  lead_mask = np.ones((2, 12), bool)
  lead_mask[1, 3:] = False  # the second ECG has leads I, II, III only
  fn = features.feature_fn(("last", "2", "1-3", "mid"))
  got = fn(*nnx.split(encoder), signal, lead_ids, lead_mask)

  # By hand: the tokens through block 1, 2, 3 in turn (row i of the stacked parameters is block i + 1).
  x = encoder.add_sep_and_leads(encoder.embed_patches(jnp.asarray(signal)), jnp.asarray(lead_ids))
  b, l, s, d = x.shape
  h = x.reshape(b, l * s, d)
  key_mask = jnp.repeat(jnp.asarray(lead_mask), s, axis=1)
  graphdef, stacked = nnx.split(encoder.blocks)
  pooled = []
  for i in range(3):
    h = nnx.merge(graphdef, _row(stacked, i))(h, key_mask, None)
    patch = np.asarray(h).reshape(b, l, s, d)[:, :, 1:-1]
    mean = (patch * lead_mask[:, :, None, None]).sum(axis=(1, 2)) / (lead_mask.sum(1)[:, None] * patch.shape[2])
    pooled.append(np.asarray(encoder.norm(jnp.asarray(mean))))
  np.testing.assert_allclose(got["blocks"]["2"], pooled[1], atol=1e-4)
  np.testing.assert_allclose(got["blocks"]["mid"], pooled[1], atol=1e-4)  # (3 + 1) // 2
  np.testing.assert_allclose(got["blocks"]["1-3"], np.mean(pooled, axis=0), atol=1e-4)
  np.testing.assert_allclose(got["blocks"]["last"], pooled[2], atol=1e-4)
  np.testing.assert_array_equal(got["blocks"]["last"], got["pooled"])
  assert np.abs(got["blocks"]["2"] - got["pooled"]).max() > 1e-2
  assert np.abs(got["blocks"]["1-3"] - got["pooled"]).max() > 1e-2


def test_block_features_of_mtae_and_mlae_are_pooled_as_their_last():
  """MTAE / MLAE blocks (CLS first, no SEPs) are pooled as their encoders pool the last block: block `depth` is
  `last`, and an earlier block differs."""
  from flax import nnx

  from stmem import features
  from stmem.models import encoder_model, model_config
  rng = np.random.default_rng(1)
  signal = rng.normal(size=(2, 12, 2250)).astype(np.float32)
  lead_ids = np.tile(np.arange(12, dtype=np.int32), (2, 1))
  for method in ("mtae", "mlae"):
    encoder = encoder_model(model_config("tiny", width=32, depth=2, num_heads=1, method=method), rngs=nnx.Rngs(0))
    got = features.feature_fn(("1", "2"))(*nnx.split(encoder), signal, lead_ids, np.ones((2, 12), bool))
    np.testing.assert_allclose(got["blocks"]["2"], got["pooled"], atol=1e-4, err_msg=method)
    assert np.abs(got["blocks"]["1"] - got["pooled"]).max() > 1e-2, method


def _row(state, i):
  import jax
  return jax.tree.map(lambda leaf: leaf[i], state)


def test_bad_block_specs_are_one_line_usage_errors(ckpt, tmp_path, capsys):
  from data_pipelines.errors import UsageError
  from stmem import features, programs
  assert features.parse_blocks("last, mid,4-8,12", depth=12) == ["last", "mid", "4-8", "12"]
  assert features.block_numbers("mid", 12) == (6,) and features.block_numbers("4-8", 12) == (4, 5, 6, 7, 8)
  for bad in ("13", "0", "8-4", "4:8", "-2", "first", "2-14"):
    with pytest.raises(UsageError, match=f"bad block spec '{bad}' of a model of depth 12"):
      features.parse_blocks(f"last,{bad}", depth=12)
  assert programs.run(["probe", "--config", "probe:synthetic", f"--config.init_from={ckpt}", "--config.blocks=last,2",
                       "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.strip().splitlines()  # the checkpoint's log line, then the error
  assert [line for line in err if "error:" in line] == err[-1:], err
  assert "--config.blocks: bad block spec '2' of a model of depth 1; use last, mid, K or A-B" in err[-1], err
  assert programs.run(["probe", "--config", "probe:synthetic", f"--config.init_from={ckpt}",
                       "--config.heads=linear,svm", "--workdir", str(tmp_path / "w")]) == 2
  assert "--config.heads='linear,svm'" in capsys.readouterr().err
  assert programs.run(["probe", "--config", "probe:synthetic", f"--config.init_from={ckpt}", "--config.heads=mlp",
                       "--config.mlp_snapshots=3", "--workdir", str(tmp_path / "w")]) == 2
  assert "--config.mlp_snapshots=3" in capsys.readouterr().err


def test_mlp_head_beats_linear_on_xor_and_ties_on_a_linear_problem():
  from stmem import mlp_head
  rng = np.random.default_rng(5)
  x = rng.normal(size=(400, 6))
  tr, va, te = slice(0, 200), slice(200, 300), slice(300, 400)

  def scored(y, fit):
    head, _ = linear_heads.select(fit(x[tr], y[tr]), x[va], y[va])
    return scoring.auroc(y[te, 0], head.predict(x[te])[:, 0]), head

  linear = lambda x, y: linear_heads.fit(x, y, l2s=(1e-2, 1.0), steps=30)  # noqa: E731
  mlp = lambda x, y: mlp_head.fit(x, y, seed=0, hidden=64, steps=160)  # noqa: E731
  xor = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.float32)[:, None]
  lin_xor, _ = scored(xor, linear)
  mlp_xor, head = scored(xor, mlp)
  assert lin_xor < 0.65 and mlp_xor > 0.9, (lin_xor, mlp_xor)
  assert head.steps in (40, 80, 120, 160) and head.l2 in mlp_head.L2_GRID  # chosen among the snapshots and grid
  w = rng.normal(size=(6, 1))
  plane = (x @ w + 0.5 * rng.normal(size=(400, 1)) > 0).astype(np.float32)
  lin_plane, _ = scored(plane, linear)
  mlp_plane, _ = scored(plane, mlp)
  assert lin_plane > 0.9 and abs(mlp_plane - lin_plane) < 0.03, (lin_plane, mlp_plane)
  # deterministic from the seed; another seed, another initialisation
  again = mlp_head.fit(x[tr], xor[tr], seed=0, hidden=64, steps=160)
  np.testing.assert_array_equal(again[0].w1, mlp(x[tr], xor[tr])[0].w1)
  assert not np.array_equal(mlp_head.fit(x[tr], xor[tr], seed=1, hidden=64, steps=160)[0].w1, again[0].w1)
