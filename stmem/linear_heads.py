"""Logistic regression in JAX: the linear probe's head, fitted full-batch, deterministically, for a grid of L2 strengths.

Features are standardised with the training rows' mean and std (so one L2 grid suits every encoder and layer), the
weights start at zero, and L-BFGS (optax, zoom line search) runs a fixed number of steps: the same inputs give the
same head on every run. Every strength of the grid is fitted at once (`vmap`), then one is chosen on validation.

kind "multilabel": a sigmoid per class (binary tasks are multi-label with one class); loss = mean over records of the
  summed per-class log-losses. kind "multiclass": softmax over classes, loss = mean cross-entropy.
Penalty: l2 / 2 * ||W||^2 (the bias is not penalised).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ("multilabel", "multiclass")
L2_GRID = tuple(float(x) for x in np.logspace(-4, 2, 13))


@dataclasses.dataclass(frozen=True)
class Head:
  """A fitted head: probabilities = link((x - mean) / std @ w + b)."""
  w: np.ndarray     # (D, C)
  b: np.ndarray     # (C,)
  mean: np.ndarray  # (D,)
  std: np.ndarray   # (D,)
  kind: str
  l2: float

  def logits(self, x: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float32) - self.mean) / self.std
    return z @ self.w + self.b

  def predict(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(link(jnp.asarray(self.logits(x)), self.kind))


def link(logits: jax.Array, kind: str) -> jax.Array:
  """Probabilities of logits: softmax (multiclass) or a sigmoid per class (multilabel)."""
  return jax.nn.softmax(logits, axis=-1) if kind == "multiclass" else jax.nn.sigmoid(logits)


def logit_loss(logits: jax.Array, y: jax.Array, kind: str, weight=None):
  """Mean log-loss over records of their logits (weighted: records of weight 0 do not count)."""
  per = (optax.softmax_cross_entropy(logits, y) if kind == "multiclass"
         else optax.sigmoid_binary_cross_entropy(logits, y).sum(axis=-1))
  if weight is None:
    return per.mean()
  return jnp.sum(per * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _data_loss(w, b, z, y, kind: str, weight=None):
  return logit_loss(z @ w + b, y, kind, weight)


def standardiser(x: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted mean and std of the training rows; a constant feature gets std 1 (it standardises to 0, not NaN)."""
  total = jnp.maximum(weight.sum(), 1.0)
  mean = (x * weight[:, None]).sum(axis=0) / total
  var = (((x - mean) ** 2) * weight[:, None]).sum(axis=0) / total
  std = jnp.sqrt(var)
  return mean, jnp.where(std > 1e-6, std, 1.0)


def _fit_grid(x: jax.Array, y: jax.Array, weight: jax.Array, l2s: jax.Array, kind: str, steps: int):
  """Heads for every L2 of the grid on the rows of weight 1: (w (G, D, C), b (G, C), mean (D,), std (D,))."""
  d, c = x.shape[1], y.shape[1]
  mean, std = standardiser(x, weight)
  z = (x - mean) / std

  def fit_one(l2):
    def loss(params):
      w, b = params
      return _data_loss(w, b, z, y, kind, weight) + 0.5 * l2 * jnp.sum(w * w)

    opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=20, store_grad=True))
    params = (jnp.zeros((d, c), z.dtype), jnp.zeros((c,), z.dtype))
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
      return (optax.apply_updates(params, updates), state), value

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params

  w, b = jax.vmap(fit_one)(l2s)
  return w, b, mean, std


# One compilation fits every fold (vmapped training-row weights) and every strength of the grid: folds differ in
# which rows count, not in array shapes.
_fit_folds = jax.jit(jax.vmap(_fit_grid, in_axes=(None, None, 0, None, None, None)), static_argnames=("kind", "steps"))


def fit_folds(x: np.ndarray, y: np.ndarray, weights: np.ndarray, l2s: Sequence[float] = L2_GRID,
              kind: str = "multilabel", steps: int = 100) -> list[list[Head]]:
  """`heads[k][g]`: the head for fold k (training rows = `weights[k] > 0`) and L2 strength `l2s[g]`."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  weights = jnp.asarray(np.atleast_2d(weights), jnp.float32)
  ws, bs, means, stds = (np.asarray(a) for a in _fit_folds(x, y, weights, jnp.asarray(l2s, jnp.float32), kind,
                                                           int(steps)))
  return [[Head(w=ws[k, g], b=bs[k, g], mean=means[k], std=stds[k], kind=kind, l2=float(l2))
           for g, l2 in enumerate(l2s)] for k in range(weights.shape[0])]


def fit(x: np.ndarray, y: np.ndarray, l2s: Sequence[float] = L2_GRID, kind: str = "multilabel",
        steps: int = 100) -> list[Head]:
  """One head per L2 strength, fitted on all of (x (N, D), y (N, C)); y multi-hot or one-hot."""
  return fit_folds(x, y, np.ones((1, len(x))), l2s, kind, steps)[0]


def log_loss(head: Head, x: np.ndarray, y: np.ndarray) -> float:
  """The data loss (no penalty) of a head on (x, y)."""
  z = (np.asarray(x, np.float32) - head.mean) / head.std
  return float(_data_loss(jnp.asarray(head.w), jnp.asarray(head.b), jnp.asarray(z), jnp.asarray(y, jnp.float32),
                          head.kind))


def select(heads: Sequence, x_val: np.ndarray, y_val: np.ndarray, on: str = "auroc") -> tuple[Any, list[float]]:
  """The head with the best validation score, and every head's score (higher is better).

  on "auroc": macro AUROC (ties, common on small sets, go to the stronger penalty, the simpler model, and between
  equal penalties to the first head given); on "loss": the negated validation log-loss.
  Any head with `predict(x)`, `logits(x)`, `kind` and `l2` is chosen the same way (`stmem.mlp_head` heads too).
  """
  from stmem import scoring
  scores = []
  for h in heads:
    if on == "auroc":
      s = scoring.macro_metrics(y_val, h.predict(x_val))["auroc"]
      scores.append(-np.inf if not np.isfinite(s) else s)
    elif on == "loss":
      scores.append(-log_loss(h, x_val, y_val) if isinstance(h, Head) else
                    -float(logit_loss(jnp.asarray(h.logits(x_val)), jnp.asarray(y_val, jnp.float32), h.kind)))
    else:
      raise ValueError(f"select on 'auroc' or 'loss', not {on!r}")
  best = max(range(len(heads)), key=lambda i: (round(scores[i], 6), heads[i].l2))
  return heads[best], scores
