"""The simulator's physiology, measured from its output the way one would measure a real ECG."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import signal as sps

from data_pipelines.leads import LEAD_ID, LEADS
from stmem import synthetic
from tests.helpers import synthesize

FS = 250.0


def _bandpass(x: np.ndarray, fs: float, lo: float = 0.67, hi: float = 40.0) -> np.ndarray:
  sos = sps.butter(5, [lo, hi], btype="bandpass", fs=fs, output="sos")
  return sps.sosfiltfilt(sos, x, axis=-1)


def _r_peaks(x: np.ndarray, fs: float) -> np.ndarray:
  """R peaks from the QRS energy of all leads (squared slope of a 5-25 Hz band), so that the detection does not
  depend on the patient's axis making any one lead small."""
  slope = np.diff(_bandpass(x, fs, 5.0, 25.0), axis=-1)
  energy = np.convolve((slope ** 2).sum(axis=0), np.ones(int(0.08 * fs)) / int(0.08 * fs), mode="same")
  peaks, _ = sps.find_peaks(energy, height=0.3 * np.percentile(energy, 99), distance=int(0.25 * fs))
  return peaks


def _rr(x: np.ndarray, fs: float) -> np.ndarray:
  return np.diff(_r_peaks(x, fs)) / fs


def _qrs_width(x: np.ndarray, fs: float) -> float:
  """Median QRS duration (s): time around each R peak where the spatial velocity exceeds 10 % of its peak."""
  vel = np.sqrt((np.diff(x, axis=-1) ** 2).sum(axis=0)) * fs
  widths = []
  half = int(0.15 * fs)
  for p in _r_peaks(x, fs):
    if p - half < 0 or p + half >= vel.size:
      continue
    seg = vel[p - half:p + half]
    above = np.flatnonzero(seg > 0.1 * seg.max())
    widths.append((above[-1] - above[0] + 1) / fs)
  return float(np.median(widths))


def _st_level(x: np.ndarray, fs: float) -> np.ndarray:
  """Per-lead median ST level (mV): 80 ms after the R peak against the PR segment 70 ms before it."""
  peaks = [p for p in _r_peaks(x, fs) if p - int(0.07 * fs) >= 0 and p + int(0.08 * fs) < x.shape[1]]
  st = [x[:, p + int(0.08 * fs)] - x[:, p - int(0.07 * fs)] for p in peaks]
  return np.median(np.stack(st), axis=0)


def test_shapes_dtype_and_determinism():
  a = synthesize("normal", 10.0, 500.0, np.random.default_rng(7))
  b = synthesize("normal", 10.0, 500.0, np.random.default_rng(7))
  c = synthesize("normal", 10.0, 500.0, np.random.default_rng(8))
  assert a.shape == (12, 5000) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert np.all(np.isfinite(a))
  # Realistic amplitudes: the largest deflection of a normal ECG is a few mV, not volts or microvolts.
  assert 0.4 < np.abs(a).max() < 6.0
  with pytest.raises(ValueError, match="unknown class"):
    synthesize("nonsense", rng=np.random.default_rng(0))


def test_make_dataset_fields_and_patients():
  d = synthetic.make_dataset(40, seed=3, seconds=10.0, fs=FS)
  assert d["signal"].shape == (40, 12, 2500) and d["signal"].dtype == np.float32
  assert d["labels"].dtype == np.int32 and d["labels"].shape == (40,)
  assert tuple(d["label_names"]) == synthetic.CLASSES
  assert len(set(d["record_id"])) == 40
  patients = set(d["patient_id"])
  assert 10 <= len(patients) < 40  # several records per patient
  for p in patients:  # a patient keeps one condition
    assert len(set(d["labels"][d["patient_id"] == p])) == 1
  assert d["heart_rate"].shape == (40,) and np.all((d["heart_rate"] > 30) & (d["heart_rate"] < 200))
  again = synthetic.make_dataset(40, seed=3, seconds=10.0, fs=FS)
  np.testing.assert_array_equal(d["signal"], again["signal"])
  np.testing.assert_array_equal(d["record_id"], again["record_id"])
  sub = synthetic.make_dataset(5, seed=1, classes=("normal", "afib"))
  assert set(sub["labels"].tolist()) <= {0, 1} and tuple(sub["label_names"]) == ("normal", "afib")


def test_einthoven_and_goldberger():
  i, ii, iii, avr, avl, avf = (LEAD_ID[n] for n in ("I", "II", "III", "aVR", "aVL", "aVF"))
  for label in synthetic.CLASSES:
    clean = synthesize(label, 10.0, FS, np.random.default_rng(1), noise=False).astype(np.float64)
    scale = np.abs(clean).max()
    np.testing.assert_allclose(clean[iii], clean[ii] - clean[i], atol=1e-5 * scale)
    np.testing.assert_allclose(clean[avr], -(clean[i] + clean[ii]) / 2, atol=1e-5 * scale)
    np.testing.assert_allclose(clean[avl], clean[i] - clean[ii] / 2, atol=1e-5 * scale)
    np.testing.assert_allclose(clean[avf], clean[ii] - clean[i] / 2, atol=1e-5 * scale)
    # With noise the laws hold up to the small per-channel amplifier noise.
    noisy = synthesize(label, 10.0, FS, np.random.default_rng(1)).astype(np.float64)
    resid = noisy[iii] - (noisy[ii] - noisy[i])
    assert resid.std() < 0.05 * noisy[[i, ii, iii]].std()


