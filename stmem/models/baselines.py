"""The paper's masked-autoencoder baselines, MTAE and MLAE: one token axis each, where ST-MEM has two.

MTAE tokenises time only: token t is the 75-sample window t of all 12 leads together (a 900-value patch), 30 tokens.
MLAE tokenises leads only: token l is the whole 2,250-sample lead l, 12 tokens.
Everything else is shared and is the MAE recipe: a CLS token in front, fixed 1-D sin-cos positions (a zero row for
the CLS slot), 75 % of the tokens masked at random per ECG, the encoder on the kept tokens, an MAE decoder (width 256,
4 blocks) over all tokens with a learned mask token, and the norm-pix loss over the masked tokens. The transformer
pieces, the sin-cos table, the masking and the norm-pix target are ST-MEM's own (`layers`, `masking`, `stmem`).

Both need all 12 leads, since a token holds them all (MTAE) or the token count is the lead count (MLAE): any order of
the 12 is accepted (slots are put in canonical order by `lead_ids`), any other lead set is refused (`LeadSetRefused`).

Shapes follow ST-MEM's where a consumer reads them: `features` returns pooled (B, D), per_lead (B, L, D) and tokens;
the pretraining model returns `pred` (B, L, N, patch_size) and `mask` (B, L, N) in ST-MEM's per-patch units, so the
reconstruction figure and other readers of ST-MEM's outputs work unchanged (see `MaskedAutoencoder.__call__`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from data_pipelines.errors import UsageError
from stmem.models import layers, masking
from stmem.models.config import ModelConfig
from stmem.models.stmem import add_decoder, patch_targets

NUM_LEADS = 12


class LeadSetRefused(UsageError):
  """A baseline was given a lead set other than the 12 standard leads (a user error: `stmem` prints its one line)."""


def _check_leads(cfg: ModelConfig, num_slots: int) -> None:
  # Read at trace time from the static shape: a lead set of another size never reaches the computation.
  if num_slots != NUM_LEADS:
    raise LeadSetRefused(f"model.method={cfg.method!r} needs all 12 leads (its tokens span every lead); got {num_slots} "
                         f"lead slots: use lead set '12', or an ST-MEM checkpoint for other lead sets")


def _canonical(x: jax.Array, lead_ids: jax.Array) -> jax.Array:
  """Slots (B, 12, ...) reordered so that row c holds lead c (lead_ids (B, 12) is a permutation of 0..11)."""
  order = jnp.argsort(lead_ids, axis=1)
  return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def num_tokens(cfg: ModelConfig) -> int:
  return cfg.num_patches if cfg.method == "mtae" else NUM_LEADS


def token_size(cfg: ModelConfig) -> int:
  """Values per token: 12 x 75 = 900 (MTAE) or 30 x 75 = 2,250 (MLAE)."""
  return NUM_LEADS * cfg.patch_size if cfg.method == "mtae" else cfg.window


def tokenize(signal: jax.Array, cfg: ModelConfig) -> jax.Array:
  """(B, 12, T) in canonical lead order -> (B, M, token_size): MTAE time windows (lead-major inside a token), or
  MLAE whole leads."""
  b, l, t = signal.shape
  if t != cfg.window:
    raise ValueError(f"model.method={cfg.method!r} needs windows of exactly {cfg.window} samples, got {t}")
  if cfg.method == "mlae":
    return signal
  return signal.reshape(b, l, cfg.num_patches, cfg.patch_size).transpose(0, 2, 1, 3).reshape(b, cfg.num_patches, -1)


def untokenize(tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The inverse of `tokenize`, to (B, 12, N, patch_size): ST-MEM's patch layout."""
  b = tokens.shape[0]
  if cfg.method == "mlae":
    return tokens.reshape(b, NUM_LEADS, cfg.num_patches, cfg.patch_size)
  return tokens.reshape(b, cfg.num_patches, NUM_LEADS, cfg.patch_size).transpose(0, 2, 1, 3)


def token_to_lead_patch(token_values: jax.Array, cfg: ModelConfig) -> jax.Array:
  """A per-token quantity (B, M) spread over the patches it covers, (B, 12, N)."""
  b = token_values.shape[0]
  if cfg.method == "mlae":
    return jnp.broadcast_to(token_values[:, :, None], (b, NUM_LEADS, cfg.num_patches))
  return jnp.broadcast_to(token_values[:, None, :], (b, NUM_LEADS, cfg.num_patches))


def _positions(num: int, width: int) -> jax.Array:
  """(num + 1, width): row 0 (CLS) zero, row 1 + i the sin-cos code of token i (ST-MEM's table without its end row)."""
  return jnp.asarray(layers.sincos_table(num, width)[:-1])


