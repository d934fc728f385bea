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
  # The last k blocks: k=1 is the usual pooled feature.
  d = features.extract({"m": loaded}, pool.source, pool.contract, lead_set="I+aVF+V2", batch_size=4, last_blocks=1,
                       mesh=mesh)
  np.testing.assert_allclose(d["features"]["m"], b["features"]["m"], atol=2e-5)


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
