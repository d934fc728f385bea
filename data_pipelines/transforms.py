"""Resampling, filters, standardisation, windows and crops: pure numpy, time on the last axis.

Resampling and filters compute in float64 (the reference preprocessing does); the z-score works in the input's
dtype (pairwise sums). Each returns the dtype it was given, so a float32 pipeline stays float32 and a float64 check
stays exact. The per-crop functions (`bandpass`, `zscore`,
`finish_crop`) take one ECG (L, T) or a batch (..., L, T) alike: the input pipeline calls them once per batch.
"""
from __future__ import annotations

import functools

import numpy as np
import scipy.signal

from data_pipelines.record import Record
from data_pipelines.contract import Contract

EVAL_CROPS = 3  # the reference averages its predictions over 3 crops of each record


def _float_dtype(x: np.ndarray) -> np.dtype:
  return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)


def resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
  """FFT resampling (`scipy.signal.resample`) along the last axis to round(T * fs_out / fs_in) samples."""
  x = np.asarray(x)
  if fs_in == fs_out:
    return x.astype(_float_dtype(x), copy=True)
  n_out = int(round(x.shape[-1] * float(fs_out) / float(fs_in)))
  return resample_to(x, n_out)


def resample_to(x: np.ndarray, n_out: int) -> np.ndarray:
  """FFT resampling along the last axis to exactly `n_out` samples."""
  x = np.asarray(x)
  if x.shape[-1] == n_out:
    return x.astype(_float_dtype(x), copy=True)
  y = scipy.signal.resample(x.astype(np.float64), n_out, axis=-1)
  return y.astype(_float_dtype(x))


@functools.lru_cache(maxsize=64)
def _butter(order: int, hz: float, btype: str, fs: float) -> np.ndarray:
  """Filter designs are cached: designing costs more than filtering a 9 s crop."""
  return scipy.signal.butter(order, hz, btype=btype, fs=fs, output="sos")


def bandpass(x: np.ndarray, fs: float, highpass_hz: float | None = 0.67, lowpass_hz: float | None = 40.0,
             order: int = 5) -> np.ndarray:
  """Butterworth high-pass then low-pass, each zero-phase (`sosfiltfilt`), as the reference does; None skips one."""
  x = np.asarray(x)
  y = x.astype(np.float64)
  if highpass_hz:
    sos = _butter(order, float(highpass_hz), "highpass", float(fs)).copy()  # scipy wants a writable array
    y = scipy.signal.sosfiltfilt(sos, y, axis=-1)
  if lowpass_hz:
    if lowpass_hz >= fs / 2:
      raise ValueError(f"low-pass {lowpass_hz} Hz is not below the Nyquist rate of {fs} Hz")
    sos = _butter(order, float(lowpass_hz), "lowpass", float(fs)).copy()
    y = scipy.signal.sosfiltfilt(sos, y, axis=-1)
  return y.astype(_float_dtype(x))


def zscore(x: np.ndarray, lead_mask: np.ndarray | None = None, eps: float = 1e-8) -> np.ndarray:
  """One mean and std over all leads and time of each ECG (..., L, T); a flat ECG becomes zeros.

  With `lead_mask` (..., L), only present leads count and absent rows come out zero, so an absent lead (a zero row
  in the slot layout) does not shrink the statistics of the leads that exist.

  Sums are numpy's pairwise sums in the input's dtype: on a float32 batch (64, 12, 2250) they come within 7e-7 of
  a float64 computation (the float64-accumulating version was within 6e-7) at a third of its cost (two passes
  fewer, no conversions), which is a third of the input pipeline's per-sample cost.
  """
  x = np.asarray(x)
  y = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
  axes = (-2, -1)
  present = None if lead_mask is None else np.broadcast_to(np.asarray(lead_mask, bool), y.shape[:-1])
  if present is None or present.all():
    count = y.shape[-2] * y.shape[-1]
    centred = y - y.mean(axis=axes, keepdims=True)
  else:
    weight = present[..., None].astype(y.dtype)                                            # (..., L, 1)
    count = np.maximum(present.sum(axis=-1) * y.shape[-1], 1)[..., None, None].astype(y.dtype)  # present samples
    centred = (y - (y * weight).sum(axis=axes, keepdims=True) / count) * weight
  std = np.sqrt(np.square(centred).sum(axis=axes, keepdims=True) / count)
  centred *= np.where(std > eps, 1.0 / np.maximum(std, eps), 0.0).astype(y.dtype)  # flat (or empty) ECG -> zeros
  return centred.astype(_float_dtype(x), copy=False)