class BaselineEncoder(nnx.Module):
  """The MTAE / MLAE encoder: CLS + token embeddings with fixed sin-cos positions, ST-MEM's block stack."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.method not in ("mtae", "mlae"):
      raise ValueError(f"BaselineEncoder is for model.method 'mtae' or 'mlae', not {cfg.method!r}")
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    d, p = cfg.width, token_size(cfg)
    # The same patch embedding as ST-MEM's, over a token's values: LayerNorm, Linear, LayerNorm.
    self.patch_norm_in = layers.LayerNorm(p)
    self.patch_linear = layers.Linear(p, d, dtype, rngs)
    self.patch_norm_out = layers.LayerNorm(d)
    # A Param so fine-tuning may train it; pretraining freezes it (the `.*pos_embedding` rule of the optimiser).
    self.pos_embedding = nnx.Param(_positions(num_tokens(cfg), d))
    self.cls_token = nnx.Param(layers.embedding_init(rngs.params(), (d,)))
    self.blocks = layers.stacked(cfg.depth, lambda r: layers.Block(d, cfg.num_heads, cfg.mlp_ratio, dtype, r, cfg.attention), rngs)
    self.norm = layers.LayerNorm(d)

  def embed_tokens(self, signal: jax.Array, lead_ids: jax.Array) -> jax.Array:
    """(B, 12, T) slots in any lead order -> (B, M, D) token embeddings with their positions (before masking)."""
    _check_leads(self.cfg, signal.shape[1])
    tokens = tokenize(_canonical(signal, lead_ids), self.cfg)
    x = self.patch_norm_out(self.patch_linear(self.patch_norm_in(tokens)))
    return x + self.pos_embedding[1:]

  def run_blocks(self, x: jax.Array, key_mask: jax.Array | None = None, capture: tuple[int, ...] = (),
                 branch_scale: jax.Array | None = None):
    """CLS in front of x (B, K, D), then every block: pre-norm tokens (B, 1 + K, D) and {i: block i's output}."""
    b, _, d = x.shape
    cls = jnp.broadcast_to(self.cls_token[...] + self.pos_embedding[0], (b, 1, d))
    h = jnp.concatenate([cls, x], axis=1)
    if key_mask is not None:
      key_mask = jnp.concatenate([jnp.ones((b, 1), bool), key_mask.astype(bool)], axis=1)
    n = self.cfg.depth
    wanted = [i for i in range(n) if i in capture or i - n in capture]
    h, every = layers.run_stack(self.blocks, h, key_mask, keep_all=bool(wanted), branch_scale=branch_scale,
                                   remat=self.cfg.remat, scan=self.cfg.scan_blocks)
    return h, {i: every[i] for i in wanted}

  def present_tokens(self, lead_mask: jax.Array | None, lead_ids: jax.Array) -> jax.Array | None:
    """(B, M) True where a token carries a present lead (MLAE); MTAE tokens span all leads, so None (all present)."""
    if lead_mask is None or self.cfg.method == "mtae":
      return None
    return _canonical(lead_mask.astype(bool), lead_ids)

  def features(self, signal: jax.Array, lead_ids: jax.Array, lead_mask: jax.Array | None = None,
               blocks: tuple[int, ...] = (), branch_scale: jax.Array | None = None) -> dict:
    """Features of unmasked 12-lead ECGs, in the shapes of ST-MEM's `Encoder.features`.

    pooled   (B, D): mean over the (present) tokens, CLS excluded, then the final LayerNorm (as ST-MEM pools);
    per_lead (B, 12, D), in the input's slot order: MLAE's lead tokens after the final LayerNorm; MTAE has no
             per-lead token (each token holds all leads), so every slot holds the pooled feature;
    tokens   MTAE (B, 1, 30, D), its time tokens as one slot spanning all leads; MLAE (B, 12, 1, D), in canonical
             lead order; both after the final LayerNorm;
    blocks   {i: (B, 1 + M, D)}: the raw output of each block asked for, CLS first.
    """
    present = self.present_tokens(lead_mask, lead_ids)
    h, captured = self.run_blocks(self.embed_tokens(signal, lead_ids), present, blocks, branch_scale)
    tokens = h[:, 1:]
    weight = jnp.ones(tokens.shape[:2], jnp.float32) if present is None else present.astype(jnp.float32)
    pooled = jnp.einsum("bmd,bm->bd", tokens, weight) / jnp.maximum(weight.sum(axis=1, keepdims=True), 1.0)
    pooled = self.norm(pooled)
    normed = self.norm(tokens)
    if self.cfg.method == "mlae":
      # Slot s holds lead lead_ids[s]: its token is row lead_ids[s] of the canonical order.
      per_lead = jnp.take_along_axis(normed, lead_ids[..., None].astype(jnp.int32), axis=1)
      token_grid = normed[:, :, None]
    else:
      per_lead = jnp.broadcast_to(pooled[:, None], (pooled.shape[0], signal.shape[1], pooled.shape[1]))
      token_grid = normed[:, None]
    return {"pooled": pooled, "per_lead": per_lead, "tokens": token_grid, "blocks": captured}

  def __call__(self, signal, lead_ids, lead_mask=None):
    return self.features(signal, lead_ids, lead_mask)["pooled"]


class MaskedAutoencoder(nnx.Module):
  """MTAE or MLAE pretraining model: the encoder on 25 % of the tokens, an MAE decoder, norm-pix loss on the rest."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = BaselineEncoder(cfg, rngs=rngs)
    add_decoder(self, cfg, _positions(num_tokens(cfg), cfg.decoder_width), token_size(cfg), rngs)

  @property
  def num_keep(self) -> int:
    """Tokens kept per ECG: int(M * (1 - mask_ratio)) (7 of 30 for MTAE, 3 of 12 for MLAE at 0.75)."""
    return int(num_tokens(self.cfg) * (1 - self.cfg.mask_ratio))

  def __call__(self, signal: jax.Array, lead_ids: jax.Array, lead_mask: jax.Array | None = None, *,
               key: jax.Array | None = None, noise: jax.Array | None = None) -> dict:
    """Masked reconstruction. `key` draws fresh masking, `noise` (B, M) reproduces a given one.

    Returns loss (), token_pred (B, M, token_size) and token_mask (B, M) (1 = masked) in the model's own units, and,
    in ST-MEM's layout and units: pred (B, 12, N, patch_size), the reconstruction of each 75-sample patch
    normalised by that patch's mean and std (what ST-MEM predicts), and mask (B, 12, N); both in canonical lead
    order. Also ids_restore (B, M) and the encoder latent (B, 1 + K, D) after the final LayerNorm.
    """
    cfg, enc = self.cfg, self.encoder
    x = enc.embed_tokens(signal, lead_ids)                                      # (B, M, D)
    b, m, _ = x.shape
    if noise is None:
      if key is None:
        raise ValueError(f"{cfg.method.upper()} needs a PRNG `key` or explicit `noise` to mask tokens")
      noise = masking.noise_for(key, b, 1, m)[:, 0]
    keep, mask, ids_restore = (a[:, 0] for a in masking.per_lead_masking(noise[:, None], self.num_keep))
    present = enc.present_tokens(lead_mask, lead_ids)
    kept_present = None if present is None else jnp.take_along_axis(present, keep, axis=1)
    h, _ = enc.run_blocks(jnp.take_along_axis(x, keep[..., None], axis=1), kept_present)
    latent = enc.norm(h)                                                        # (B, 1 + K, D)

    y = self.to_decoder(latent)
    dd = y.shape[-1]
    shuffled = jnp.concatenate([y[:, 1:], jnp.broadcast_to(self.mask_token[...], (b, m - self.num_keep, dd))], axis=1)
    unshuffled = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
    pos = self.decoder_pos_embedding[...]
    seq = jnp.concatenate([y[:, :1] + pos[0], unshuffled + pos[1:]], axis=1)
    seq, _ = layers.run_stack(self.decoder_blocks, seq, None if present is None else
                              jnp.concatenate([jnp.ones((b, 1), bool), present], axis=1), scan=cfg.scan_blocks)
    token_pred = self.decoder_head(self.decoder_norm(seq))[:, 1:]              # (B, M, token_size)

    tokens = tokenize(_canonical(signal, lead_ids), cfg)
    target = patch_targets(tokens, cfg.norm_pix_loss)
    per_token = ((token_pred - target) ** 2).mean(axis=-1)
    weight = mask if present is None else mask * present.astype(mask.dtype)
    loss = (per_token * weight).sum() / jnp.maximum(weight.sum(), 1.0)

    # ST-MEM's units for readers of its outputs: back to the signal's scale, then normalised per 75-sample patch.
    recon = token_pred
    if cfg.norm_pix_loss:
      recon = token_pred * jnp.sqrt(tokens.var(-1, keepdims=True, ddof=1) + 1e-6) + tokens.mean(-1, keepdims=True)
    patches = untokenize(tokens, cfg)
    recon = untokenize(recon, cfg)
    if cfg.norm_pix_loss:
      recon = (recon - patches.mean(-1, keepdims=True)) / jnp.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
    return {"loss": loss, "pred": recon, "mask": token_to_lead_patch(mask, cfg), "token_pred": token_pred,
            "token_mask": mask, "ids_restore": ids_restore, "latent": latent}