def test_heart_rate_classes():
  rng = np.random.default_rng(11)
  for _ in range(6):
    hr = {c: 60.0 / np.mean(_rr(synthesize(c, 10.0, FS, rng), FS)) for c in ("normal", "brady", "tachy")}
    assert hr["brady"] < 60.0 < hr["normal"] < 100.0 < hr["tachy"], hr


def test_afib_is_irregularly_irregular_and_has_no_p_waves():
  rng = np.random.default_rng(12)
  cv = {c: [] for c in ("normal", "afib")}
  for _ in range(6):
    for c in cv:
      rr = _rr(synthesize(c, 10.0, FS, rng), FS)
      cv[c].append(rr.std() / rr.mean())
  assert max(cv["normal"]) < 0.08 and min(cv["afib"]) > 0.1, cv
  assert np.median(cv["afib"]) > 3 * np.median(cv["normal"])
  # No P wave but f-waves: average the stretch before each QRS (R-200 ms to R-60 ms) over beats. In sinus rhythm the
  # P wave is locked to the QRS and survives averaging, with little left over; in AF the 4-9 Hz f-waves are not
  # locked to the QRS, so the average is nearly flat and most of the activity is left in the beat-to-beat residual.
  ii, v1 = LEAD_ID["II"], LEAD_ID["V1"]
  for seed in range(4):
    p_wave, f_wave = {}, {}
    for c in ("normal", "afib"):
      x = synthesize(c, 10.0, FS, np.random.default_rng(seed), noise=False)
      peaks = [p for p in _r_peaks(x, FS) if p >= int(0.2 * FS)]
      pre = np.stack([x[:, p - int(0.2 * FS):p - int(0.06 * FS)] for p in peaks])  # (beats, leads, samples)
      template = pre.mean(axis=0)
      p_wave[c] = np.ptp(template[ii])
      f_wave[c] = (pre[:, v1] - template[v1]).std()
    assert p_wave["normal"] > 0.05 and p_wave["afib"] < 0.6 * p_wave["normal"], p_wave
    assert f_wave["afib"] > 0.02 and f_wave["afib"] > 3 * f_wave["normal"], f_wave


def test_wide_qrs_is_wider():
  rng = np.random.default_rng(13)
  for _ in range(4):
    normal = _qrs_width(synthesize("normal", 10.0, FS, rng, noise=False), FS)
    wide = _qrs_width(synthesize("wide_qrs", 10.0, FS, rng, noise=False), FS)
    assert normal < 0.12 and wide > 0.14, (normal, wide)  # this measure reads ~10 ms long: Gaussian tails


def test_st_elevation_raises_st_in_some_leads():
  rng = np.random.default_rng(14)
  for _ in range(6):
    normal = _st_level(synthesize("normal", 10.0, FS, rng, noise=False), FS)
    ste = _st_level(synthesize("st_elevation", 10.0, FS, rng, noise=False), FS)
    assert normal.max() < 0.05, dict(zip(LEADS, normal.round(3)))
    assert ste.max() > 0.1, dict(zip(LEADS, ste.round(3)))
    assert (ste > 0.1).sum() >= 2  # a lead group, not a single lead


def _features(x: np.ndarray, fs: float) -> np.ndarray:
  """Heart rate, RR irregularity, QRS width, largest ST elevation: what a cardiologist reads first."""
  x = _bandpass(x.astype(np.float64), fs)
  rr = _rr(x, fs)
  return np.array([60.0 / rr.mean(), rr.std() / rr.mean(), _qrs_width(x, fs), _st_level(x, fs).max()])


def test_classes_are_distinguishable():
  """Each class stands out from `normal` on its hallmark feature, on noisy filtered records, for most records."""
  d = synthetic.make_dataset(60, seed=21, fs=FS)
  feats = np.stack([_features(x, FS) for x in d["signal"]])
  names = list(d["label_names"])
  by = {c: feats[d["labels"] == names.index(c)] for c in names}
  normal = by["normal"]
  def separation(a: np.ndarray, b: np.ndarray) -> float:  # P(a > b) over pairs: a rank AUROC
    return float((a[:, None] > b[None, :]).mean())
  assert separation(normal[:, 0], by["brady"][:, 0]) == 1.0
  assert separation(by["tachy"][:, 0], normal[:, 0]) == 1.0
  assert separation(by["afib"][:, 1], normal[:, 1]) > 0.95
  assert separation(by["wide_qrs"][:, 2], normal[:, 2]) > 0.95
  assert separation(by["st_elevation"][:, 3], normal[:, 3]) > 0.9


def test_make_dataset_is_fast():
  import time
  t0 = time.perf_counter()
  synthetic.make_dataset(128, seed=0, fs=FS)
  assert time.perf_counter() - t0 < 5.0
