"""Unit tests of the model: masking, shapes of every variant, lead identity, padding, parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmem.models import Encoder, StMem, VARIANTS, model_config
from stmem.models import masking


@nnx.jit(static_argnums=(4,))
def _features(encoder, x, ids, present=None, what="pooled"):
  return encoder.features(x, ids, present)[what]


@nnx.jit
def _loss(model, x, ids, present, noise):
  return model(x, ids, present, noise=noise)["loss"]


def _params(module) -> int:
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


# -- masking ---------------------------------------------------------------------------------------------------------
def test_masking_keeps_exact_count_per_lead():
  noise = masking.noise_for(jax.random.key(0), 4, 12, 30)
  keep, mask, ids_restore = masking.per_lead_masking(noise, int(30 * (1 - 0.75)))
  assert keep.shape == (4, 12, 7)
  np.testing.assert_array_equal(np.asarray(mask.sum(-1)), np.full((4, 12), 23))
  # the kept indices are exactly the unmasked positions
  kept_from_mask = np.sort(np.argwhere(np.asarray(mask) == 0)[:, 2].reshape(4, 12, 7), axis=-1)
  np.testing.assert_array_equal(np.sort(np.asarray(keep), -1), kept_from_mask)
  # ids_restore inverts the shuffle
  shuffle = np.argsort(np.asarray(noise), -1)
  np.testing.assert_array_equal(np.take_along_axis(shuffle, np.asarray(ids_restore), -1),
                                np.broadcast_to(np.arange(30), (4, 12, 30)))


def test_masking_is_independent_across_leads_and_deterministic_by_key():
  noise = masking.noise_for(jax.random.key(1), 8, 12, 30)
  _, mask, _ = masking.per_lead_masking(noise, 7)
  mask = np.asarray(mask)
  patterns = {mask[b, l].tobytes() for b in range(8) for l in range(12)}
  assert len(patterns) > 90  # 96 lead rows, C(30, 7) ~ 2e6 patterns: repeats would mean shared masks
  _, again, _ = masking.per_lead_masking(masking.noise_for(jax.random.key(1), 8, 12, 30), 7)
  np.testing.assert_array_equal(mask, np.asarray(again))
  _, other, _ = masking.per_lead_masking(masking.noise_for(jax.random.key(2), 8, 12, 30), 7)
  assert not np.array_equal(mask, np.asarray(other))


def test_model_masks_with_key():
  cfg = model_config("tiny")
  model = StMem(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.window))
  ids = jnp.tile(jnp.arange(12), (2, 1))
  run = nnx.jit(lambda m, x, ids, key: m(x, ids, key=key))
  a = run(model, x, ids, jax.random.key(5))
  b = run(model, x, ids, jax.random.key(5))
  c = run(model, x, ids, jax.random.key(6))
  np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
  assert not np.array_equal(np.asarray(a["mask"]), np.asarray(c["mask"]))
  with pytest.raises(ValueError):
    model(x, ids)


# -- shapes of every variant -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shapes_of_every_variant(variant):
  cfg = model_config(variant)

  def run(x, ids):
    model = StMem(cfg, rngs=nnx.Rngs(0))
    out = model(x, ids, key=jax.random.key(0))
    feats = model.encoder.features(x, ids, blocks=(0, -1))
    return out, feats

  x = jax.ShapeDtypeStruct((2, 12, cfg.window), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 12), jnp.int32)
  out, feats = jax.eval_shape(run, x, ids)
  k = cfg.num_keep
  assert out["loss"].shape == ()
  assert out["pred"].shape == (2, 12, 30, 75)
  assert out["mask"].shape == (2, 12, 30)
  assert out["latent"].shape == (2, 12, k + 2, cfg.width)
  assert feats["pooled"].shape == (2, cfg.width)
  assert feats["per_lead"].shape == (2, 12, cfg.width)
  assert feats["tokens"].shape == (2, 12, 30, cfg.width)
  assert sorted(feats["blocks"]) == [0, cfg.depth - 1]
  assert feats["blocks"][0].shape == (2, 12, 32, cfg.width)


def test_parameter_counts_equal_the_reference():
  # Counted as the reference's state dict does: fixed sin-cos tables included, the shared patch embedding once.
  small = nnx.eval_shape(lambda: Encoder(model_config("small"), rngs=nnx.Rngs(0)))
  base = nnx.eval_shape(lambda: Encoder(model_config("base"), rngs=nnx.Rngs(0)))
  full = nnx.eval_shape(lambda: StMem(model_config("base"), rngs=nnx.Rngs(0)))
  assert _params(small) == 21_341_718
  assert _params(base) == 85_150_614
  assert _params(full) == 88_534_753


# -- lead identity and padding -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
  return Encoder(model_config("tiny"), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def ecg():
  return jax.random.normal(jax.random.key(9), (3, 12, 2250))


def test_lead_order_invariance(encoder, ecg):
  ids = jnp.tile(jnp.arange(12), (3, 1))
  perm = np.random.default_rng(0).permutation(12)
  a = _features(encoder, ecg, ids)
  b = _features(encoder, ecg[:, perm], ids[:, perm])
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # ...and the ids matter: the same signals with the wrong lead identities give other features
  c = _features(encoder, ecg[:, perm], ids)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_subset_in_any_order_uses_lead_identity(encoder, ecg):
  # V2, I, aVF fed in that order equal I, aVF, V2 in standard order
  chosen = [7, 0, 5]
  a = _features(encoder, ecg[:, chosen], jnp.tile(jnp.asarray(chosen), (3, 1)))
  order = sorted(chosen)
  b = _features(encoder, ecg[:, order], jnp.tile(jnp.asarray(order), (3, 1)))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_padding_equivalence_and_mixed_lead_sets(encoder, ecg):
  ids = jnp.tile(jnp.arange(12), (3, 1))
  present = np.ones((3, 12), bool)
  present[0, 6:] = False            # row 0: limb leads only
  present[1, [0, 3, 8, 11]] = False  # row 1: a scattered subset
  padded = np.asarray(ecg).copy()
  padded[~present] = 123.0          # whatever sits in an absent slot must not matter
  pooled = _features(encoder, jnp.asarray(padded), ids, jnp.asarray(present))
  per_lead = _features(encoder, jnp.asarray(padded), ids, jnp.asarray(present), "per_lead")
  for row in range(3):
    leads = np.flatnonzero(present[row])
    alone = (ecg[row:row + 1, leads], jnp.asarray(leads)[None])
    np.testing.assert_allclose(np.asarray(pooled[row]), np.asarray(_features(encoder, *alone)[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(per_lead[row, leads]),
                               np.asarray(_features(encoder, *alone, None, "per_lead")[0]), atol=1e-5)


def test_absent_leads_take_no_part_in_the_loss():
  cfg = model_config("tiny")
  model = StMem(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 12, cfg.window))
  ids = jnp.arange(12)[None]
  present = jnp.asarray([[True] * 6 + [False] * 6])
  noise = masking.noise_for(jax.random.key(1), 1, 12, 30)
  a = _loss(model, x, ids, present, noise)
  b = _loss(model, x[:, :6], ids[:, :6], None, noise[:, :6])
  np.testing.assert_allclose(float(a), float(b), atol=1e-5)


def test_xavier_uniform_linears_with_zero_bias():
  model = StMem(model_config("tiny"), rngs=nnx.Rngs(0))
  blocks = model.encoder.blocks  # stacked: block i is row i of each parameter
  for name, kernel, bias in [("qkv block 0", blocks.attn.qkv.kernel[0], blocks.attn.qkv.bias[0]),
                             ("fc1 block 1", blocks.mlp.fc1.kernel[1], blocks.mlp.fc1.bias[1]),
                             ("decoder fc2", model.decoder_blocks.mlp.fc2.kernel[0], model.decoder_blocks.mlp.fc2.bias[0]),
                             ("patch", model.encoder.patch_linear.kernel[...], model.encoder.patch_linear.bias[...]),
                             ("head", model.decoder_head.kernel[...], model.decoder_head.bias[...])]:
    kernel = np.asarray(kernel)
    limit = np.sqrt(6.0 / sum(kernel.shape))  # the fused q/k/v counts as one (D, 3D) matrix
    assert np.abs(kernel).max() <= limit, name
    assert np.abs(kernel).max() > 0.95 * limit, name
    np.testing.assert_allclose(kernel.var(), limit ** 2 / 3, rtol=0.1)
    assert not np.asarray(bias).any(), name
  # Each block is initialised independently, not as copies of one.
  assert not np.allclose(np.asarray(blocks.attn.qkv.kernel[0]), np.asarray(blocks.attn.qkv.kernel[1]))


def test_gelu_is_exact_and_norm_epsilons():
  model = StMem(model_config("tiny"), rngs=nnx.Rngs(0))
  assert model.encoder.norm.epsilon == 1e-5
  blocks = model.encoder.blocks
  assert blocks.attn_norm.epsilon == 1e-5 and blocks.mlp_norm.epsilon == 1e-5
  assert model.decoder_norm.epsilon == 1e-6
  # sin-cos table: SEP rows zero, patch rows sin half then cos half
  pos = np.asarray(model.encoder.pos_embedding[...])
  assert not pos[0].any() and not pos[-1].any()
  np.testing.assert_allclose(pos[1 + 3, :64], np.sin(3 / 10000 ** (np.arange(64) / 64)), atol=1e-6)
  np.testing.assert_allclose(pos[1 + 3, 64:], np.cos(3 / 10000 ** (np.arange(64) / 64)), atol=1e-6)


def test_branch_scale_zero_skips_a_block_and_one_changes_nothing():
  # Drop path multiplies residual branches: a block whose two branches are scaled by 0 is the identity.
  cfg = model_config("tiny")
  enc = Encoder(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.window))
  ids = jnp.tile(jnp.arange(12), (2, 1))
  tokens = enc.add_sep_and_leads(enc.embed_patches(x), ids)
  plain, _ = enc.run_blocks(tokens, None)
  ones, _ = enc.run_blocks(tokens, None, branch_scale=jnp.ones((cfg.depth, 2, 2)))
  np.testing.assert_allclose(np.asarray(ones), np.asarray(plain), atol=1e-6)
  skip_last = jnp.ones((cfg.depth, 2, 2)).at[-1].set(0.0)
  first_only, captured = enc.run_blocks(tokens, None, capture=(0,), branch_scale=skip_last)
  np.testing.assert_allclose(np.asarray(first_only), np.asarray(captured[0]), atol=1e-6)
  assert np.abs(np.asarray(first_only) - np.asarray(plain)).max() > 1e-3


def test_unrolled_blocks_compute_what_the_scan_computes():
  """`scan_blocks=False` (the FLOP count's form) is a setting of one model: the same parameters give the same loss
  and features as the scanned default, and a model built afterwards still scans."""
  cfg = model_config("tiny")
  assert cfg.scan_blocks
  scanned = StMem(cfg, rngs=nnx.Rngs(0))
  loop = StMem(cfg.replace(scan_blocks=False), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, cfg.window))
  ids = jnp.tile(jnp.arange(12), (2, 1))
  present = jnp.ones((2, 12), bool)
  noise = jax.random.uniform(jax.random.key(2), (2, 12, cfg.num_patches))
  np.testing.assert_allclose(float(_loss(loop, x, ids, present, noise)), float(_loss(scanned, x, ids, present, noise)),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(_features(loop.encoder, x, ids)), np.asarray(_features(scanned.encoder, x, ids)),
                             atol=1e-5)
  text = lambda m: jax.jit(lambda x: m.encoder.features(x, ids)["pooled"]).lower(x).as_text()  # noqa: E731
  assert "while" in text(scanned) and "while" not in text(loop)  # the loop really is unrolled
  assert model_config("tiny").scan_blocks


def test_a_row_with_no_present_lead_stays_finite():
  # Evaluation pads batches with rows whose every slot is absent; their features are discarded, but a NaN there
  # would still poison batch-wide reductions.
  enc = Encoder(model_config("tiny"), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 3, 2250))
  ids = jnp.asarray([[0, 1, 2]] * 2)
  present = jnp.asarray([[True, True, False], [False, False, False]])
  feats = enc.features(x, ids, present)
  for name in ("pooled", "per_lead", "tokens"):
    assert np.isfinite(np.asarray(feats[name])).all(), name


# -- hand-written gradients (memory-lean residuals) equal the derived ones -----------------------------------------
def test_layer_norm_equals_nnx_layer_norm_in_value_and_gradient():
  from stmem.models.layers import LayerNorm
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 96)) * 2 + 1, jnp.float32)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)  # a loss whose gradient is not constant
  ours = LayerNorm(96, eps=1e-6)
  theirs = nnx.LayerNorm(96, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0))
  scale, bias = (jnp.asarray(rng.normal(size=96), jnp.float32) for _ in range(2))
  for norm in (ours, theirs):
    norm.scale.value, norm.bias.value = scale, bias
  assert (np.asarray(ours(x)) == np.asarray(theirs(x))).all()  # bit for bit: same order of operations
  loss = lambda norm, x: (norm(x) * weights).sum()
  (d_ours, dx_ours), (d_theirs, dx_theirs) = (nnx.grad(loss, argnums=(0, 1))(n, x) for n in (ours, theirs))
  np.testing.assert_allclose(np.asarray(dx_ours), np.asarray(dx_theirs), atol=2e-5)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(np.asarray(d_ours[name].value), np.asarray(d_theirs[name].value), rtol=1e-5,
                               atol=1e-5)


def test_gelu_and_softmax_gradients_equal_jax_derived_ones():
  from stmem.models.layers import gelu, softmax
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 6, 9)) * 3, jnp.float32)
  x = x.at[0, :, 4:].add(-1e30)  # masked keys, as attention adds them
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  for ours, reference in ((gelu, lambda v: jax.nn.gelu(v, approximate=False)),
                          (softmax, lambda v: jax.nn.softmax(v, axis=-1))):
    v = x if ours is softmax else jnp.clip(x, -10, 10)
    assert (np.asarray(ours(v)) == np.asarray(reference(v))).all()
    g_ours = jax.grad(lambda v: (ours(v) * w).sum())(v)
    g_reference = jax.grad(lambda v: (reference(v) * w).sum())(v)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_reference), atol=1e-5)
