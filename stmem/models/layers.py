"""Transformer pieces shared by the encoder and the decoder, and the fixed sin-cos table."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

xavier = nnx.initializers.xavier_uniform()
embedding_init = nnx.initializers.normal(0.02)


def sincos_table(num_patches: int, width: int) -> np.ndarray:
  """(num_patches + 2, width): row 0 and the last row (SEP slots) zero, row 1 + p the 1-D sin-cos code of patch p."""
  half = width // 2
  omega = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
  angles = np.arange(num_patches, dtype=np.float64)[:, None] * omega[None, :]
  table = np.zeros((num_patches + 2, width), np.float64)
  table[1:-1] = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return table.astype(np.float32)


def linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, kernel_init=xavier, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


def layer_norm(n: int, dtype, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.LayerNorm:
  return nnx.LayerNorm(n, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused q/k/v projection (q, k, v blocks, each head-major) and an output projection."""

  def __init__(self, width: int, num_heads: int, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qkv = linear(width, 3 * width, dtype, rngs)
    self.out = linear(width, width, dtype, rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    b, s, d = x.shape
    dtype = self.qkv.dtype or x.dtype
    bias = self.qkv.bias[...]
    # The key bias adds the same q.b_k to every score of a query, which the softmax ignores: its true gradient is
    # zero, and Adam would turn the float noise in it into random drift that depends on the device layout.
    bias = jnp.concatenate([bias[:d], jax.lax.stop_gradient(bias[d:2 * d]), bias[2 * d:]])
    qkv = jnp.dot(x.astype(dtype), self.qkv.kernel[...].astype(dtype)) + bias.astype(dtype)
    q, k, v = jnp.moveaxis(qkv.reshape(b, s, 3, self.num_heads, d // self.num_heads), 2, 0)
    # key_mask (B, S): absent leads' tokens are never attended to, so a padded row equals its unpadded self.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return self.out(y.reshape(b, s, d))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, dtype, rngs: nnx.Rngs):
    self.fc1 = linear(width, hidden, dtype, rngs)
    self.fc2 = linear(hidden, width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # exact (erf) GELU, as the reference


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, dtype, rngs: nnx.Rngs):
    self.attn_norm = layer_norm(width, dtype, rngs)
    self.attn = Attention(width, num_heads, dtype, rngs)
    self.mlp_norm = layer_norm(width, dtype, rngs)
    self.mlp = Mlp(width, mlp_ratio * width, dtype, rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), key_mask)
    return x + self.mlp(self.mlp_norm(x))


# Module switch, read at trace time: True runs stacks of blocks as a scan (fast on CPU, see run_stack), False as an
# unrolled Python loop. Both compute the same function.
SCAN_BLOCKS = True


def run_stack(blocks: Sequence[Block], h: jax.Array, key_mask: jax.Array | None = None, *,
              keep_all: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Apply identical blocks in order as one `lax.scan` over their parameters, stacked on the fly.

  Returns the last block's output and, with keep_all, every block's output stacked on a leading axis.

  Why a scan and not a Python loop: unrolled, XLA on CPU does not materialise the residual stream. It fuses the
  elementwise chain h_i = h_0 + (every branch output before block i) into each consumer, and in the backward pass
  recomputes that chain, transposed, inside the copy that feeds every weight-gradient matmul: on a 2-core CPU
  that was about 30 % of a base pretraining step. A scan's carry is a real buffer at every iteration, which cuts
  the chain at block boundaries. (`lax.optimization_barrier` does not help: the CPU pipeline drops it before
  fusion.) Stacking copies the blocks' weights once per call, a small cost next to the matmuls.
  """
  if not SCAN_BLOCKS:  # the plain loop, kept for FLOP counting (XLA's cost analysis counts a loop body once)
    outputs = []
    for block in blocks:
      h = block(h, key_mask)
      outputs.append(h)
    return h, (jnp.stack(outputs) if keep_all else None)
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.split(b)[1] for b in blocks])

  def body(h, state):
    h = nnx.merge(graphdef, state)(h, key_mask)
    return h, (h if keep_all else None)

  return jax.lax.scan(body, h, stacked)
