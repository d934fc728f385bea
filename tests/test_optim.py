"""The optimiser builder: frozen parameters, layer-wise learning-rate decay over stacked blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stmem.models import Encoder, model_config
from stmem import optim


def _first_update(params, **kw):
  # With zero weight decay, AdamW's first update of an element with gradient g is -lr * g / (|g| + eps): -lr for
  # g = 1, so the update shows each parameter's learning-rate multiplier directly.
  tx = optim.adamw(params, schedule=optax.constant_schedule(0.1), b1=0.9, b2=0.999, eps=1e-12, weight_decay=0.0,
                   **kw)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_layer_decay_scales_each_stacked_block_and_the_embeddings():
  cfg = model_config("tiny", depth=3)
  params = nnx.state(Encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
  up = _first_update(params, layer_decay=0.5, depth=3)
  fc1 = np.asarray(up["blocks"]["mlp"]["fc1"]["kernel"])  # (3, D, 4D): block i in row i
  for i in range(3):
    np.testing.assert_allclose(fc1[i], -0.1 * 0.5 ** (3 - i), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(up["blocks"]["attn_norm"]["scale"])[:, 0], -0.1 * 0.5 ** (3 - np.arange(3)),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(up["lead_embedding"]), -0.1 * 0.5 ** 4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(up["patch_linear"]["kernel"]), -0.1 * 0.5 ** 4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(up["norm"]["scale"]), -0.1, rtol=1e-5)  # final norm: undecayed


def test_frozen_parameters_do_not_move_and_no_decay_means_plain_adamw():
  cfg = model_config("tiny")
  params = nnx.state(Encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
  up = _first_update(params, frozen=(r"(.*/)?pos_embedding",))
  assert not np.asarray(up["pos_embedding"]).any()
  for leaf in jax.tree.leaves({k: v for k, v in up.items() if k != "pos_embedding"}):
    np.testing.assert_allclose(np.asarray(leaf), -0.1, rtol=1e-5)