def windows(x: np.ndarray, n: int) -> np.ndarray:
  """Non-overlapping windows of `n` samples (W, L, n) from (L, T); a trailing remainder and windows holding any NaN
  are dropped."""
  x = np.asarray(x)
  count = x.shape[-1] // n
  out = x[..., :count * n].reshape(*x.shape[:-1], count, n)
  out = np.moveaxis(out, -2, 0)
  keep = ~np.isnan(out).reshape(count, -1).any(axis=1)
  return np.ascontiguousarray(out[keep])


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection that scrambles every bit."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hashed_starts(seed: int, epoch: int, index: np.ndarray, length: np.ndarray, n: int) -> np.ndarray:
  """Random crop starts (uniform over 0..length - n) for a batch, each a pure function of (seed, epoch, index).

  Why hashed rather than a Generator per example: a `default_rng` costs 10-45 us to create here, about a tenth of
  a sample's whole budget at 4,000 samples/s on two cores; this is one vectorised pass for the batch. The modulo
  bias is below 1e-15 for spans of a few thousand samples.
  """
  index, length = np.asarray(index, np.int64), np.asarray(length, np.int64)
  if (length < n).any():
    raise ValueError(f"cannot crop {n} samples from {int(length.min())}")
  with np.errstate(over="ignore"):
    key = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(0x9E3779B97F4A7C15))
    key = _mix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    key = _mix64(key ^ index.astype(np.uint64))
  return (key % (length - n + 1).astype(np.uint64)).astype(np.int64)


def eval_starts(record_samples: int, window: int, crops: int = EVAL_CROPS) -> tuple[int, ...]:
  """Crop starts spread evenly over a record: (0, 125, 250) for the reference's 2500-sample records and 2250 window
  (0, 0.5 and 1 s at 250 Hz)."""
  if window > record_samples:
    raise ValueError(f"records of {record_samples} samples are shorter than the window of {window}")
  return tuple(int(round(s)) for s in np.linspace(0, record_samples - window, crops))


def _filter(x: np.ndarray, contract: Contract) -> np.ndarray:
  return bandpass(x, contract.fs, contract.highpass_hz, contract.lowpass_hz, contract.filter_order)


def prepare_record_windows(record: Record, contract: Contract) -> np.ndarray:
  """A record -> float32 (W, len(contract.leads), record_samples) windows at `contract.fs`, leads in contract order.

  The record is cut into non-overlapping windows of `record_samples / contract.fs` seconds at its own rate first,
  windows holding NaN are dropped, and each window is FFT-resampled to exactly `record_samples` (for a 10 s record
  this is the reference's resampling of the whole record). Leads the record lacks are zero rows; which rows are
  real is `lead_mask(record, contract)`. A record shorter than one window gives W = 0.
  """
  native = int(round(contract.record_samples * float(record.fs) / contract.fs))
  if record.signal.shape[-1] < native:
    return np.zeros((0, len(contract.leads), contract.record_samples), np.float32)
  mask = lead_mask(record, contract)
  slots = np.zeros((len(contract.leads), record.signal.shape[-1]), np.float64)
  for row, name in zip(record.signal, record.leads):
    if name in contract.leads:
      slots[contract.leads.index(name)] = row
  pieces = windows(slots, native)
  out = np.zeros((len(pieces), len(contract.leads), contract.record_samples), np.float32)
  for i, piece in enumerate(pieces):
    if contract.resample != "fft":
      raise ValueError(f"unsupported resampling {contract.resample!r}")
    y = resample_to(piece, contract.record_samples)
    if contract.filter_stage == "offline":
      y = _filter(y, contract)
    y[~mask] = 0.0
    out[i] = y
  return out


def lead_mask(record: Record, contract: Contract) -> np.ndarray:
  """(len(contract.leads),) bool: which contract lead slots the record fills."""
  return np.array([name in record.leads for name in contract.leads], bool)


def finish_crop(crop: np.ndarray, contract: Contract, lead_mask: np.ndarray | None = None) -> np.ndarray:
  """Crops (..., L, window) as stored -> float32 model input: band-pass if `filter_stage` is "per_crop" (in
  float64), then one z-score per ECG."""
  y = np.asarray(crop)
  if contract.filter_stage == "per_crop":
    y = _filter(y.astype(np.float64), contract)
  if contract.normalisation != "zscore_per_ecg":
    raise ValueError(f"unknown normalisation {contract.normalisation!r}")
  return zscore(y, lead_mask).astype(np.float32, copy=False)

