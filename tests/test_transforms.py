"""Transforms: parity with the reference preprocessing fixture, and each function's own behaviour."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_pipelines import leads as leads_lib
from data_pipelines import transforms as T
from data_pipelines.record import Record
from data_pipelines.contract import Contract


def test_reference_preprocessing_parity(reference_fixture):
  """raw 500 Hz -> FFT resample to 2500 -> first 2250 -> band-pass -> one z-score, as the reference computed it."""
  raw, expected = reference_fixture["prep/raw_500hz"], reference_fixture["prep/processed_250hz_first2250"]
  contract = Contract()
  for ecg, want in zip(raw, expected):
    record = Record(signal=ecg, fs=500.0, leads=leads_lib.LEADS, record_id="1")
    stored = T.prepare_record_windows(record, contract)[0]  # what a prepared dataset stores (float32, unfiltered)
    assert stored.shape == (12, 2500) and stored.dtype == np.float32
    got = T.finish_crop(stored[:, :contract.window], contract)
    assert np.abs(got - want).max() <= 1e-4
    direct = T.zscore(T.bandpass(T.resample(ecg.astype(np.float64), 500, 250)[:, :2250], 250.0))
    assert np.abs(direct - want).max() <= 1e-5


def test_record_windows_match_reference_and_offline_filtering(reference_fixture):
  raw, expected = reference_fixture["prep/raw_500hz"], reference_fixture["prep/processed_250hz_first2250"]
  record = Record(signal=raw[0], fs=500.0, leads=leads_lib.LEADS, record_id="1")
  per_crop = Contract()
  offline = dataclasses.replace(per_crop, filter_stage="offline")
  stored = T.prepare_record_windows(record, per_crop)
  assert stored.shape == (1, 12, 2500) and stored.dtype == np.float32
  assert np.abs(T.finish_crop(stored[0, :, :2250], per_crop) - expected[0]).max() <= 1e-4
  filtered = T.prepare_record_windows(record, offline)
  assert not np.allclose(filtered, stored, atol=1e-3)  # the filter really ran offline
  # offline: filtered once over 10 s, then cropped; close to the reference but not equal (filter edges differ)
  diff = np.abs(T.finish_crop(filtered[0, :, :2250], offline) - expected[0])
  assert np.median(diff) < 0.05 and diff.max() > 1e-4


def test_resample_lengths_and_identity():
  x = np.random.default_rng(0).standard_normal((2, 3600)).astype(np.float32)
  assert T.resample(x, 360, 250).shape == (2, 2500) and T.resample(x, 360, 250).dtype == np.float32
  np.testing.assert_array_equal(T.resample(x, 250, 250), x)
  t = np.arange(1000) / 500.0
  slow = np.sin(2 * np.pi * 3 * t)
  np.testing.assert_allclose(T.resample(slow, 500, 250), slow[::2], atol=1e-6)  # band-limited: exact


def test_bandpass_removes_drift_and_high_frequency():
  fs = 250.0
  t = np.arange(5000) / fs
  ecg_band = np.sin(2 * np.pi * 10 * t)
  x = ecg_band + 2.0 * np.sin(2 * np.pi * 0.1 * t) + 0.5 * np.sin(2 * np.pi * 80 * t)
  y = T.bandpass(x, fs)
  mid = slice(1250, -1250)  # away from the forward-backward edge transients
  assert np.abs(y[mid] - ecg_band[mid]).max() < 0.01
  assert np.abs(T.bandpass(x, fs, highpass_hz=None, lowpass_hz=None) - x).max() == 0
  with pytest.raises(ValueError, match="Nyquist"):
    T.bandpass(x, 60.0)


def test_zscore_over_all_leads_flat_and_masked():
  x = np.stack([np.arange(10.0), 10 + np.arange(10.0)])
  z = T.zscore(x)
  assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
  assert z[1].mean() > 0 > z[0].mean()  # one mean for both leads, not per lead
  assert not T.zscore(np.full((12, 100), 3.0)).any()
  slots = np.zeros((3, 10))
  slots[0], slots[2] = np.arange(10.0), -np.arange(10.0)
  masked = T.zscore(slots, lead_mask=np.array([True, False, True]))
  assert not masked[1].any() and abs(masked[[0, 2]].std() - 1) < 1e-12


def test_windows_drop_nan_and_remainder():
  x = np.arange(2 * 1050, dtype=float).reshape(2, 1050)
  x[1, 250] = np.nan
  w = T.windows(x, 200)
  assert w.shape == (4, 2, 200)  # 5 full windows, the second holds NaN; 50 samples left over
  np.testing.assert_array_equal(w[1], x[:, 400:600])


def test_prepare_record_windows_long_short_and_missing_leads():
  rng = np.random.default_rng(1)
  long = Record(signal=rng.standard_normal((2, 360 * 25)).astype(np.float32), fs=360.0, leads=("V5", "II"),
                record_id="x")
  out = T.prepare_record_windows(long, Contract())
  assert out.shape == (2, 12, 2500)  # 25 s -> two 10 s windows
  mask = T.lead_mask(long, Contract())
  assert mask.sum() == 2 and mask[leads_lib.LEAD_ID["II"]] and mask[leads_lib.LEAD_ID["V5"]]
  assert not out[:, ~mask].any()
  np.testing.assert_allclose(out[0, leads_lib.LEAD_ID["II"]], T.resample(long.signal[1, :3600], 360, 250),
                             atol=1e-5)
  short = dataclasses.replace(long, signal=long.signal[:, :3000])
  assert T.prepare_record_windows(short, Contract()).shape == (0, 12, 2500)
  limb = dataclasses.replace(Contract(), leads=("II", "I"))
  assert T.prepare_record_windows(long, limb).shape == (2, 2, 2500)


def test_hashed_crop_starts_are_uniform_and_a_function_of_seed_epoch_index():
  index = np.arange(20000)
  length = np.full(20000, 2500)
  a = T.hashed_starts(0, 0, index, length, 2250)
  assert a.min() == 0 and a.max() == 250 and len(np.unique(a)) == 251
  counts = np.bincount(a, minlength=251)
  assert counts.min() > 40 and counts.max() < 130  # about 80 each
  np.testing.assert_array_equal(T.hashed_starts(0, 0, index[::-1], length, 2250), a[::-1])  # order-free
  assert (T.hashed_starts(0, 1, index, length, 2250) != a).mean() > 0.99   # a new epoch, new crops
  assert (T.hashed_starts(1, 0, index, length, 2250) != a).mean() > 0.99   # a new seed, new crops
  assert (T.hashed_starts(0, 0, index[:3], np.array([2250, 2251, 9000]), 2250) <= [0, 1, 6750]).all()
  with pytest.raises(ValueError):
    T.hashed_starts(0, 0, index[:1], np.array([100]), 2250)
