"""Optimisers and schedules shared by the programs: AdamW with warmup + cosine, frozen parameters, a weight-decay
mask, gradient clipping and layer-wise learning-rate decay. Parameters are addressed by '/'-joined paths
(`encoder/blocks/attn/qkv/kernel`) matched with regular expressions, as big_vision does; the transformer blocks'
parameters are stacked, block i in row i.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# No decay on biases, norms, embeddings and tables (the option; the reference decays every parameter).
NO_DECAY = (r".*/bias$", r".*norm.*/scale$", r".*embedding.*", r".*mask_token$")


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def label_tree(params, rules: Sequence[tuple[str, str]], default: str):
  """A tree of labels: the first rule (regex, label) whose regex fully matches a parameter's path."""
  compiled = [(re.compile(rx), label) for rx, label in rules]

  def label(path, _):
    p = path_str(path)
    return next((lab for rx, lab in compiled if rx.fullmatch(p)), default)

  return jax.tree_util.tree_map_with_path(label, params)


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Per-step linear warmup from 0 to peak, then half-cosine to 0 at total_steps."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1), 0.0)


def scaled_lr(base_lr: float, global_batch: int) -> float:
  """The reference's rule: learning rate = base rate x global batch / 256."""
  return base_lr * global_batch / 256


# Stacked transformer blocks (`stmem.models.layers.stacked`): row i of every such parameter is block i.
STACKED_BLOCKS = r"(.*/)?blocks/.*"
EMBEDDINGS = r"(.*/)?(patch_.*|pos_embedding|sep_embedding|lead_embedding)(/.*)?"


def layer_scales(params, layer_decay: float, depth: int):
  """Layer-wise learning-rate multipliers, one array per parameter that broadcasts against it.

  Encoder block i (row i of the stacked block parameters) gets layer_decay**(depth - i), the patch/lead/position
  embeddings layer_decay**(depth + 1), everything else (final norm, head) 1.
  """
  per_block = layer_decay ** (depth - np.arange(depth, dtype=np.float64))

  def scale(path, label, x):
    if label == "block":
      if x.shape[0] != depth:
        raise ValueError(f"{path_str(path)}: expected {depth} stacked blocks on axis 0, found shape {x.shape}")
      return jnp.asarray(per_block.reshape((depth,) + (1,) * (len(x.shape) - 1)), jnp.float32)
    return jnp.float32(layer_decay ** (depth + 1) if label == "embed" else 1.0)

  labels = label_tree(params, [(STACKED_BLOCKS, "block"), (EMBEDDINGS, "embed")], "other")
  return jax.tree_util.tree_map_with_path(scale, labels, params)


def scale_updates(scales) -> optax.GradientTransformation:
  """Multiply each update by its entry of `scales` (a tree like the parameters, of broadcastable arrays)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales))


def adamw(params, *, schedule: optax.Schedule, b1: float, b2: float, eps: float = 1e-8, weight_decay: float,
          decay_mask: bool = False, clip_norm: float = 0.0, frozen: Sequence[str] = (),
          layer_decay: float = 1.0, depth: int = 0) -> optax.GradientTransformation:
  """AdamW over `params` (a pytree of arrays).

  frozen:      regexes of parameters never updated (pretraining freezes the sin-cos tables this way).
  decay_mask:  no weight decay on NO_DECAY parameters.
  layer_decay: layer-wise lr decay for fine-tuning (`layer_scales`): it multiplies the whole AdamW update, weight
               decay included, as a smaller learning rate would.
  """
  mask = None
  if decay_mask:
    mask = jax.tree.map(lambda lab: lab == "decay", label_tree(params, [(rx, "no") for rx in NO_DECAY], "decay"))
  labels = label_tree(params, [(rx, "frozen") for rx in frozen], "train")
  tx = optax.multi_transform(
    {"frozen": optax.set_to_zero(),
     "train": optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)}, labels)
  steps = [tx]
  if clip_norm and clip_norm > 0:
    steps.insert(0, optax.clip_by_global_norm(clip_norm))
  if layer_decay != 1.0 and depth:
    steps.append(scale_updates(layer_scales(params, layer_decay, depth)))
  return optax.chain(*steps) if len(steps) > 1 else tx
