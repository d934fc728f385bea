"""Optimisers and schedules shared by the programs: AdamW with warmup + cosine, frozen parameters, a weight-decay
mask, gradient clipping and layer-wise learning-rate decay. Parameters are addressed by '/'-joined paths
(`encoder/blocks/3/attn/qkv/kernel`) matched with regular expressions, as big_vision does.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
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


def adamw(params, *, schedule: optax.Schedule, b1: float, b2: float, eps: float = 1e-8, weight_decay: float,
          decay_mask: bool = False, clip_norm: float = 0.0, frozen: Sequence[str] = (),
          layer_decay: float = 1.0, depth: int = 0) -> optax.GradientTransformation:
  """AdamW over `params` (a pytree of arrays).

  frozen:      regexes of parameters never updated (pretraining freezes the sin-cos tables this way).
  decay_mask:  no weight decay on NO_DECAY parameters.
  layer_decay: layer-wise lr decay for fine-tuning: block i of `depth` scaled by layer_decay**(depth - i), the
               patch/lead/position embeddings by layer_decay**(depth + 1), the rest (head, final norm) by 1.
  """
  mask = None
  if decay_mask:
    mask = jax.tree.map(lambda lab: lab == "decay", label_tree(params, [(rx, "no") for rx in NO_DECAY], "decay"))

  def make(scale: float) -> optax.GradientTransformation:
    sched = (lambda step: schedule(step) * scale) if scale != 1.0 else schedule
    return optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)

  rules = [(rx, "frozen") for rx in frozen]
  transforms = {"frozen": optax.set_to_zero()}
  if layer_decay != 1.0 and depth:
    for i in range(depth):
      rules.append((rf"(.*/)?blocks/{i}/.*", f"layer{i}"))
      transforms[f"layer{i}"] = make(layer_decay ** (depth - i))
    rules.append((r"(.*/)?(patch_.*|pos_embedding|sep_embedding|lead_embedding)(/.*)?", "embed"))
    transforms["embed"] = make(layer_decay ** (depth + 1))
  transforms["train"] = make(1.0)
  tx = optax.multi_transform(transforms, label_tree(params, rules, "train"))
  if clip_norm and clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx
