"""Transformer pieces shared by the encoder and the decoder, the fixed sin-cos table, and the one matrix product.

Precision: parameters and the residual stream are float32. Every Linear layer multiplies in the model's compute
dtype (`ModelConfig.dtype`) and accumulates and returns float32 (`matmul`); norms, GELU, softmax and the residual
adds stay float32. With compute dtype float32 this is plain float32 arithmetic.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

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


# ------------------------------------------------------------------------------------------------ the matrix product

_CONTRACT_LAST = (((1,), (0,)), ((), ()))  # (M, K) x (K, N)
_TILE = 64  # see _transposed


def _product(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _transposed(x: jax.Array) -> jax.Array:
  """x.T (K, M) as a real copy in memory.

  Why not `x.T`: XLA folds a transpose into the product that consumes it, and the CPU library it calls for products
  (YNNPACK) then receives an operand whose contracted axis is the major one. For bfloat16 it has no fast kernel for
  that layout and ran the weight-gradient products at half speed (164 against 415 GFLOP/s on the 2-core AMD EPYC,
  Zen 4).
  Splitting the kept axis before transposing leaves XLA no layout that makes the transpose free, so it writes the
  transposed copy, which costs far less than the slow product. Other backends' product libraries take either
  layout at full speed, so there the transpose stays free.
  """
  m, k = x.shape
  if k % _TILE:
    return x.T
  # Chosen by the platform the program is lowered for, not by the process's default backend: a TPU program compiled
  # ahead of time on a CPU host (`stmem plan`) must not carry the CPU's choice.
  return jax.lax.platform_dependent(
    x, cpu=lambda x: x.reshape(m, k // _TILE, _TILE).transpose(1, 2, 0).reshape(k, m), default=lambda x: x.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
  return _product(x.astype(compute_dtype), w.astype(compute_dtype), _CONTRACT_LAST)


def _matmul_fwd(x, w, compute_dtype):
  xc = x.astype(compute_dtype)
  # Keep the float32 weight (alive anyway as a parameter) and cast it again in the backward pass: saving the cast
  # copy would hold a second set of weights (170 MB for base in bfloat16) until the backward pass.
  return _product(xc, w.astype(compute_dtype), _CONTRACT_LAST), (xc, w)


def _matmul_bwd(compute_dtype, residuals, g):
  # Both gradient products also multiply in the compute dtype and accumulate in float32 (what mixed precision does
  # elsewhere); the gradients come out float32, never rounded to bfloat16.
  xc, w = residuals
  gc = g.astype(compute_dtype)
  dx = _product(gc, w.astype(compute_dtype), (((1,), (1,)), ((), ())))
  dw = _product(_transposed(xc), gc, _CONTRACT_LAST)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
  """x (..., K) @ w (K, N) -> float32 (..., N), multiplied in `compute_dtype` with float32 accumulation."""
  lead = x.shape[:-1]
  y = _matmul(x.reshape(-1, x.shape[-1]), w, jnp.dtype(compute_dtype))
  return y.reshape(*lead, w.shape[-1])


class Linear(nnx.Module):
  """y = x @ kernel + bias through `matmul`; Xavier-uniform kernel, zero bias (the reference's initialisation)."""

  def __init__(self, n_in: int, n_out: int, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(xavier(rngs.params(), (n_in, n_out), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32))
    self.compute_dtype = jnp.dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return matmul(x, self.kernel[...], self.compute_dtype) + self.bias[...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  # The exact two-pass variance and flax's order of operations, so outputs equal nnx.LayerNorm's bit for bit.
  mean = x.mean(-1, keepdims=True)
  centred = x - mean
  rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
  return centred * (rstd * scale) + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, g):
  x, mean, rstd, scale = residuals
  x_hat = (x - mean) * rstd
  batch_axes = tuple(range(x.ndim - 1))
  g_hat = g * scale
  dx = rstd * (g_hat - g_hat.mean(-1, keepdims=True) - x_hat * (g_hat * x_hat).mean(-1, keepdims=True))
  return dx, (g * x_hat).sum(batch_axes), g.sum(batch_axes)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """float32 LayerNorm over the last axis with the exact (two-pass) variance, as the reference.

  Its parameters are nnx.LayerNorm's (`scale`, `bias`) and so are its outputs. Why not nnx.LayerNorm: its gradient,
  derived by JAX, keeps three activations as wide as the block (x - mean, x_hat and a product) for the backward
  pass; this one keeps the input and two numbers per row, and recomputes x_hat from them.
  """

  def __init__(self, n: int, eps: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((n,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((n,), jnp.float32))
    self.epsilon = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return _layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...], self.epsilon)


# ------------------------------------------------------------------------------------------------ the block


# Added to the scores of absent keys: far below any real score, finite so that a row with no key at all (an
# evaluation padding row) stays finite instead of turning into NaN.
_MASKED = -1e30


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis whose gradient keeps only its output (JAX's derived one also keeps exp(x) and the
  sums: one more score-sized stack per block)."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  y = softmax(x)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - (g * y).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def attention(qkv: jax.Array, num_heads: int, key_mask: jax.Array | None, compute_dtype=jnp.float32,
              implementation: str = "xla") -> jax.Array:
  """Softmax attention from the fused projection qkv (B, S, 3D) -> (B, S, D), float32.

  q, k, v and both products run in `compute_dtype` with float32 accumulation; the softmax and its statistics stay
  float32 (with float32 compute this is plain float32 attention). key_mask (B, S): absent leads' tokens are never
  attended to, on both implementations.

  "xla": heads are moved in front of the tokens once, so both products are plain batched matrix products with the
  contracted axis last (`jax.nn.dot_product_attention`'s XLA path contracts over axes in the middle and spent about
  a third more time here: 12-lead base embedding, 384 tokens, 64 against 50 ms a block on the 2-core CPU).
  "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused (flash) attention, which lowers
  only for NVIDIA GPUs and only in bfloat16 or float16 (stmem.steps refuses it elsewhere, before tracing).
  """
  b, s, three_d = qkv.shape
  d = three_d // 3
  hd = d // num_heads
  dtype = jnp.dtype(compute_dtype)
  if implementation == "cudnn":
    q, k, v = (t.astype(dtype) for t in qkv.reshape(b, s, 3, num_heads, hd).transpose(2, 0, 1, 3, 4))  # (B, S, H, hd)
    mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return y.astype(jnp.float32).reshape(b, s, d)
  q, k, v = qkv.reshape(b, s, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)   # each (B, H, S, hd)
  scores = jnp.einsum("bhqc,bhkc->bhqk", (q * hd ** -0.5).astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32)
  if key_mask is not None:  # key_mask (B, S): absent leads' tokens are never attended to
    scores = scores + jnp.where(key_mask, 0.0, _MASKED)[:, None, None, :]
  y = jnp.einsum("bhqk,bhkc->bhqc", softmax(scores).astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
  return y.transpose(0, 2, 1, 3).reshape(b, s, d)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused q/k/v projection (q, k, v blocks, each head-major) and an output projection."""

  def __init__(self, width: int, num_heads: int, dtype, rngs: nnx.Rngs, implementation: str = "xla"):
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = Linear(width, 3 * width, dtype, rngs)
    self.out = Linear(width, width, dtype, rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    d = x.shape[-1]
    bias = self.qkv.bias[...]
    # The key bias adds the same q.b_k to every score of a query, which the softmax ignores: its true gradient is
    # zero, and Adam would turn the float noise in it into random drift that depends on the device layout.
    bias = jnp.concatenate([bias[:d], jax.lax.stop_gradient(bias[d:2 * d]), bias[2 * d:]])
    qkv = matmul(x, self.qkv.kernel[...], self.qkv.compute_dtype) + bias
    # A padded row equals its unpadded self: absent tokens are masked as keys (see `attention`).
    return self.out(attention(qkv, self.num_heads, key_mask, self.qkv.compute_dtype, self.implementation))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU, as the reference; its gradient keeps only x for the backward pass.

  Why its own gradient: differentiated as written, JAX keeps three intermediates of the erf GELU as wide as the MLP
  (exp, erfc and a product) for every block, on top of the product's own input. Recomputing them from x in the
  backward pass is a few elementwise operations and writes three fewer activation stacks per step.
  """
  return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  cdf = 0.5 * jax.lax.erfc(-x * np.float32(1 / np.sqrt(2)))
  pdf = jnp.exp(-0.5 * x * x) * np.float32(1 / np.sqrt(2 * np.pi))
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, dtype, rngs: nnx.Rngs):
    self.fc1 = Linear(width, hidden, dtype, rngs)
    self.fc2 = Linear(hidden, width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  `branch_scale` (B, 2), optional: per-example multipliers of the attention and MLP branches (drop path passes 0
  for a dropped branch and 1 / (1 - rate) for a kept one); None is 1.
  """

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, dtype, rngs: nnx.Rngs, attention: str = "xla"):
    self.attn_norm = LayerNorm(width)
    self.attn = Attention(width, num_heads, dtype, rngs, attention)
    self.mlp_norm = LayerNorm(width)
    self.mlp = Mlp(width, mlp_ratio * width, dtype, rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None,
               branch_scale: jax.Array | None = None) -> jax.Array:
    a = self.attn(self.attn_norm(x), key_mask)
    if branch_scale is not None:
      a = a * branch_scale[:, 0, None, None]
    x = x + a
    m = self.mlp(self.mlp_norm(x))
    if branch_scale is not None:
      m = m * branch_scale[:, 1, None, None]
    return x + m


# ------------------------------------------------------------------------------------------------ stacks of blocks


def stacked(depth: int, make: Callable[[nnx.Rngs], Block], rngs: nnx.Rngs) -> Block:
  """`depth` blocks held as one Block whose every parameter has a leading axis of size `depth` (block i is row i).

  Why stacked: the blocks run as one `lax.scan` over that axis (see `run_stack`), and a scan wants its weights
  stacked. Stacking lists of blocks on every call copied all their weights forward and back on every step.
  """
  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs: nnx.Rngs) -> Block:
    return make(rngs)

  return create(rngs)


# Rematerialisation of each block in the backward pass (`ModelConfig.remat`): what a block keeps from its forward pass.
#   none:  everything its backward pass reads (fastest; activation memory grows with depth x batch);
#   dots:  the outputs of its matrix products without batch dimensions (the Linear layers), recomputing the
#          elementwise work, norms and attention;
#   block: only its input: the whole block runs again in the backward pass (about a third more FLOPs per step).
REMAT_POLICIES = {
  "none": None,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "block": jax.checkpoint_policies.nothing_saveable,
}


def run_stack(blocks: Block, h: jax.Array, key_mask: jax.Array | None = None, *, keep_all: bool = False,
              branch_scale: jax.Array | None = None, remat: str = "none", scan: bool = True
              ) -> tuple[jax.Array, jax.Array | None]:
  """Apply stacked blocks (`stacked`) in order to h (B, S, D).

  Returns the last block's output and, with keep_all, every block's output stacked on a leading axis.
  branch_scale (depth, B, 2), optional: each block's `Block` branch multipliers. remat: see REMAT_POLICIES.
  scan=False runs the same function as an unrolled Python loop over the rows (`ModelConfig.scan_blocks`): XLA's
  cost analysis counts a loop body once, so the benchmark's FLOP cross-check lowers the unrolled form.

  Why a scan and not an unrolled loop: unrolled, XLA on CPU does not materialise the residual stream. It fuses the
  elementwise chain h_i = h_0 + (every branch output before block i) into each consumer, and in the backward pass
  recomputes that chain, transposed, inside the copy that feeds every weight-gradient product: on a 2-core CPU
  that was about 30 % of a base pretraining step. A scan's carry is a real buffer at every iteration, which cuts
  the chain at block boundaries. (`lax.optimization_barrier` does not help: the CPU pipeline drops it before
  fusion.)
  """
  graphdef, state = nnx.split(blocks)

  def apply(h, row, scale):
    return nnx.merge(graphdef, row)(h, key_mask, scale)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])

  if not scan:
    depth = int(blocks.attn_norm.scale.shape[0])
    scales = branch_scale if branch_scale is not None else [None] * depth
    outputs = []
    for i in range(depth):
      h = apply(h, jax.tree.map(lambda leaf: leaf[i], state), scales[i])
      outputs.append(h)
    return h, (jnp.stack(outputs) if keep_all else None)

  def body(h, xs):
    row, scale = xs
    h = apply(h, row, scale)
    return h, (h if keep_all else None)

  return jax.lax.scan(body, h, (state, branch_scale))
