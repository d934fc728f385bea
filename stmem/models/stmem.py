"""The ST-MEM pretraining model: encoder on the kept patches of every lead, a lead-wise shared decoder, and the loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmem.models import layers, masking
from stmem.models.config import ModelConfig
from stmem.models.encoder import Encoder


def patch_targets(patches: jax.Array, norm_pix: bool) -> jax.Array:
  """Each target patch normalised by its own mean and unbiased variance (the reference's norm_pix_loss)."""
  if not norm_pix:
    return patches
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + 1e-6)


def add_decoder(module: nnx.Module, cfg: ModelConfig, positions, out_size: int, rngs: nnx.Rngs) -> None:
  """The MAE decoder's parameters, set on `module` (ST-MEM's and its baselines' share them): the projection from the
  encoder, the mask token, the fixed position table `positions` (rows, decoder width), the blocks, the final norm and
  the head to `out_size` values per token."""
  dtype = jnp.dtype(cfg.dtype)
  dd = cfg.decoder_width
  module.to_decoder = layers.Linear(cfg.width, dd, dtype, rngs)
  module.mask_token = nnx.Param(layers.embedding_init(rngs.params(), (dd,)))
  module.decoder_pos_embedding = nnx.Param(jnp.asarray(positions))
  module.decoder_blocks = layers.stacked(
    cfg.decoder_depth, lambda r: layers.Block(dd, cfg.decoder_heads, cfg.mlp_ratio, dtype, r, cfg.attention), rngs)
  module.decoder_norm = layers.LayerNorm(dd, eps=1e-6)  # the only eps-1e-6 norm, as the reference
  module.decoder_head = layers.Linear(dd, out_size, dtype, rngs)


class StMem(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    add_decoder(self, cfg, layers.sincos_table(cfg.num_patches, cfg.decoder_width), cfg.patch_size, rngs)

  def __call__(self, signal: jax.Array, lead_ids: jax.Array, lead_mask: jax.Array | None = None, *,
               key: jax.Array | None = None, noise: jax.Array | None = None) -> dict:
    """Masked reconstruction. Pass `key` for fresh random masking or `noise` (B, L, N) to reproduce a given one.

    Returns loss (), pred (B, L, N, P), mask (B, L, N) with 1 = masked, ids_restore (B, L, N) and the masked encoder
    latent (B, L, K + 2, D) after the final LayerNorm.
    """
    cfg, enc = self.cfg, self.encoder
    x = enc.embed_patches(signal)                                             # (B, L, N, D)
    b, l, n, _ = x.shape
    if noise is None:
      if key is None:
        raise ValueError("StMem needs a PRNG `key` or explicit `noise` to mask patches")
      noise = masking.noise_for(key, b, l, n)
    num_keep = int(n * (1 - cfg.mask_ratio))
    keep, mask, ids_restore = masking.per_lead_masking(noise, num_keep)
    x = jnp.take_along_axis(x, keep[..., None], axis=2)                      # (B, L, K, D)
    x = enc.add_sep_and_leads(x, lead_ids)
    h, _ = enc.run_blocks(x, lead_mask)
    latent = enc.norm(h)                                                      # (B, L, K + 2, D)

    # Decoder: each lead's 32 tokens are one sequence; leads are folded into the batch (no loop, no cross-lead attention).
    y = self.to_decoder(latent)
    dd = y.shape[-1]
    mask_tokens = jnp.broadcast_to(self.mask_token[...], (b, l, n - num_keep, dd))
    shuffled = jnp.concatenate([y[:, :, 1:-1], mask_tokens], axis=2)
    unshuffled = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=2)
    pos = self.decoder_pos_embedding[...]
    seq = jnp.concatenate([y[:, :, :1] + pos[0], unshuffled + pos[1:n + 1], y[:, :, -1:] + pos[-1]], axis=2)
    seq = seq.reshape(b * l, n + 2, dd)
    seq, _ = layers.run_stack(self.decoder_blocks, seq, remat=cfg.remat, scan=cfg.scan_blocks)
    pred = self.decoder_head(self.decoder_norm(seq)).reshape(b, l, n + 2, -1)[:, :, 1:-1]

    target = patch_targets(enc.patchify(signal), cfg.norm_pix_loss)
    per_patch = ((pred - target) ** 2).mean(axis=-1)                          # (B, L, N)
    weight = mask if lead_mask is None else mask * lead_mask[..., None].astype(mask.dtype)
    loss = (per_patch * weight).sum() / jnp.maximum(weight.sum(), 1.0)
    return {"loss": loss, "pred": pred, "mask": mask, "ids_restore": ids_restore, "latent": latent}
