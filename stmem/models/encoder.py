"""The ST-MEM encoder: each lead patched separately, lead embeddings looked up by lead identity.

Shapes: signal (B, L, T) with L lead slots; lead_ids (B, L) canonical ids (0 = I ... 11 = V6); lead_mask (B, L),
False for an empty slot. Tokens are kept as (B, L, S, D) with S = patches + 2 SEPs, lead-major when flattened.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmem.models import layers
from stmem.models.config import ModelConfig


class Encoder(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    d, p = cfg.width, cfg.patch_size
    # Patch embedding shared by all leads: LayerNorm over each raw patch, Linear, LayerNorm.
    self.patch_norm_in = layers.LayerNorm(p)
    self.patch_linear = layers.Linear(p, d, dtype, rngs)
    self.patch_norm_out = layers.LayerNorm(d)
    # Fixed sin-cos positions (32 rows: SEP, 30 patches, SEP). A Param so fine-tuning may train it;
    # pretraining freezes it in the optimiser.
    self.pos_embedding = nnx.Param(jnp.asarray(layers.sincos_table(cfg.num_patches, d)))
    self.sep_embedding = nnx.Param(layers.embedding_init(rngs.params(), (d,)))
    self.lead_embedding = nnx.Param(layers.embedding_init(rngs.params(), (cfg.num_lead_ids, d)))
    # All blocks as one Block with stacked parameters (block i is row i of each): see layers.stacked.
    self.blocks = layers.stacked(
      cfg.depth, lambda r: layers.Block(d, cfg.num_heads, cfg.mlp_ratio, dtype, r, cfg.attention), rngs)
    self.norm = layers.LayerNorm(d)

  # -- pieces, used by the pretraining model between which it applies masking ------------------------------------
  def patchify(self, signal: jax.Array) -> jax.Array:
    """(B, L, T) -> (B, L, N, patch_size); T must be a whole number of patches."""
    b, l, t = signal.shape
    p = self.cfg.patch_size
    if t % p:
      raise ValueError(f"signal length {t} is not a multiple of the patch size {p}")
    if t // p > self.cfg.num_patches:
      raise ValueError(f"signal of {t} samples has {t // p} patches; the model has positions for {self.cfg.num_patches}")
    return signal.reshape(b, l, t // p, p)

  def embed_patches(self, signal: jax.Array) -> jax.Array:
    """(B, L, T) -> (B, L, N, D) patch tokens with their positional code added (before masking, as the reference)."""
    x = self.patch_norm_out(self.patch_linear(self.patch_norm_in(self.patchify(signal))))
    n = x.shape[2]
    return x + self.pos_embedding[1:n + 1]

  def add_sep_and_leads(self, x: jax.Array, lead_ids: jax.Array) -> jax.Array:
    """(B, L, K, D) -> (B, L, K + 2, D): SEP at both ends, then each lead's own embedding on all its tokens."""
    b, l, _, d = x.shape
    pos = self.pos_embedding[...]
    sep = self.sep_embedding[...]
    left = jnp.broadcast_to(sep + pos[0], (b, l, 1, d))
    right = jnp.broadcast_to(sep + pos[-1], (b, l, 1, d))
    x = jnp.concatenate([left, x, right], axis=2)
    lead = jnp.take(self.lead_embedding[...], lead_ids, axis=0)  # (B, L, D)
    return x + lead[:, :, None, :]

  def run_blocks(self, x: jax.Array, lead_mask: jax.Array | None, capture: tuple[int, ...] = (),
                 branch_scale: jax.Array | None = None):
    """Transformer over all tokens of all leads; returns pre-norm tokens (B, L, S, D) and {i: block i's output}.

    branch_scale (depth, B, 2), optional: residual-branch multipliers per block (drop path; see layers.Block).
    """
    b, l, s, d = x.shape
    h = x.reshape(b, l * s, d)
    key_mask = None if lead_mask is None else jnp.repeat(lead_mask.astype(bool), s, axis=1)
    n = self.cfg.depth
    wanted = [i for i in range(n) if i in capture or i - n in capture]
    h, every = layers.run_stack(self.blocks, h, key_mask, keep_all=bool(wanted), branch_scale=branch_scale,
                                remat=self.cfg.remat, scan=self.cfg.scan_blocks)
    captured = {i: every[i].reshape(b, l, s, d) for i in wanted}
    return h.reshape(b, l, s, d), captured

  # -- downstream use ----------------------------------------------------------------------------------------------
  def features(self, signal: jax.Array, lead_ids: jax.Array, lead_mask: jax.Array | None = None,
               blocks: tuple[int, ...] = (), branch_scale: jax.Array | None = None) -> dict:
    """Features of unmasked ECGs.

    pooled   (B, D): mean over the patch tokens of present leads, then the final LayerNorm (the reference's features);
    per_lead (B, L, D): mean over each lead's patch tokens, then the final LayerNorm;
    tokens   (B, L, N, D): every patch token after the final LayerNorm;
    blocks   {i: (B, L, N + 2, D)}: the raw output of each block asked for (negative indices count from the end).
    branch_scale (depth, B, 2), optional: residual-branch multipliers (drop path in fine-tuning; see layers.Block).
    """
    x = self.add_sep_and_leads(self.embed_patches(signal), lead_ids)
    h, captured = self.run_blocks(x, lead_mask, blocks, branch_scale)
    patch_tokens = h[:, :, 1:-1]
    n = patch_tokens.shape[2]
    present = jnp.ones(h.shape[:2], jnp.float32) if lead_mask is None else lead_mask.astype(jnp.float32)
    summed = jnp.einsum("blnd,bl->bd", patch_tokens, present)
    pooled = summed / jnp.maximum(present.sum(axis=1, keepdims=True) * n, 1.0)  # a row with no lead: zeros
    return {
      "pooled": self.norm(pooled),
      "per_lead": self.norm(patch_tokens.mean(axis=2)),
      "tokens": self.norm(patch_tokens),
      "blocks": captured,
    }

  def __call__(self, signal, lead_ids, lead_mask=None):
    return self.features(signal, lead_ids, lead_mask)["pooled"]
