"""An encoder with a linear classification head: the model that fine-tuning trains."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Classifier(nnx.Module):
  """Encoder + linear head on the pooled features, with drop path (stochastic depth) on every residual branch.

  The randomness of drop path lives here, not in `stmem.models`: only fine-tuning uses it; the encoder only takes the
  resulting branch multipliers. Block i's rate is drop_path * i / (depth-1); a dropped branch is zero for that ECG, a
  kept one scaled by 1 / (1 - rate). Without drop path, or at evaluation, the forward pass is exactly the encoder's
  `features(...)["pooled"]` followed by the head.
  """

  def __init__(self, encoder, num_classes: int, drop_path: float, *, rngs: nnx.Rngs):
    self.encoder = encoder
    d = encoder.cfg.width
    self.head = nnx.Linear(d, num_classes, kernel_init=nnx.initializers.normal(0.01),
                           bias_init=nnx.initializers.zeros, rngs=rngs)
    depth = encoder.cfg.depth
    self.rates = tuple(float(drop_path * i / max(depth - 1, 1)) for i in range(depth))

  def __call__(self, signal, lead_ids, lead_mask, key: jax.Array | None = None):
    enc = self.encoder
    branch_scale = None
    if key is not None and any(self.rates):
      rates = jnp.asarray(self.rates, jnp.float32)[:, None, None]                      # (depth, 1, 1)
      keep = jax.random.bernoulli(key, 1 - rates, (len(self.rates), signal.shape[0], 2))  # (depth, B, 2)
      branch_scale = keep.astype(jnp.float32) / (1 - rates)
    return self.head(enc.features(signal, lead_ids, lead_mask, branch_scale=branch_scale)["pooled"])
