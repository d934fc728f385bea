"""A frozen-feature MLP head: the probe's non-linear head beside the logistic regression of `stmem.linear_heads`.

One hidden layer (GELU) on the features standardised with the training rows' mean and std, trained full-batch with
Adam for a fixed number of steps from a fixed initialisation (drawn from `seed`): the same inputs give the same head
on every run. No dropout (it would need a random stream per step); the regulariser is an L2 penalty on both weight
matrices, l2 / 2 * (||W1||^2 + ||W2||^2), tried over a grid. Early stopping is a choice on validation too: the
parameters are kept at `snapshots` evenly spaced steps, and every (L2, step count) pair is a candidate head, chosen
on validation exactly as the linear head's L2 (`linear_heads.select`: best validation score, ties to the stronger
penalty, then to fewer steps). Every fold, strength and snapshot is fitted in one compiled call (`vmap`).

Loss and link as the linear head's: kind "multilabel" a sigmoid per class, "multiclass" a softmax.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stmem import linear_heads

HIDDEN = 256
L2_GRID = (1e-3, 1e-2, 1e-1)
STEPS = 200
SNAPSHOTS = 4
LEARNING_RATE = 1e-2


@dataclasses.dataclass(frozen=True)
class MLPHead:
  """A fitted head: probabilities = link(gelu((x - mean) / std @ w1 + b1) @ w2 + b2)."""
  w1: np.ndarray    # (D, H)
  b1: np.ndarray    # (H,)
  w2: np.ndarray    # (H, C)
  b2: np.ndarray    # (C,)
  mean: np.ndarray  # (D,)
  std: np.ndarray   # (D,)
  kind: str
  l2: float
  steps: int        # Adam steps this head was trained for (the snapshot chosen)

  def logits(self, x: np.ndarray) -> np.ndarray:
    z = (jnp.asarray(x, jnp.float32) - self.mean) / self.std
    return np.asarray(_forward((self.w1, self.b1, self.w2, self.b2), z))

  def predict(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(linear_heads.link(jnp.asarray(self.logits(x)), self.kind))


def _forward(params, z):
  w1, b1, w2, b2 = params
  return jax.nn.gelu(z @ w1 + b1) @ w2 + b2


def _init(key: jax.Array, d: int, hidden: int, c: int):
  """Fan-in scaled normal weights, zero biases (the output layer small: the head starts near the prior)."""
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, (d, hidden)) / np.sqrt(d), jnp.zeros((hidden,)),
          0.1 * jax.random.normal(k2, (hidden, c)) / np.sqrt(hidden), jnp.zeros((c,)))


def _fit_grid(x, y, weight, l2s, key, kind: str, hidden: int, steps: int, snapshots: int, lr: float):
  """Heads for every L2 of the grid on the rows of weight 1, kept at `snapshots` step counts:
  (params with leading axes (G, snapshots), mean (D,), std (D,))."""
  mean, std = linear_heads.standardiser(x, weight)
  z = (x - mean) / std
  start = _init(key, x.shape[1], hidden, y.shape[1])
  opt = optax.adam(lr)

  def fit_one(l2):
    def loss(params):
      w1, _, w2, _ = params
      return linear_heads.logit_loss(_forward(params, z), y, kind, weight) + 0.5 * l2 * (
        jnp.sum(w1 * w1) + jnp.sum(w2 * w2))

    def step(carry, _):
      params, state = carry
      grad = jax.grad(loss)(params)
      updates, state = opt.update(grad, state, params)
      return (optax.apply_updates(params, updates), state), None

    def chunk(carry, _):
      carry, _ = jax.lax.scan(step, carry, None, length=steps // snapshots)
      return carry, carry[0]

    _, kept = jax.lax.scan(chunk, (start, opt.init(start)), None, length=snapshots)
    return kept

  return jax.vmap(fit_one)(l2s), mean, std


# One compilation fits every fold (vmapped training-row weights), every strength and every snapshot.
_fit_folds = jax.jit(jax.vmap(_fit_grid, in_axes=(None, None, 0, None, None, None, None, None, None, None)),
                     static_argnames=("kind", "hidden", "steps", "snapshots", "lr"))


def fit_folds(x: np.ndarray, y: np.ndarray, weights: np.ndarray, l2s: Sequence[float] = L2_GRID,
              kind: str = "multilabel", *, hidden: int = HIDDEN, steps: int = STEPS, snapshots: int = SNAPSHOTS,
              lr: float = LEARNING_RATE, seed: int = 0) -> list[list[MLPHead]]:
  """heads[k]: the candidate heads of fold k (training rows = weights[k] > 0), for every L2 strength and every
  snapshot (L2 in the order of `l2s`, fewer steps first within each): pick one with `linear_heads.select`."""
  if kind not in linear_heads.KINDS:
    raise ValueError(f"kind must be one of {linear_heads.KINDS}, got {kind!r}")
  snapshots = max(1, min(int(snapshots), int(steps)))
  if steps % snapshots:
    raise ValueError(f"steps ({steps}) must be a multiple of snapshots ({snapshots})")
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  weights = jnp.asarray(np.atleast_2d(weights), jnp.float32)
  params, means, stds = _fit_folds(x, y, weights, jnp.asarray(l2s, jnp.float32), jax.random.key(int(seed)), kind,
                                   int(hidden), int(steps), snapshots, float(lr))
  w1, b1, w2, b2 = (np.asarray(a) for a in params)  # each (K, G, snapshots, ...)
  means, stds = np.asarray(means), np.asarray(stds)
  per = steps // snapshots
  return [[MLPHead(w1=w1[k, g, s], b1=b1[k, g, s], w2=w2[k, g, s], b2=b2[k, g, s], mean=means[k], std=stds[k],
                   kind=kind, l2=float(l2), steps=per * (s + 1))
           for g, l2 in enumerate(l2s) for s in range(snapshots)] for k in range(weights.shape[0])]


def fit(x: np.ndarray, y: np.ndarray, l2s: Sequence[float] = L2_GRID, kind: str = "multilabel", **kw
        ) -> list[MLPHead]:
  """The candidate heads fitted on all of (x (N, D), y (N, C)); y multi-hot or one-hot."""
  return fit_folds(x, y, np.ones((1, len(x))), l2s, kind, **kw)[0]
