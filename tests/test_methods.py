"""The paper's baselines MTAE (time tokens over all leads) and MLAE (whole-lead tokens) beside ST-MEM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.contract import Contract
from tests.helpers import embed_arrays
from stmem.models import (BaselineEncoder, LeadSetRefused, MaskedAutoencoder, StMem, encoder_model, model_config,
                          pretraining_model)

SMALL = dict(width=64, depth=1, num_heads=1, decoder_width=64, decoder_depth=1, decoder_heads=1)
LEADS12 = np.tile(np.arange(12, dtype=np.int32), (3, 1))


def _params(module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module")
def ecg():
  return np.asarray(jax.random.normal(jax.random.key(0), (3, 12, 2250)), np.float32)


@pytest.mark.parametrize("method", ["mtae", "mlae"])
def test_parameter_counts_for_base_equal_the_reference(method):
  # The reference's counts include its fixed position tables (31 or 13 rows, CLS row included) as tensors, and so
  # do ours (Params frozen by the optimiser); everything else is the same layer list, so the counts agree exactly.
  full = nnx.eval_shape(lambda: pretraining_model(model_config("base", method=method), rngs=nnx.Rngs(0)))
  assert isinstance(full, MaskedAutoencoder)
  assert _params(full) == {"mtae": 89_371_788, "mlae": 90_739_806}[method]
  # ST-MEM's own patch embedding is 75 -> D; MTAE's is 900 -> D and MLAE's 2,250 -> D.
  assert full.encoder.patch_linear.kernel.shape == ({"mtae": 900, "mlae": 2250}[method], 768)


@pytest.mark.parametrize("method,tokens,masked", [("mtae", 30, 23), ("mlae", 12, 9)])
def test_shapes_and_masking_counts(method, tokens, masked, ecg):
  cfg = model_config("tiny", method=method, **SMALL)
  model = pretraining_model(cfg, rngs=nnx.Rngs(0))
  out = model(ecg, LEADS12, np.ones((3, 12), bool), key=jax.random.key(1))
  size = {"mtae": 900, "mlae": 2250}[method]
  assert out["token_pred"].shape == (3, tokens, size) and out["token_mask"].shape == (3, tokens)
  np.testing.assert_array_equal(np.asarray(out["token_mask"]).sum(axis=1), masked)
  assert out["latent"].shape == (3, 1 + tokens - masked, 64)           # CLS + the kept tokens
  assert out["pred"].shape == (3, 12, 30, 75) and out["mask"].shape == (3, 12, 30)
  mask = np.asarray(out["mask"])
  if method == "mtae":  # a masked time token hides that window in every lead
    assert (mask == mask[:, :1]).all()
  else:                 # a masked lead token hides the whole lead
    assert (mask == mask[:, :, :1]).all()
  # Different ECGs of a batch get different masks.
  assert not np.array_equal(np.asarray(out["token_mask"][0]), np.asarray(out["token_mask"][1]))
  f = model.encoder.features(ecg, LEADS12, np.ones((3, 12), bool))
  assert f["pooled"].shape == (3, 64) and f["per_lead"].shape == (3, 12, 64)
  assert f["tokens"].shape == ((3, 1, 30, 64) if method == "mtae" else (3, 12, 1, 64))


def _tokens_by_hand(signal, method):
  """Tokens written out from their definition (MTAE: window t of leads 0..11 in turn; MLAE: lead l)."""
  if method == "mlae":
    return signal
  return np.stack([signal[:, :, t * 75:(t + 1) * 75].reshape(signal.shape[0], -1) for t in range(30)], axis=1)


@pytest.mark.parametrize("method", ["mtae", "mlae"])
def test_loss_is_norm_pix_over_masked_tokens(method, ecg):
  model = pretraining_model(model_config("tiny", method=method, **SMALL), rngs=nnx.Rngs(0))
  out = model(ecg, LEADS12, None, key=jax.random.key(2))
  tokens = _tokens_by_hand(ecg.astype(np.float64), method)
  target = (tokens - tokens.mean(-1, keepdims=True)) / np.sqrt(tokens.var(-1, ddof=1, keepdims=True) + 1e-6)
  per_token = ((np.asarray(out["token_pred"], np.float64) - target) ** 2).mean(-1)
  m = np.asarray(out["token_mask"], np.float64)
  np.testing.assert_allclose(float(out["loss"]), (per_token * m).sum() / m.sum(), rtol=1e-5)


@pytest.mark.parametrize("method", ["mtae", "mlae"])
def test_slots_in_any_order_give_the_same_features(method, ecg):
  enc = encoder_model(model_config("tiny", method=method, **SMALL), rngs=nnx.Rngs(0))
  perm = np.random.default_rng(0).permutation(12)
  a = enc.features(ecg, LEADS12)
  b = enc.features(ecg[:, perm], LEADS12[:, perm])
  np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(a["per_lead"])[:, perm], b["per_lead"], atol=1e-5)  # follows the slots


@pytest.mark.parametrize("method", ["mtae", "mlae"])
def test_non_12_lead_sets_are_refused(method, ecg):
  enc = encoder_model(model_config("tiny", method=method, **SMALL), rngs=nnx.Rngs(0))
  with pytest.raises(LeadSetRefused, match="needs all 12 leads.*lead set '12'"):
    enc.features(ecg[:, :6], LEADS12[:, :6])
  with pytest.raises(LeadSetRefused, match="got 1 lead slots"):
    jax.jit(lambda x, i: enc.features(x, i)["pooled"])(ecg[:, :1], LEADS12[:, :1])


@pytest.mark.parametrize("method", ["mtae", "mlae"])
def test_loss_decreases_over_a_few_steps_on_a_fixed_batch(method, ecg):
  import optax
  model = pretraining_model(model_config("tiny", method=method, **SMALL), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-3)
  noise = jax.random.uniform(jax.random.key(3), (3, 30 if method == "mtae" else 12))

  def loss_fn(p):
    return nnx.merge(graphdef, p)(ecg, LEADS12, None, noise=noise)["loss"]

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  losses = []
  for _ in range(15):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.fixture(scope="module")
def baseline_checkpoints(tmp_path_factory):
  from stmem.checkpoint import make_meta, save_params
  out = {}
  for method in ("mtae", "mlae"):
    cfg = model_config("tiny", method=method, **SMALL)
    model = pretraining_model(cfg, rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp(method) / "ckpt"
    save_params(path, nnx.state(model, nnx.Param).to_pure_dict(), make_meta(cfg, Contract(), origin="test"))
    out[method] = path
  return out


@pytest.mark.parametrize("method", ["mtae", "mlae"])
def test_checkpoint_records_the_method_and_embeds(method, baseline_checkpoints, ecg):
  from stmem import checkpoint as ckpt_lib
  from stmem import features
  model, meta = ckpt_lib.load_model(baseline_checkpoints[method])
  assert meta["model"]["method"] == method and isinstance(model, MaskedAutoencoder)
  loaded = features.load_encoder(baseline_checkpoints[method])
  assert isinstance(loaded.encoder, BaselineEncoder)
  assert isinstance(features.random_encoder(loaded).encoder, BaselineEncoder)  # the random twin is the same method
  out = embed_arrays(loaded, ecg, LEADS12[0], batch_size=2)
  direct = model.encoder.features(ecg, LEADS12, np.ones((3, 12), bool))
  np.testing.assert_allclose(out["pooled"], direct["pooled"], atol=1e-5)
  np.testing.assert_allclose(out["per_lead"], direct["per_lead"], atol=1e-5)


@pytest.mark.parametrize("method,grid", [("mtae", (1, 30)), ("mlae", (12, 1))])
def test_embed_program_exports_the_tokens_of_a_baseline(method, grid, baseline_checkpoints, tmp_path):
  # `stmem embed --per_patch`: MTAE's time tokens span all leads (one slot of 30), MLAE's are whole leads (12 of 1).
  from stmem.programs import embed
  prefix = str(tmp_path / "emb")
  assert embed.main(["--init_from", str(baseline_checkpoints[method]), "--num_synthetic", "3", "--out", prefix,
                     "--per_patch", "--no_progress"]) == 0
  z = np.load(prefix + ".npz")
  width = model_config("tiny", method=method, **SMALL).width
  assert z["per_patch"].shape == (3, *grid, width) and z["pooled"].shape == (3, width)
  assert z["window"].tolist() == [0, 0, 0]


def test_stmem_checkpoints_without_a_method_still_load(tmp_path):
  from stmem import checkpoint as ckpt_lib
  from stmem.checkpoint import make_meta, save_params
  cfg = model_config("tiny", **SMALL)
  meta = make_meta(cfg, Contract(), origin="test")
  del meta["model"]["method"]  # written before the field existed
  save_params(tmp_path / "ckpt", nnx.state(StMem(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict(), meta)
  assert isinstance(ckpt_lib.load_model(tmp_path / "ckpt")[0], StMem)


def test_probe_program_on_a_baseline_checkpoint(baseline_checkpoints, tmp_path):
  import json

  from stmem.programs import probe
  ckpt = baseline_checkpoints["mtae"]
  args = ["--config", f"{probe.DEFAULT_CONFIG}:synthetic", f"--config.init_from={ckpt}",
          "--config.data.num_synthetic=60", "--config.use_splits=False", "--config.cv_folds=3",
          "--config.bootstrap=50", "--config.lbfgs_steps=20"]
  assert probe.main(args + ["--config.lead_sets=12", "--workdir", str(tmp_path / "ok")]) == 0
  rows = json.loads((tmp_path / "ok" / "report.json").read_text())["rows"]
  assert {r["model"] for r in rows} == {"checkpoint", "random init"}
  assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)
  with pytest.raises(LeadSetRefused, match="needs all 12 leads"):
    probe.main(args + ["--config.lead_sets=I", "--workdir", str(tmp_path / "refused")])
