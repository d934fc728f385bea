"""RandAugment for ECG crops (fine-tuning), pure numpy, applied after standardisation.

The reference's recipe: for each ECG, pick `num_ops` (2) of the 8 operations below at random; apply each with
probability `prob` (0.5) at full strength. Lengths are fractions of the crop (`max_fraction` 0.3); a signal is
(L, T) with absent leads as zero rows (`lead_mask`), which stay zero.

  shift          move the ECG in time by up to 30 % of its length, zero padded
  cutout         zero one segment of up to 30 %
  drop           zero up to 30 % of the time indices, across all leads
  flip           multiply by -1
  erase          zero one random (present) lead
  sine           add 0.3 sin(2 pi t / 0.5), t in [0, 1) over the crop
  partial_sine   the same on one segment of up to 30 %
  partial_noise  add N(0, 0.3^2) white noise on one segment of up to 30 %
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

AMPLITUDE = 0.3  # of the sine and noise operations (the signal is z-scored: in units of its std)


def _segment(t: int, fraction: float, rng: np.random.Generator) -> slice:
  n = int(rng.integers(1, max(int(t * fraction), 1) + 1))
  start = int(rng.integers(0, t - n + 1))
  return slice(start, start + n)


def shift(x, rng, f):
  t = x.shape[-1]
  k = int(rng.integers(-int(t * f), int(t * f) + 1))
  out = np.zeros_like(x)
  if k >= 0:
    out[:, k:] = x[:, :t - k]
  else:
    out[:, :t + k] = x[:, -k:]
  return out


def cutout(x, rng, f):
  out = x.copy()
  out[:, _segment(x.shape[-1], f, rng)] = 0.0
  return out


def drop(x, rng, f):
  t = x.shape[-1]
  out = x.copy()
  out[:, rng.choice(t, int(rng.integers(0, int(t * f) + 1)), replace=False)] = 0.0
  return out


def flip(x, rng, f):
  return -x


def erase(x, rng, f, lead_mask=None):
  present = np.flatnonzero(np.ones(x.shape[0], bool) if lead_mask is None else lead_mask)
  out = x.copy()
  if len(present):
    out[int(rng.choice(present))] = 0.0
  return out


def _sine(t: int) -> np.ndarray:
  return AMPLITUDE * np.sin(2 * np.pi * (np.arange(t) / t) / 0.5)


def sine(x, rng, f):
  return x + _sine(x.shape[-1]).astype(x.dtype)


def partial_sine(x, rng, f):
  out = x.copy()
  seg = _segment(x.shape[-1], f, rng)
  out[:, seg] += _sine(x.shape[-1])[seg].astype(x.dtype)
  return out


def partial_noise(x, rng, f):
  out = x.copy()
  seg = _segment(x.shape[-1], f, rng)
  out[:, seg] += rng.normal(0.0, AMPLITUDE, out[:, seg].shape).astype(x.dtype)
  return out


OPS: dict[str, Callable] = {"shift": shift, "cutout": cutout, "drop": drop, "flip": flip, "erase": erase,
                            "sine": sine, "partial_sine": partial_sine, "partial_noise": partial_noise}


def rand_augment(x: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2, prob: float = 0.5,
                 max_fraction: float = 0.3, lead_mask: np.ndarray | None = None, ops: tuple[str, ...] = tuple(OPS)
                 ) -> np.ndarray:
  """One ECG crop (L, T) -> its augmented copy. Absent leads (lead_mask False) are zero before and after."""
  x = np.asarray(x, np.float32)
  for name in rng.choice(list(ops), size=num_ops, replace=False):
    if rng.random() < prob:
      x = erase(x, rng, max_fraction, lead_mask) if name == "erase" else OPS[name](x, rng, max_fraction)
  if lead_mask is not None:
    x = np.where(np.asarray(lead_mask, bool)[:, None], x, 0.0).astype(np.float32)
  return x


def augment_batch(batch: dict, seed: int, step: int, **kwargs) -> dict:
  """RandAugment every row of a training batch; the RNG of row i is a function of (seed, step, i), so a resumed run
  augments the same way."""
  out = dict(batch)
  signal = np.array(batch["signal"], np.float32, copy=True)
  for i in range(signal.shape[0]):
    rng = np.random.default_rng((seed, step, i))
    signal[i] = rand_augment(signal[i], rng, lead_mask=batch["lead_mask"][i], **kwargs)
  out["signal"] = signal
  return out
