"""The simulator's physiology, measured from its output the way one would measure a real ECG.

Version 1 (the first simulator, kept bit for bit) is checked first, then version 2 class by class. The measurements
are written here with plain signal processing; none reads the simulator's internal parameters.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import signal as sps

from data_pipelines.leads import LEAD_ID, LEADS
from stmem import synthetic
from tests.helpers import synthesize as _synthesize

FS = 250.0


def synthesize(label, seconds=10.0, fs=500.0, rng=None, **kw):
  """Version 1 (the tests of the first half of this file are version 1's)."""
  return _synthesize(label, seconds, fs, rng, version=1, **kw)


def _bandpass(x: np.ndarray, fs: float, lo: float = 0.67, hi: float = 40.0) -> np.ndarray:
  sos = sps.butter(5, [lo, hi], btype="bandpass", fs=fs, output="sos")
  return sps.sosfiltfilt(sos, x, axis=-1)


def _r_peaks(x: np.ndarray, fs: float, rel: float = 0.3) -> np.ndarray:
  """R peaks from the QRS energy of all leads (squared slope of a 5-25 Hz band), so that the detection does not
  depend on the patient's axis making any one lead small."""
  slope = np.diff(_bandpass(x, fs, 5.0, 25.0), axis=-1)
  energy = np.convolve((slope ** 2).sum(axis=0), np.ones(int(0.08 * fs)) / int(0.08 * fs), mode="same")
  peaks, _ = sps.find_peaks(energy, height=rel * np.percentile(energy, 99), distance=int(0.25 * fs))
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
  d = synthetic.make_dataset(40, seed=3, seconds=10.0, fs=FS, version=1)
  assert d["signal"].shape == (40, 12, 2500) and d["signal"].dtype == np.float32
  assert d["labels"].dtype == np.int32 and d["labels"].shape == (40,)
  assert tuple(d["label_names"]) == synthetic.CLASSES
  assert len(set(d["record_id"])) == 40
  patients = set(d["patient_id"])
  assert 10 <= len(patients) < 40  # several records per patient
  for p in patients:  # a patient keeps one condition
    assert len(set(d["labels"][d["patient_id"] == p])) == 1
  assert d["heart_rate"].shape == (40,) and np.all((d["heart_rate"] > 30) & (d["heart_rate"] < 200))
  again = synthetic.make_dataset(40, seed=3, seconds=10.0, fs=FS, version=1)
  np.testing.assert_array_equal(d["signal"], again["signal"])
  np.testing.assert_array_equal(d["record_id"], again["record_id"])
  sub = synthetic.make_dataset(5, seed=1, classes=("normal", "afib"), version=1)
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
  d = synthetic.make_dataset(60, seed=21, fs=FS, version=1)
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
  synthetic.make_dataset(128, seed=0, fs=FS, version=1)
  assert time.perf_counter() - t0 < 5.0
  t0 = time.perf_counter()
  synthetic.make_dataset(128, seed=0, fs=FS, version=2)
  assert time.perf_counter() - t0 < 8.0


# ----------------------------------------------------------------------------------------------------- version 1 kept

# sha256 (first 16 hex digits) of version 1's output, computed with the simulator as it was before version 2 existed:
# the reference is the old code, so version 1 stays reproducible bit for bit (runs recorded `data.simulator = 1`).
V1_REFERENCE = {
  (0, "normal", 500.0, True): "eb598563ac66d6b0",
  (1, "afib", 250.0, True): "07623144fa632c80",
  (2, "wide_qrs", 250.0, False): "90c5bf638cf85786",
  (3, "st_elevation", 500.0, True): "6949439dcd8894ca",
  (4, "brady", 250.0, True): "3ecceac3d8f5e17a",
  (5, "tachy", 100.0, True): "859e27a81ba39ba9",
}
V1_DATASET = {"signal": "11652eeffcdc42d2", "clean_signal": "da090ab497f48483", "labels": "8efab12c90282107",
              "heart_rate": "d4f76a446cf7d3d4"}


def _sha(a: np.ndarray) -> str:
  import hashlib
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_version_1_is_bit_identical_to_the_first_simulator():
  for (seed, label, fs, noise), digest in V1_REFERENCE.items():
    x, _ = synthetic.simulate(label, 10.0, fs, np.random.default_rng(seed), noise=noise, version=1)
    assert _sha(x) == digest, (seed, label)
  d = synthetic.make_dataset(24, seed=7, fs=250.0, with_clean=True, version=1)
  assert {k: _sha(d[k]) for k in V1_DATASET} == V1_DATASET
  assert "multilabel" not in d and tuple(d["label_names"]) == synthetic.CLASSES
  with pytest.raises(ValueError, match="simulator version"):
    synthetic.simulate("normal", version=3)


# ----------------------------------------------------------------------------------------------------------- version 2


def v2(label, rng, noise=False, seconds=10.0):
  return synthetic.simulate(label, seconds, FS, rng, noise=noise, version=2)[0].astype(np.float64)


def _template(x: np.ndarray) -> tuple[np.ndarray, int]:
  """Median beat (leads, 750 ms) around the detected R peaks, and the R peak's index in it."""
  pre, post = int(0.3 * FS), int(0.45 * FS)
  peaks = [p for p in _r_peaks(x, FS) if p >= pre and p + post < x.shape[1]]
  return np.median(np.stack([x[:, p - pre:p + post] for p in peaks]), axis=0), pre


def _qrs(x: np.ndarray) -> np.ndarray:
  """The median beat's QRS (leads, samples), from where the spatial velocity first exceeds 10 % of its peak to
  where it last does, less the level just before it."""
  tp, c = _template(x)
  vel = np.sqrt((np.diff(tp, axis=-1) ** 2).sum(axis=0))
  lo, hi = c - int(0.12 * FS), c + int(0.12 * FS)
  above = lo + np.flatnonzero(vel[lo:hi] > 0.1 * vel[lo:hi].max())
  a, b = above[0], above[-1] + 1
  return tp[:, a:b] - tp[:, a - 3:a].mean(axis=1, keepdims=True)


def _lead(q: np.ndarray, name: str) -> np.ndarray:
  return q[LEAD_ID[name]]


def test_v2_records_fields_and_labels():
  x, info = synthetic.simulate(("afib", "lvh"), 10.0, FS, np.random.default_rng(0), version=2)
  assert x.shape == (12, 2500) and x.dtype == np.float32 and np.all(np.isfinite(x))
  assert info["labels"] == ("afib", "lvh") and info["rhythm"] == "afib"
  assert set(info["beats"]) <= set("NVA") and len(info["beats"]) == len(info["r_times"])
  np.testing.assert_array_equal(x, synthetic.simulate(("afib", "lvh"), 10.0, FS, np.random.default_rng(0))[0])
  for bad, match in ((("afib", "aflutter"), "one rhythm"), (("rbbb", "lbbb"), "exclude"), ("normal", "unknown")):
    with pytest.raises(ValueError, match=match):
      synthetic.simulate(bad, rng=np.random.default_rng(0), version=2)


def test_v2_dataset_is_multilabel_with_one_rhythm():
  d = synthetic.make_dataset(90, seed=4, fs=FS, version=2)
  names = list(d["label_names"])
  assert tuple(names) == synthetic.CLASSES_V2 and d["multilabel"].shape == (90, len(names))
  rhythms = d["multilabel"][:, [names.index(c) for c in synthetic.RHYTHMS]]
  np.testing.assert_array_equal(rhythms.sum(axis=1), 1.0)  # exactly one rhythm per record
  assert np.all(d["multilabel"][np.arange(90), d["labels"]] == 1.0)  # the primary class is among the labels
  assert (d["multilabel"].sum(axis=1) >= 3).any()  # some records carry a rhythm and two findings
  for p in set(d["patient_id"]):
    rows = d["multilabel"][d["patient_id"] == p]
    assert (rows == rows[0]).all()  # a patient keeps its conditions
  for a, b in (("rbbb", "lbbb"), ("lvh", "low_voltage"), ("pac", "afib")):
    assert not (d["multilabel"][:, names.index(a)] * d["multilabel"][:, names.index(b)]).any()
  clean = synthetic.make_dataset(6, seed=4, fs=FS, version=2, with_clean=True)
  np.testing.assert_array_equal(clean["signal"], d["signal"][:6])
  assert np.abs(clean["signal"] - clean["clean_signal"]).mean() > 0.005  # the noise is in the signal only
  i, ii, iii = (LEAD_ID[n] for n in ("I", "II", "III"))
  np.testing.assert_allclose(clean["clean_signal"][:, iii], clean["clean_signal"][:, ii] - clean["clean_signal"][:, i],
                             atol=1e-4)


def test_v2_sinus_rates_and_af_irregularity():
  rng = np.random.default_rng(31)
  for _ in range(4):
    hr = {c: 60.0 / np.mean(_rr(v2(c, rng, noise=True), FS)) for c in ("sinus_brady", "sinus_rhythm", "sinus_tachy")}
    assert hr["sinus_brady"] < 60.0 < hr["sinus_rhythm"] < 100.0 < hr["sinus_tachy"], hr
    cv = {c: (lambda rr: rr.std() / rr.mean())(_rr(v2(c, rng, noise=True), FS)) for c in ("sinus_rhythm", "afib")}
    assert cv["sinus_rhythm"] < 0.08 and cv["afib"] > 0.1, cv


def test_v2_flutter_has_a_regular_sawtooth_at_250_to_350_per_minute_and_m_to_1_conduction():
  """Between a T wave and the next QRS, the inferior leads (II + III + aVF) of flutter show the F-wave troughs: their
  spacing is the atrial cycle, regular and 250-350/min, and every RR is a whole number (2-4) of atrial cycles. Sinus
  rhythm shows at most one dip in such a stretch, so no spacing to measure."""
  inferior = [LEAD_ID[n] for n in ("II", "III", "aVF")]

  def trough_gaps(x: np.ndarray) -> tuple[list[float], np.ndarray]:
    y, peaks, gaps = x[inferior].sum(axis=0), _r_peaks(x, FS), []
    for a, b in zip(peaks[:-1], peaks[1:]):
      lo, hi = a + int(0.33 * FS), b - int(0.07 * FS)
      if hi - lo >= int(0.3 * FS):
        gaps += list(np.diff(sps.find_peaks(-y[lo:hi], prominence=0.08)[0]) / FS)
    return gaps, peaks

  analysed = 0
  for seed in range(40):
    gaps, peaks = trough_gaps(v2("aflutter", np.random.default_rng(seed)))
    if len(gaps) < 3:
      continue  # fast 2:1 conduction leaves no stretch free of QRS and T: nothing to measure between beats
    cycle = float(np.median(gaps))
    assert 250.0 <= 60.0 / cycle <= 350.0, 60.0 / cycle
    assert np.std(gaps) / cycle < 0.1, gaps
    ratios = np.diff(peaks)[1:-1] / FS / cycle  # the first and last peak sit in the filter's edge
    assert np.all(np.abs(ratios - np.round(ratios)) < 0.12) and set(np.round(ratios)) <= {2, 3, 4}, ratios
    analysed += 1
    if analysed == 4:
      break
  assert analysed == 4
  for seed in range(4):
    assert trough_gaps(v2("sinus_brady", np.random.default_rng(seed)))[0] == []


def test_v2_bundle_branch_blocks():
  """QRS >= 120 ms; RBBB: a late positive R' in V1 after its S (rsR'), an S after the R in I or V6; LBBB: V1 mostly
  negative (QS or rS) and a broad R in I or V6 (>= 60 ms above half its height)."""
  rng = np.random.default_rng(32)
  for _ in range(5):
    assert _qrs_width(v2("sinus_rhythm", rng), FS) < 0.115
    for label in ("rbbb", "lbbb"):
      x = v2(label, rng)
      assert _qrs_width(x, FS) >= 0.13, label  # this measure reads ~10 ms long (Gaussian tails)
      q = _qrs(x)
      v1_, v6 = _lead(q, "V1"), _lead(q, "V6")
      if label == "rbbb":
        s_at = int(np.argmin(v1_))
        assert v1_[s_at:].max() > 0.15 and int(np.argmax(v1_)) > s_at, v1_.round(2)
        assert min(lead[int(np.argmax(lead)):].min() for lead in (_lead(q, "I"), v6)) < -0.1  # S after R
      else:
        assert -v1_.min() > 2 * max(v1_.max(), 0.0) and v1_.min() < -0.3, v1_.round(2)
        broad = max(((lead > 0.5 * lead.max()).sum() / FS) for lead in (_lead(q, "I"), v6, _lead(q, "V5")))
        assert broad >= 0.06, broad


def _sokolow(x: np.ndarray) -> float:
  q = _qrs(x)
  return max(0.0, -_lead(q, "V1").min()) + max(_lead(q, "V5").max(), _lead(q, "V6").max())


def test_v2_lvh_meets_sokolow_lyon_and_normal_does_not():
  rng = np.random.default_rng(33)
  lvh = [_sokolow(v2("lvh", rng)) for _ in range(6)]
  normal = [_sokolow(v2("sinus_rhythm", rng)) for _ in range(6)]
  assert min(lvh) > 3.5 and max(normal) < 3.5, (lvh, normal)
  # Strain in most LVH records: the lateral T waves (V5, V6) inverted, which a normal ECG's are not.
  lateral = [LEAD_ID["V5"], LEAD_ID["V6"]]

  def lateral_t(x: np.ndarray) -> float:  # mean of V5, V6 150-350 ms after R, against the level 250 ms before R
    tp, c = _template(x)
    return float((tp[lateral, c + int(0.15 * FS):c + int(0.35 * FS)] - tp[lateral, c - int(0.25 * FS)][:, None]).mean())

  assert sum(lateral_t(v2("lvh", rng)) < -0.05 for _ in range(8)) >= 3
  assert all(lateral_t(v2("sinus_rhythm", rng)) > 0.0 for _ in range(6))


def _axis(x: np.ndarray) -> float:
  q = _qrs(x)
  return float(np.rad2deg(np.arctan2(_lead(q, "aVF").sum() / (np.sqrt(3) / 2), _lead(q, "I").sum())))


def test_v2_axis_deviation():
  rng = np.random.default_rng(34)
  for _ in range(5):
    normal, left, right = (_axis(v2(c, rng)) for c in ("sinus_rhythm", "axis_left_deviation", "axis_right_deviation"))
    assert -30.0 < normal < 90.0 and left < -30.0 and right > 90.0, (normal, left, right)


def test_v2_low_voltage_in_the_limb_leads():
  rng = np.random.default_rng(35)
  for _ in range(5):
    for label in ("low_voltage", "sinus_rhythm"):
      x = v2(label, rng)
      peaks = _r_peaks(x, FS)
      ptp = np.median([np.ptp(x[:6, p - int(0.06 * FS):p + int(0.06 * FS)], axis=1) for p in peaks[1:-1]], axis=0)
      assert (ptp.max() < 0.5) == (label == "low_voltage"), (label, ptp.round(2))


def _q_wave(lead: np.ndarray) -> tuple[float, float, float]:
  """(duration s, depth mV, the following R mV) of an initial negative deflection of a QRS that starts at 0 (zeros
  if it starts upwards)."""
  start = np.flatnonzero(np.abs(lead) > 0.03)
  if not start.size or lead[start[0]] > 0:
    return 0.0, 0.0, 0.0
  back = np.flatnonzero(lead[start[0]:] >= 0)
  end = start[0] + (back[0] if back.size else lead.size - start[0])
  return (end - start[0]) / FS, float(-lead[start[0]:end].min()), float(lead[end:].max(initial=0.0))


def _pathological(lead: np.ndarray) -> bool:
  """A Q wave >= 40 ms, or deeper than 25 % of the R wave (and 0.1 mV at least)."""
  width, depth, r = _q_wave(lead)
  return depth >= 0.1 and (width >= 0.04 or depth > 0.25 * r)


def test_v2_pathological_q_waves():
  """An old infarct: pathological Q waves in two leads of one wall (inferior, anterior or lateral); none in a normal
  ECG's I, II, V5, V6."""
  walls = (("II", "III", "aVF"), ("V1", "V2", "V3", "V4"), ("I", "aVL", "V5", "V6"))
  rng = np.random.default_rng(36)
  for _ in range(6):
    q = _qrs(v2("q_waves", rng))
    hits = [sum(_pathological(_lead(q, n)) for n in wall) for wall in walls]
    assert max(hits) >= 2, [[_q_wave(_lead(q, n)) for n in wall] for wall in walls]
    q = _qrs(v2("sinus_rhythm", rng))
    assert not any(_pathological(_lead(q, n)) for n in ("I", "II", "V5", "V6"))


def test_v2_qt_follows_rr():
  """R to T-peak (the lead with the largest T) lengthens with RR the way QT does (Fridericia, Bazett): across
  brady-, normo- and tachycardic records, longer RR, longer RT; and RT / RR^(1/3) stays in a narrow band."""
  rng = np.random.default_rng(37)
  rr, rt = [], []
  for _ in range(4):
    for label in ("sinus_brady", "sinus_rhythm", "sinus_tachy"):
      x = v2(label, rng)
      tp, c = _template(x)
      cycle = np.median(_rr(x, FS))
      lo, hi = c + int(0.15 * FS), c + int(min(0.5, cycle - 0.15) * FS)  # after the QRS, before the next P
      k = int(np.argmax(np.abs(tp[:, lo:hi]).max(axis=1)))
      rt.append((lo + int(np.argmax(np.abs(tp[k, lo:hi]))) - c) / FS)
      rr.append(cycle)
  rr, rt = np.asarray(rr), np.asarray(rt)
  from scipy.stats import spearmanr
  assert spearmanr(rr, rt).statistic > 0.7, (rr.round(2), rt.round(3))
  slow, fast = rt[rr > 1.05].mean(), rt[rr < 0.6].mean()
  assert slow - fast > 0.04, (slow, fast)
  corrected = rt / np.cbrt(rr)
  assert corrected.std() / corrected.mean() < 0.12


def _beat_widths(x: np.ndarray, peaks: np.ndarray) -> np.ndarray:
  vel = np.sqrt((np.diff(x, axis=-1) ** 2).sum(axis=0))
  out = []
  for p in peaks:
    seg = vel[max(p - int(0.15 * FS), 0):p + int(0.15 * FS)]
    above = np.flatnonzero(seg > 0.1 * seg.max())
    out.append((above[-1] - above[0] + 1) / FS)
  return np.asarray(out)


def test_v2_ectopic_beats():
  """PVC: premature, wide (>= 120 ms), followed by a full compensatory pause (the RRs around it sum to two sinus
  cycles). PAC: premature, narrow, and the sinus node reset (the sum falls short of two cycles)."""
  for label in ("pvc", "pac"):
    found = 0
    for seed in range(8):
      x = v2(label, np.random.default_rng(100 + seed))
      peaks = _r_peaks(x, FS, rel=0.08)  # sensitive: a broad ectopic QRS has less slope energy
      rr = np.diff(peaks) / FS  # rr[k]: from beat k to beat k + 1
      cycle = np.median(rr)
      widths = _beat_widths(x, peaks)
      for b in range(2, len(peaks) - 2):
        if not (rr[b - 1] < 0.85 * cycle and rr[b - 2] > 0.9 * cycle):
          continue  # beat b is premature, after a sinus cycle
        found += 1
        around = rr[b - 1] + rr[b]  # the two RRs around beat b, against the sinus cycles on either side of them
        local = np.median([r for r in (*rr[max(b - 3, 0):b - 1], *rr[b + 1:b + 3]) if r > 0.9 * cycle])
        if label == "pvc":
          assert widths[b] >= 0.12 and widths[b] > np.median(widths) + 0.02, (widths[b], np.median(widths))
          assert abs(around - 2 * local) < 0.2 * local, (around, local)
        else:
          assert widths[b] < 0.12, widths[b]
          assert around < 1.9 * local, (around, local)
    assert found >= 6, label


def test_v2_noise_has_mains_and_baseline_wander():
  """The noise (noisy record less the clean one, all leads): a line at exactly 50 or 60 Hz standing out of the
  40-70 Hz band (both occur), and most of its power below 0.7 Hz (baseline wander)."""
  lines = set()
  for seed in range(6):
    x = synthetic.simulate("sinus_rhythm", 10.0, FS, np.random.default_rng(seed), version=2)[0].astype(np.float64)
    clean = synthetic.simulate("sinus_rhythm", 10.0, FS, np.random.default_rng(seed), noise=False, version=2)[0]
    f, pxx = sps.welch(x - clean, fs=FS, nperseg=1000)
    pxx = pxx.sum(axis=0)
    band = (f > 40) & (f < 70)
    line = float(f[band][np.argmax(pxx[band])])
    assert line in (50.0, 60.0) and pxx[f == line][0] > 10 * np.median(pxx[band]), line
    lines.add(line)
    f, pxx = sps.periodogram(x - clean, fs=FS)
    pxx = pxx.sum(axis=0)
    assert pxx[(f > 0) & (f < 0.7)].sum() > pxx[(f > 1) & (f < 5)].sum()
  assert lines == {50.0, 60.0}


def test_v2_einthoven_and_goldberger():
  i, ii, iii, avr = (LEAD_ID[n] for n in ("I", "II", "III", "aVR"))
  for label in synthetic.CLASSES_V2:
    clean = v2(label, np.random.default_rng(2))
    scale = np.abs(clean).max()
    np.testing.assert_allclose(clean[iii], clean[ii] - clean[i], atol=1e-5 * scale)
    np.testing.assert_allclose(clean[avr], -(clean[i] + clean[ii]) / 2, atol=1e-5 * scale)
