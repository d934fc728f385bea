"""Per-lead random masking: every lead keeps the same number of patches, at its own random positions."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def noise_for(key: jax.Array, batch: int, num_leads: int, num_patches: int) -> jax.Array:
  """Uniform noise of shape (batch, leads, patches): one independent draw per lead and patch."""
  return jax.random.uniform(key, (batch, num_leads, num_patches))


def per_lead_masking(noise: jax.Array, num_keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """From noise (B, L, N): the kept patch indices (B, L, num_keep) in shuffled order, the mask (B, L, N) with
  1 = masked, and ids_restore (B, L, N), the permutation that puts shuffled tokens back in patch order.

  The patches with the smallest noise are kept (ascending argsort), so given noise reproduces the reference.
  """
  ids_shuffle = jnp.argsort(noise, axis=-1)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1)
  keep = ids_shuffle[..., :num_keep]
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return keep, mask, ids_restore
