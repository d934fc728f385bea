"""A physiological 12-lead ECG simulator: built-in data for the demo, the tests and smoke runs.

The heart is a single time-varying electric dipole (the "heart vector"). Each beat is a sum of P, Q, R, S and T
waves, each wave a Gaussian bump in time along its own 3-D direction, so the vector traces the familiar P, QRS and
T loops. The vector is projected onto the nine electrodes (RA, LA, LL, V1..V6, referenced to Wilson's central
terminal); the twelve leads are then formed from electrode potentials exactly as an ECG machine forms them. Two
consequences follow by construction:

- Einthoven's and Goldberger's laws (III = II - I, aVR = -(I + II) / 2, ...) hold exactly for everything that
  lives at the electrodes: the heart signal, baseline wander, powerline and muscle noise. Only a small per-channel
  amplifier noise, added after the leads are formed, makes them approximate, as in a real recording.
- A patient's heart axis, rotation and electrode placement shape every lead coherently, so records of one patient
  look alike and records of different patients differ the way real ones do.

Coordinates: x points to the patient's left, y inferior (feet), z anterior (chest). Frontal-plane angles follow the
hexaxial convention: 0 deg is lead I (+x), +90 deg is aVF (+y).

Pure numpy, deterministic from a `np.random.Generator`; no JAX.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipelines.leads import LEADS

# Version 1's classes, one per record.
CLASSES: tuple[str, ...] = ("normal", "afib", "brady", "tachy", "wide_qrs", "st_elevation")
# Version 2's classes: exactly one rhythm per record, and any number of compatible findings (multi-label).
RHYTHMS: tuple[str, ...] = ("sinus_rhythm", "sinus_brady", "sinus_tachy", "afib", "aflutter")
FINDINGS: tuple[str, ...] = ("pvc", "pac", "rbbb", "lbbb", "lvh", "axis_left_deviation", "axis_right_deviation",
                             "low_voltage", "q_waves", "st_elevation")
CLASSES_V2: tuple[str, ...] = RHYTHMS + FINDINGS
VERSIONS: tuple[int, ...] = (1, 2)
DEFAULT_VERSION = 2


def _check_version(version: int) -> None:
  if version not in VERSIONS:
    raise ValueError(f"unknown simulator version {version!r}; versions are {list(VERSIONS)}")


def classes_of(version: int = DEFAULT_VERSION) -> tuple[str, ...]:
  """The class names of a simulator version (its default `make_dataset` columns)."""
  _check_version(version)
  return CLASSES if version == 1 else CLASSES_V2


# Sinus heart-rate ranges (bpm) per class. Sampled a little inside the clinical cut-offs (60 and 100) so that the
# label stays true after beat-to-beat variability.
_HR_RANGE: dict[str, tuple[float, float]] = {
  "normal": (64.0, 94.0),
  "afib": (80.0, 135.0),
  "brady": (38.0, 54.0),
  "tachy": (108.0, 150.0),
  "wide_qrs": (62.0, 95.0),
  "st_elevation": (62.0, 98.0),
}


# ---------------------------------------------------------------------------------------------------------------------
# Geometry: electrodes and leads.
# ---------------------------------------------------------------------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
  v = np.asarray(v, dtype=np.float64)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _frontal(deg: float) -> np.ndarray:
  a = np.deg2rad(deg)
  return np.array([np.cos(a), np.sin(a), 0.0])


def _rotation(frontal_deg: float, horizontal_deg: float, sagittal_deg: float = 0.0) -> np.ndarray:
  """Rotation of the heart: about z (frontal axis shift), about y (clockwise / counter-clockwise rotation seen from
  below, which moves the precordial transition zone) and about x (tilt)."""
  a, b, c = np.deg2rad([frontal_deg, horizontal_deg, sagittal_deg])
  rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
  ry = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
  rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
  return rz @ ry @ rx


# Limb electrodes relative to Wilson's central terminal: lead I = LA - RA points along +x, lead II = LL - RA along
# 60 deg, and RA + LA + LL = 0 so the central terminal carries no heart signal.
_E_I, _E_II = _frontal(0.0), _frontal(60.0)
_RA = -(_E_I + _E_II) / 3.0
_LA = _RA + _E_I
_LL = _RA + _E_II

# Precordial electrodes: horizontal-plane angle from +x towards +z (anterior), and a gain > 1 because the chest
# electrodes sit much closer to the heart than the limbs do.
_V_ANGLE = np.array([118.0, 96.0, 78.0, 58.0, 32.0, 6.0])
_V_GAIN = np.array([1.05, 1.5, 1.65, 1.6, 1.35, 1.05])
_V_TILT = np.array([0.0, 0.0, 0.05, 0.12, 0.15, 0.15])  # V4..V6 sit a little lower, over the apex

# Electrodes -> leads (rows in the canonical LEADS order). Columns: RA, LA, LL, V1..V6.
_ELECTRODES_TO_LEADS = np.zeros((12, 9))
_ELECTRODES_TO_LEADS[0, :3] = [-1, 1, 0]             # I   = LA - RA
_ELECTRODES_TO_LEADS[1, :3] = [-1, 0, 1]             # II  = LL - RA
_ELECTRODES_TO_LEADS[2, :3] = [0, -1, 1]             # III = LL - LA
_ELECTRODES_TO_LEADS[3, :3] = [1, -0.5, -0.5]        # aVR = RA - (LA + LL) / 2
_ELECTRODES_TO_LEADS[4, :3] = [-0.5, 1, -0.5]        # aVL
_ELECTRODES_TO_LEADS[5, :3] = [-0.5, -0.5, 1]        # aVF
for _i in range(6):                                   # Vi  = Vi - (RA + LA + LL) / 3
  _ELECTRODES_TO_LEADS[6 + _i, :3] = -1.0 / 3.0
  _ELECTRODES_TO_LEADS[6 + _i, 3 + _i] = 1.0
assert tuple(LEADS) == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def _precordial_vectors(angle_jitter: np.ndarray, gain_jitter: np.ndarray) -> np.ndarray:
  a = np.deg2rad(_V_ANGLE + angle_jitter)
  v = np.stack([np.cos(a), _V_TILT, np.sin(a)], axis=1)
  return _unit(v) * (_V_GAIN * gain_jitter)[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# The patient: what stays fixed across one person's records.
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Patient:
  """Anatomy and baseline physiology of one synthetic person.

  Records of the same patient share these, so grouped (by patient) splits are meaningful: a model can learn a
  patient's morphology, which is exactly the leak a grouped split guards against.
  """
  heart_rotation: np.ndarray   # (3, 3) applied to every wave direction
  electrodes: np.ndarray       # (9, 3) lead vectors of RA, LA, LL, V1..V6
  qrs_scale: float             # overall QRS amplitude (body habitus, age)
  p_scale: float
  t_scale: float
  qrs_width: float             # multiplies the Q/R/S widths (normal conduction: 0.9..1.1)
  pr: float                    # s, P centre to R peak
  resp_hz: float               # breathing rate
  rsa: float                   # respiratory sinus arrhythmia depth (fraction of RR)


def sample_patient(rng: np.random.Generator) -> Patient:
  """A random patient: frontal QRS axis around +50 deg, horizontal rotation, electrode placement and amplitudes."""
  axis = float(np.clip(rng.normal(50.0, 22.0), -25.0, 95.0))
  rot = _rotation(axis - 55.0, rng.normal(0.0, 12.0), rng.normal(0.0, 8.0))
  v = _precordial_vectors(rng.normal(0.0, 5.0, 6), np.exp(rng.normal(0.0, 0.08, 6)))
  electrodes = np.concatenate([np.stack([_RA, _LA, _LL]), v], axis=0)
  return Patient(
    heart_rotation=rot,
    electrodes=electrodes,
    qrs_scale=float(np.exp(rng.normal(0.0, 0.18))),
    p_scale=float(np.exp(rng.normal(0.0, 0.15))),
    t_scale=float(np.exp(rng.normal(0.0, 0.2))),
    qrs_width=float(rng.uniform(0.9, 1.1)),
    pr=float(rng.uniform(0.15, 0.19)),
    resp_hz=float(rng.uniform(0.18, 0.33)),
    rsa=float(rng.uniform(0.02, 0.06)),
  )


# ---------------------------------------------------------------------------------------------------------------------
# Beat timing.
# ---------------------------------------------------------------------------------------------------------------------

def _beat_times(label: str, hr: float, seconds: float, patient: Patient, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
  """R-peak times (s) covering [-1.5, seconds + 1.5] and each beat's preceding RR interval.

  Sinus rhythm: RR modulated by breathing (respiratory sinus arrhythmia), a slow ~0.1 Hz Mayer-wave component and
  small beat-to-beat jitter. Atrial fibrillation: RR drawn independently from a wide log-normal with a refractory
  floor, which is what makes it "irregularly irregular".
  """
  rr0 = 60.0 / hr
  t = -1.5 - rng.uniform(0.0, rr0)
  resp_phase, mayer_phase = rng.uniform(0.0, 2 * np.pi, 2)
  mayer_depth = rng.uniform(0.005, 0.02)
  jitter = rng.uniform(0.008, 0.02)
  af_spread = rng.uniform(0.16, 0.28)
  times, rrs = [], []
  rr = rr0
  while t < seconds + 1.5:
    if label == "afib":
      rr = max(0.28, rr0 * float(np.exp(rng.normal(-af_spread ** 2 / 2, af_spread))))
    else:
      mod = (patient.rsa * np.sin(2 * np.pi * patient.resp_hz * t + resp_phase)
             + mayer_depth * np.sin(2 * np.pi * 0.1 * t + mayer_phase))
      rr = rr0 * (1.0 + mod + jitter * rng.normal())
    t += rr
    times.append(t)
    rrs.append(rr)
  return np.asarray(times), np.asarray(rrs)


# ---------------------------------------------------------------------------------------------------------------------
# Waves: each is (direction, amplitude, offset from the R peak, left width, right width, shape exponent).
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Wave:
  direction: np.ndarray  # (3,) unit vector, in heart coordinates before the patient's rotation
  amp: np.ndarray        # (beats,) mV
  offset: np.ndarray     # (beats,) s, centre relative to the R peak
  sigma_l: np.ndarray    # (beats,) s, width before the centre
  sigma_r: np.ndarray    # (beats,) s, width after the centre
  power: float = 2.0     # 2 = Gaussian; 4+ = flat-topped (for the ST plateau)


def _waves(label: str, rr: np.ndarray, patient: Patient, rng: np.random.Generator,
           resp: np.ndarray) -> list[_Wave]:
  """The waves of every beat for one record; directions are in a heart with its QRS axis at 55 deg."""
  n = len(rr)
  ones = np.ones(n)
  beat_amp = 1.0 + 0.03 * rng.normal(size=n) + resp        # breathing moves the heart: amplitude modulation
  qt_scale = np.sqrt(np.clip(rr, 0.3, 2.0))                 # Bazett: repolarisation shortens at high rates
  w = patient.qrs_width
  qs = patient.qrs_scale * beat_amp
  waves: list[_Wave] = []

  # Atrial depolarisation: left, inferior, slightly anterior. PR shortens a little at high rates.
  if label != "afib":
    pr = patient.pr * (0.85 + 0.15 * qt_scale)
    waves.append(_Wave(_unit([0.55, 0.8, 0.15]), 0.17 * patient.p_scale * beat_amp, -pr,
                       0.024 * ones, 0.022 * ones))

  if label == "wide_qrs" and rng.random() < 0.5:
    # Left bundle branch block: the septum depolarises right-to-left (no septal q in I/V6), the left ventricle is
    # activated late and slowly through muscle: broad, notched R in lateral leads, deep broad QS in V1-V2, and a
    # T wave pointing away from the QRS (secondary repolarisation change).
    waves += [
      _Wave(_unit([0.6, 0.3, -0.6]), 0.8 * qs, -0.035 * ones, 0.022 * ones, 0.022 * ones),
      _Wave(_unit([0.75, 0.25, -0.6]), 1.0 * qs, 0.025 * ones, 0.024 * ones, 0.024 * ones),
    ]
    t_dir, t_amp = _unit([-0.6, -0.2, 0.6]), 0.35
  elif label == "wide_qrs":
    # Right bundle branch block: normal early QRS, then the right ventricle depolarises late: a slow terminal
    # vector to the right and anterior (RSR' in V1, broad S in I and V6), T opposite to it in V1-V2.
    waves += _normal_qrs(qs, w, ones)
    waves.append(_Wave(_unit([-0.6, 0.0, 0.8]), 0.75 * qs, 0.07 * ones, 0.022 * ones, 0.026 * ones))
    t_dir, t_amp = _unit([0.75, 0.45, -0.3]), 0.3
  else:
    waves += _normal_qrs(qs, w, ones)
    t_dir, t_amp = _unit([0.7, 0.55, 0.35]), 0.32

  # Ventricular repolarisation: asymmetric (slow upstroke, faster downstroke), timed by the preceding RR.
  t_peak = 0.29 * qt_scale
  waves.append(_Wave(t_dir, t_amp * patient.t_scale * beat_amp, t_peak, 0.075 * qt_scale, 0.045 * qt_scale))

  if label == "st_elevation":
    # Injury current: a plateau from the J point into the T wave, pointing towards the injured wall, so the leads
    # facing it show ST elevation and the opposite leads reciprocal depression.
    wall = rng.choice(3)
    direction = [_unit([0.05, 1.0, -0.05]),      # inferior: II, III, aVF
                 _unit([-0.2, 0.1, 1.0]),        # anteroseptal: V1-V4
                 _unit([0.95, -0.4, 0.2])][wall]  # lateral: I, aVL, V5-V6
    amp = rng.uniform(0.25, 0.45) * ones
    start, end = 0.045, 0.85 * t_peak
    waves.append(_Wave(direction, amp, (start + end) / 2, (end - start) / 2, (end - start) / 2, power=6.0))
    # Hyperacute T waves go with acute injury.
    waves.append(_Wave(direction, 0.15 * amp, t_peak, 0.07 * qt_scale, 0.045 * qt_scale))
  return waves


def _normal_qrs(qs: np.ndarray, w: float, ones: np.ndarray) -> list[_Wave]:
  """Normal conduction: septal vector (right, anterior), main left-ventricular vector (left, inferior, a little
  posterior), terminal basal vector (right-superior-posterior). About 90 ms in all."""
  return [
    _Wave(_unit([-0.55, -0.1, 0.8]), 0.22 * qs, -0.028 * w * ones, 0.009 * w * ones, 0.009 * w * ones),
    _Wave(_unit([0.45, 0.75, 0.45]), 0.8 * qs, -0.006 * w * ones, 0.009 * w * ones, 0.009 * w * ones),
    _Wave(_unit([0.8, 0.5, -0.35]), 0.9 * qs, 0.006 * w * ones, 0.009 * w * ones, 0.01 * w * ones),
    _Wave(_unit([-0.4, -0.3, -0.85]), 0.7 * qs, 0.028 * w * ones, 0.01 * w * ones, 0.011 * w * ones),
  ]


def _render(wave: _Wave, r_times: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Scalar time course of one wave over all beats.

  Each sample only takes the two nearest beats' bumps (the one centred before it and the one after): waves of
  one kind are at least a refractory period apart and a few tens of ms wide, so farther beats add nothing. This
  keeps the cost at O(T) per wave instead of O(beats x T).
  """
  centres = r_times + wave.offset
  order = np.argsort(centres)  # AF can reorder a late T and an early next T only in theory; be safe
  centres = centres[order]
  idx = np.clip(np.searchsorted(centres, t), 1, len(centres) - 1)
  out = np.zeros_like(t)
  for k in (idx - 1, idx):
    b = order[k]
    d = t - centres[k]
    sigma = np.where(d < 0, wave.sigma_l[b], wave.sigma_r[b])
    out += wave.amp[b] * np.exp(-0.5 * np.abs(d / sigma) ** wave.power)
  return out


def _fibrillatory_waves(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Atrial f-waves: a 4-9 Hz oscillation whose rate and amplitude drift, with a harmonic for the sawtooth look.

  Returns a direction (right, inferior, anterior: best seen in V1 and the inferior leads) and a time course in mV.
  """
  f0 = rng.uniform(4.5, 8.5)
  drift = 0.4 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * t + rng.uniform(0, 2 * np.pi))
  phase = 2 * np.pi * np.cumsum(f0 + drift) * (t[1] - t[0] if len(t) > 1 else 0.0) + rng.uniform(0, 2 * np.pi)
  envelope = rng.uniform(0.05, 0.11) * (1.0 + 0.35 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t
                                                             + rng.uniform(0, 2 * np.pi)))
  course = envelope * (np.sin(phase) + 0.3 * np.sin(2 * phase + rng.uniform(0, 2 * np.pi)))
  direction = _unit([-0.3 + 0.2 * rng.normal(), 0.6, 0.75])
  return direction, course


# ---------------------------------------------------------------------------------------------------------------------
# Noise at the electrodes and at the amplifier.
# ---------------------------------------------------------------------------------------------------------------------

def _electrode_noise(t: np.ndarray, fs: float, resp_hz: float, rng: np.random.Generator) -> np.ndarray:
  """(9, T) in mV: baseline wander (electrode half-cell drift and breathing, < 0.5 Hz), powerline interference
  from unequal electrode impedances, and muscle (EMG) noise with slowly varying intensity."""
  n_el = 9
  out = np.zeros((n_el, t.size))
  # Baseline wander: two slow sinusoids per electrode plus breathing shared by all with electrode-specific gain.
  f = rng.uniform(0.05, 0.45, (n_el, 2, 1))
  a = rng.uniform(0.0, 0.08, (n_el, 2, 1))
  ph = rng.uniform(0, 2 * np.pi, (n_el, 2, 1))
  out += (a * np.sin(2 * np.pi * f * t + ph)).sum(axis=1)
  out += rng.uniform(0.0, 0.06, (n_el, 1)) * np.sin(2 * np.pi * resp_hz * t + rng.uniform(0, 2 * np.pi))
  # Powerline: 50 or 60 Hz, tiny, only where the sampling rate can represent it.
  line = 50.0 if rng.random() < 0.5 else 60.0
  if line < fs / 2:
    out += rng.uniform(0.0, 0.012, (n_el, 1)) * np.sin(2 * np.pi * line * t + rng.uniform(0, 2 * np.pi, (n_el, 1)))
  # Muscle noise: white, its level drifting with effort.
  level = rng.uniform(0.002, 0.015) * (1.0 + 0.8 * np.clip(np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t
                                                                   + rng.uniform(0, 2 * np.pi)), 0, None))
  out += level * rng.normal(size=(n_el, t.size))
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------------

def simulate(label: str | Sequence[str], seconds: float = 10.0, fs: float = 500.0,
             rng: np.random.Generator | None = None, *, patient: Patient | PatientV2 | None = None,
             noise: bool = True, version: int = DEFAULT_VERSION) -> tuple[np.ndarray, dict]:
  """One 12-lead ECG and what was simulated.

  `version` 2 (the default) is the simulator described in docs/simulator.md: `label` is one class of `CLASSES_V2`
  or several ("afib", "lvh"; at most one rhythm, sinus rhythm when none is named); its info adds `labels` (the
  record's classes), `rhythm` and `beats` (one letter per R peak inside the record: N conducted, V ventricular
  ectopic, A atrial ectopic). `version` 1 is the first simulator (classes `CLASSES`), kept bit for bit so that runs
  made with it can be reproduced. The rest of this docstring describes both.

  Returns (signal float32 (12, T) in mV, canonical lead order; info) where info holds `heart_rate` (bpm, from the
  simulated RR intervals inside the record), `r_times` (s, R peaks inside the record) and `label`.
  With `noise=False` the output is the clean heart signal, for which the limb-lead laws hold to float precision.
  Deterministic given `rng`'s state; `rng=None` uses a fixed seed (0) rather than fresh entropy, so that a
  forgotten generator gives reproducible data instead of silently different data.
  """
  if version == 2:
    return _simulate_v2(label, seconds, fs, rng, patient=patient, noise=noise)
  _check_version(version)
  if label not in CLASSES:
    raise ValueError(f"unknown class {label!r}; known classes are {list(CLASSES)}")
  rng = np.random.default_rng(0) if rng is None else rng
  patient = sample_patient(rng) if patient is None else patient
  n = int(round(seconds * fs))
  t = np.arange(n) / fs

  hr = rng.uniform(*_HR_RANGE[label])
  r_times, rr = _beat_times(label, hr, seconds, patient, rng)
  resp = 0.05 * np.sin(2 * np.pi * patient.resp_hz * r_times + rng.uniform(0, 2 * np.pi))
  waves = _waves(label, rr, patient, rng, resp)

  directions = np.stack([w.direction for w in waves], axis=1)            # (3, W)
  courses = np.stack([_render(w, r_times, t) for w in waves], axis=0)    # (W, T)
  heart = patient.heart_rotation @ directions @ courses                   # (3, T)
  if label == "afib":
    d, c = _fibrillatory_waves(t, rng)
    heart += (patient.heart_rotation @ d)[:, None] * c[None, :]

  electrodes = patient.electrodes @ heart                                 # (9, T)
  if noise:
    electrodes += _electrode_noise(t, fs, patient.resp_hz, rng)
  signal = _ELECTRODES_TO_LEADS @ electrodes
  if noise:
    signal += rng.normal(0.0, 0.003, signal.shape)                       # amplifier / quantisation noise
  inside = r_times[(r_times >= 0) & (r_times < seconds)]
  info = {"label": label, "heart_rate": float(60.0 / np.mean(np.diff(inside))) if inside.size > 1 else float(hr),
          "r_times": inside}
  return signal.astype(np.float32), info


def make_dataset(n: int, seed: int, seconds: float = 10.0, fs: float = 250.0,
                 classes: tuple[str, ...] | list[str] | None = None, *, noise: bool = True,
                 with_clean: bool = False, version: int = DEFAULT_VERSION) -> dict[str, np.ndarray]:
  """`n` labelled records from synthetic patients, each patient contributing 1-4 records of one condition.

  `classes` default to the version's (`classes_of(version)`). Version 2 draws each patient's primary class from
  `classes` as below, sometimes with a second condition (AF with LVH, a bundle branch block with PVCs, ...), and
  adds `multilabel` float32 (n, C): every class of the record, columns `label_names` (= `classes`; a condition outside
  them, e.g. the rhythm of a finding's patient when `classes` names no rhythm, is simulated but not a column);
  `labels` is the primary class.

  A patient keeps its condition across its records (a bundle branch block or a persistent AF does not come and
  go between visits), so a split that is not grouped by `patient_id` leaks morphology; use grouped splits.
  Classes are balanced at the patient level (patients cycle through `classes` in a seeded random order).

  Returns `signal` float32 (n, 12, T) mV, `labels` int32 (n,) index into `label_names`, `label_names` (str array),
  `record_id` and `patient_id` (str arrays), `heart_rate` float32 (n,) bpm. With `with_clean`, also `clean_signal`:
  the same records without their noise (the heart signal alone), for the loss floor of reconstruction targets.
  """
  if version == 2:
    return _make_dataset_v2(n, seed, seconds, fs, classes, noise=noise, with_clean=with_clean)
  _check_version(version)
  classes = CLASSES if classes is None else tuple(classes)
  unknown = [c for c in classes if c not in CLASSES]
  if unknown:
    raise ValueError(f"unknown class(es) {unknown}; known classes are {list(CLASSES)}")
  rng = np.random.default_rng(seed)
  T = int(round(seconds * fs))
  signal = np.empty((n, 12, T), np.float32)
  clean = np.empty((n, 12, T), np.float32) if with_clean else None
  labels = np.empty(n, np.int32)
  hr = np.empty(n, np.float32)
  record_id, patient_id = [], []
  i, p = 0, 0
  order = rng.permutation(len(classes))
  while i < n:
    if p % len(classes) == 0 and p:
      order = rng.permutation(len(classes))
    c = int(order[p % len(classes)])
    patient = sample_patient(rng)
    for k in range(min(int(rng.integers(1, 5)), n - i)):
      if clean is not None:  # the noise is drawn last in `simulate`: a copy of the generator gives the same heart
        clean[i] = simulate(classes[c], seconds, fs, copy.deepcopy(rng), patient=patient, noise=False, version=1)[0]
      signal[i], info = simulate(classes[c], seconds, fs, rng, patient=patient, noise=noise, version=1)
      labels[i], hr[i] = c, info["heart_rate"]
      record_id.append(f"syn{seed}-p{p:05d}-r{k}")
      patient_id.append(f"syn{seed}-p{p:05d}")
      i += 1
    p += 1
  out = {"signal": signal, "labels": labels, "label_names": np.asarray(classes), "record_id": np.asarray(record_id),
         "patient_id": np.asarray(patient_id), "heart_rate": hr}
  if clean is not None:
    out["clean_signal"] = clean
  return out


# =====================================================================================================================
# Version 2: rate-dependent intervals, ectopic beats, flutter, conduction blocks, hypertrophy, axis, low voltage,
# infarct Q waves, beat-to-beat variability and recorded-like noise. The ranges and their sources are tabled in
# docs/simulator.md; the numbers below are those ranges.
# =====================================================================================================================

# Pairs that one record never carries together: they contradict each other by definition (RBBB and LBBB, LVH voltage
# and low voltage, the two axis deviations), or one hides the other's criterion (LBBB hides infarct Q waves and makes
# ST elevation unreadable), or the ectopic beat needs the rhythm (a PAC needs sinus rhythm; flutter is kept clean).
_EXCLUSIVE = {frozenset(p) for p in (
  ("rbbb", "lbbb"), ("lvh", "low_voltage"), ("axis_left_deviation", "axis_right_deviation"), ("lbbb", "q_waves"),
  ("lbbb", "st_elevation"), ("pac", "afib"), ("pac", "aflutter"), ("pvc", "aflutter"))}

# Sinus and AF ventricular rates (bpm), a little inside the labels' cut-offs (60, 100) so that each label stays true
# after heart-rate variability. Flutter's rate follows from its atrial rate and conduction ratio.
_HR_RANGE_V2: dict[str, tuple[float, float]] = {
  "sinus_rhythm": (63.0, 96.0), "sinus_brady": (40.0, 56.0), "sinus_tachy": (106.0, 150.0), "afib": (65.0, 140.0)}
_FLUTTER_ATRIAL_RATE = (250.0, 340.0)                       # /min
_FLUTTER_CONDUCTION = ((2,), (3,), (4,), (2, 4))            # fixed 2:1, 3:1, 4:1, or variable 2:1/4:1
_FLUTTER_CONDUCTION_P = (0.5, 0.1, 0.25, 0.15)

# Infarct / injury walls: direction (heart coordinates) and the leads facing it.
_WALLS = {
  "inferior": (np.array([0.05, 1.0, -0.05]), ("II", "III", "aVF")),
  "anterior": (np.array([-0.2, 0.1, 1.0]), ("V1", "V2", "V3", "V4")),
  "lateral": (np.array([0.95, -0.4, 0.2]), ("I", "aVL", "V5", "V6")),
}
_LIMB = [0, 1, 2, 3, 4, 5]
_QRS_ONSET = 0.045  # s before the R peak where a normal QRS begins (the sums below keep to it)


def _rotate_towards(v: np.ndarray, rng: np.random.Generator, sd_deg: float) -> np.ndarray:
  """`v` turned by a small random rotation (about a random axis, N(0, sd) degrees): per-patient morphology."""
  axis = _unit(rng.normal(size=3))
  a = np.deg2rad(rng.normal(0.0, sd_deg))
  v = _unit(v)
  return _unit(v * np.cos(a) + np.cross(axis, v) * np.sin(a) + axis * np.dot(axis, v) * (1 - np.cos(a)))


def _rz(deg: float) -> np.ndarray:
  a = np.deg2rad(deg)
  return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


@dataclasses.dataclass(frozen=True)
class _Shape:
  """Waves of one beat kind relative to its R peak: directions (W, 3), amplitudes, centres, widths (W,)."""
  dirs: np.ndarray
  amp: np.ndarray
  off: np.ndarray
  sl: np.ndarray
  sr: np.ndarray

  def scaled(self, k: float) -> _Shape:
    return dataclasses.replace(self, amp=self.amp * k)

  def plus(self, d, a, o, sl, sr) -> _Shape:
    return _Shape(np.vstack([self.dirs, _unit(d)[None]]), np.append(self.amp, a), np.append(self.off, o),
                  np.append(self.sl, sl), np.append(self.sr, sr))


@dataclasses.dataclass(frozen=True)
class PatientV2:
  """One synthetic person of version 2: anatomy, conduction and the findings that come with them.

  The findings (`findings`) are the patient's: an LVH, a bundle branch block or an old infarct does not come and go
  between records. Voltages and axis are calibrated on a noise-free template beat so that each finding's criterion
  holds (and, for a patient without it, does not): `axis` (deg, frontal QRS axis from net QRS areas of I and aVF),
  `sokolow` (mV, S(V1) + max R(V5), R(V6)) and `limb_qrs` (mV, the largest limb-lead QRS peak-to-peak).
  """
  findings: tuple[str, ...]
  rotation: np.ndarray       # (3, 3)
  electrodes: np.ndarray     # (9, 3)
  qrs: _Shape                # conducted (supraventricular) QRS
  t_dir: np.ndarray
  t_amp: float
  t_width: tuple[float, float]  # (before, after the peak) s at QT 400 ms
  st: tuple[tuple[np.ndarray, float], ...]  # ST-segment shifts: (direction, amplitude mV)
  p_dir: np.ndarray
  p_amp: float
  p_sigma: float
  pac_dir: np.ndarray
  pac_amp: float
  pvc: _Shape                # the ectopic ventricular focus
  pvc_t_dir: np.ndarray
  pvc_t_amp: float
  pr70: float                # PR interval (s) at 70 bpm
  qtc: float                 # Fridericia-corrected QT (s)
  qt_extra: float            # QT prolongation by a wide QRS (s)
  resp_hz: float
  rsa: float
  pvc_rate: float            # fraction of beats that are ectopic (pvc, pac)
  pac_rate: float
  axis: float
  sokolow: float
  limb_qrs: float


def _template(rotation: np.ndarray, electrodes: np.ndarray, qrs: _Shape, fs: float = 1000.0) -> np.ndarray:
  """(12, S) noise-free QRS of one beat, -150..+200 ms around the R peak, at `fs`."""
  t = np.arange(-0.15, 0.2, 1.0 / fs)[None, :]
  d = t - qrs.off[:, None]
  sig = np.where(d < 0, qrs.sl[:, None], qrs.sr[:, None])
  courses = qrs.amp[:, None] * np.exp(-0.5 * (d / sig) ** 2)
  return _ELECTRODES_TO_LEADS @ (electrodes @ (rotation @ (qrs.dirs.T @ courses)))


def _frontal_axis(template: np.ndarray) -> float:
  """Frontal QRS axis (deg) from the net areas of I (0 deg) and aVF (+90 deg, scaled by sqrt(3)/2)."""
  return float(np.rad2deg(np.arctan2(template[5].sum() / (np.sqrt(3) / 2), template[0].sum())))


def _voltages(template: np.ndarray) -> tuple[float, float]:
  """Sokolow-Lyon S(V1) + max(R(V5), R(V6)) and the largest limb-lead QRS peak-to-peak, mV."""
  sokolow = max(0.0, -template[6].min()) + max(template[10].max(), template[11].max(), 0.0)
  return float(sokolow), float(np.ptp(template[_LIMB], axis=1).max())


def _has_q(template: np.ndarray, leads: Sequence[str], fs: float = 1000.0) -> bool:
  """Pathological Q in at least two leads of `leads`: an initial negative deflection >= 0.1 mV deep and >= 55 ms
  long (from where it passes -0.05 mV to where it comes back above zero) or deeper than 40 % of the R after it:
  margins over the criteria (40 ms, 25 %), which a measurement on the recorded beat must still meet."""
  hits = 0
  for name in leads:
    x = template[LEADS.index(name)]
    start = np.flatnonzero(np.abs(x) > 0.05)
    if not start.size or x[start[0]] > 0:
      continue
    back = np.flatnonzero(x[start[0]:] >= 0)
    end = start[0] + (back[0] if back.size else x.size - start[0])
    depth = -x[start[0]:end].min()
    hits += depth >= 0.1 and ((end - start[0]) / fs >= 0.055 or depth > 0.4 * max(x[end:].max(initial=0.0), 0.0))
  return hits >= 2


def _normal_qrs_v2(rng: np.random.Generator, w: float) -> _Shape:
  """The normal QRS of version 1, each wave's direction, amplitude, timing and width varied per patient."""
  dirs = np.stack([_rotate_towards(np.array(d), rng, 10.0) for d in
                   ([-0.55, -0.1, 0.8], [0.45, 0.75, 0.45], [0.8, 0.5, -0.35], [-0.4, -0.3, -0.85])])
  amp = np.array([0.22, 0.8, 0.9, 0.7]) * np.exp(rng.normal(0.0, 0.15, 4))
  off = np.array([-0.028, -0.006, 0.006, 0.028]) * w + rng.normal(0.0, 0.002, 4)
  sig = np.array([0.009, 0.009, 0.0095, 0.0105]) * w
  return _Shape(dirs, amp, off, sig, sig.copy())


def sample_patient_v2(rng: np.random.Generator, findings: Sequence[str] = ()) -> PatientV2:
  """A random version-2 patient with `findings` (a subset of `FINDINGS`; checked for compatibility)."""
  findings = tuple(sorted(set(findings), key=CLASSES_V2.index))
  _check_labels(findings)
  f = set(findings)
  qs = float(np.exp(rng.normal(0.0, 0.18)))
  w = float(rng.uniform(0.88, 1.1))
  if "lbbb" in f:
    # The septum is activated right to left and the left ventricle late, slowly, through muscle: no septal q in I,
    # V5-V6, a broad notched R there and a QS in V1-V2; the T wave points away from the QRS.
    s = rng.uniform(0.017, 0.022)
    gap = rng.uniform(0.05, 0.065)
    qrs = _Shape(np.stack([_rotate_towards(np.array(d), rng, 6.0) for d in ([0.6, 0.3, -0.6], [0.75, 0.25, -0.6])]),
                 np.array([0.85, 1.0]) * rng.uniform(0.9, 1.3), np.array([-gap / 2 - 0.005, gap / 2 - 0.005]),
                 np.full(2, s), np.full(2, s))
    t_dir, t_amp = _rotate_towards(np.array([-0.6, -0.2, 0.6]), rng, 8.0), 0.35
    qt_extra = gap + 5 * s - 0.09
  else:
    qrs = _normal_qrs_v2(rng, w)
    t_dir, t_amp = _rotate_towards(np.array([0.7, 0.55, 0.35]), rng, 10.0), 0.32
    qt_extra = 0.0
  if "rbbb" in f:
    # The right ventricle is activated late: a slow terminal vector to the right and anterior (rsR' in V1, broad S
    # in I and V6); the T wave opposite to it in V1-V3.
    s = rng.uniform(0.02, 0.026)
    off = rng.uniform(0.062, 0.075)
    qrs = qrs.plus(_rotate_towards(np.array([-0.6, 0.0, 0.8]), rng, 6.0), rng.uniform(0.6, 0.9), off, s, s * 1.15)
    t_dir = _unit(t_dir + np.array([0.3, 0.0, -0.7]))
    qt_extra = off + 2.5 * s - 0.045
  st: list[tuple[np.ndarray, float]] = []
  if "lvh" in f:
    # More left-ventricular mass: larger, more leftward-posterior main forces (the voltage itself is set below);
    # in most, the strain pattern: lateral ST depression with T inversion.
    qrs.amp[1:3] *= 1.5
    qrs.dirs[1:3] = _unit(qrs.dirs[1:3] + np.array([0.25, 0.0, -0.3]))
    if rng.random() < 0.65:
      strain = _unit(np.array([-0.8, 0.35, 0.45]))
      t_dir, t_amp = strain, rng.uniform(0.2, 0.4)
      st.append((strain, rng.uniform(0.05, 0.15)))
  wall_q = None
  if "q_waves" in f:
    # An old infarct: the dead wall adds no forces, so the first 40+ ms of the QRS point away from it (a wide,
    # deep Q in the leads facing the wall); its T is often inverted there.
    wall_q = list(_WALLS)[rng.integers(3)]
    away = -_WALLS[wall_q][0]
    qrs = qrs.plus(away, rng.uniform(0.5, 0.8) * (qrs.amp[1] + qrs.amp[2]) / 2, -0.024, 0.02, 0.017)
    if rng.random() < 0.5:
      t_dir = _unit(t_dir + 1.2 * _unit(away))
  if "st_elevation" in f:
    # An injury current: a plateau from the J point into the T wave towards the injured wall (ST elevation in the
    # leads facing it, reciprocal depression opposite) and hyperacute T waves.
    wall = _unit(_WALLS[list(_WALLS)[rng.integers(3)]][0])
    st.append((wall, rng.uniform(0.22, 0.45)))
  qrs = qrs.scaled(qs)

  rotation = _rotation(rng.normal(-8.0, 20.0), rng.normal(0.0, 12.0), rng.normal(0.0, 8.0))
  electrodes = np.concatenate([np.stack([_RA, _LA, _LL]),
                               _precordial_vectors(rng.normal(0.0, 5.0, 6), np.exp(rng.normal(0.0, 0.08, 6)))])
  # Axis: a deviation's patient is turned to a drawn axis; anyone else keeps the axis their anatomy gives (spread
  # by the random frontal turn above) unless it falls outside the normal range, where it is brought back inside.
  if "axis_left_deviation" in f:
    target = rng.uniform(-80.0, -42.0)
  elif "axis_right_deviation" in f:
    target = rng.uniform(102.0, 150.0)
  else:
    target = None
  for _ in range(5):
    axis = _frontal_axis(_template(rotation, electrodes, qrs))
    aim = float(np.clip(axis, -15.0, 80.0)) if target is None else target
    rotation = _rz(aim - axis) @ rotation
    if wall_q is None or _has_q(_template(rotation, electrodes, qrs), _WALLS[wall_q][1]):
      break
    qrs.amp[-1] *= 1.35  # deepen the infarct Q until two facing leads show it (then re-aim the axis)
  template = _template(rotation, electrodes, qrs)
  sokolow, limb = _voltages(template)
  k = 1.0
  if "lvh" in f:
    k = rng.uniform(3.9, 5.8) / sokolow
  elif "low_voltage" in f:
    k = rng.uniform(0.25, 0.42) / limb
  else:
    k = min(1.0, rng.uniform(1.8, 3.1) / sokolow) if sokolow > 3.1 else 1.0
    if limb * k < 0.7:
      k = 0.7 / limb
  qrs = qrs.scaled(k)
  wave_k = np.sqrt(k) if "low_voltage" in f else 1.0  # effusion, obesity: P and T shrink with the QRS
  template = _template(rotation, electrodes, qrs)
  sokolow, limb = _voltages(template)

  # Ectopic ventricular focus: two broad waves from a random site (no His-Purkinje spread), T discordant.
  focus = _unit(rng.normal(size=3) + np.array([0.0, 0.4, 0.0]))
  second = _rotate_towards(focus, rng, 35.0)
  s = rng.uniform(0.018, 0.026)
  pvc = _Shape(np.stack([focus, second]), rng.uniform(1.3, 2.2, 2) * qs, np.array([-0.025, 0.025]),
               np.full(2, s), np.full(2, s))
  p_dir = _rotate_towards(np.array([0.55, 0.8, 0.15]), rng, 10.0)
  return PatientV2(
    findings=findings, rotation=rotation, electrodes=electrodes, qrs=qrs, t_dir=t_dir,
    t_amp=float(t_amp * np.exp(rng.normal(0.0, 0.2)) * wave_k),
    t_width=(rng.uniform(0.065, 0.085), rng.uniform(0.04, 0.05)), st=tuple(st), p_dir=p_dir,
    p_amp=float(rng.uniform(0.1, 0.2) * wave_k), p_sigma=float(rng.uniform(0.019, 0.025)),
    # Ectopic atrial focus low in the atria: the P' axis points up (inverted P' in II, III, aVF) or sideways.
    pac_dir=_rotate_towards(np.array([0.3, -0.9, 0.2]), rng, 30.0), pac_amp=float(rng.uniform(0.08, 0.16)),
    pvc=pvc, pvc_t_dir=_unit(-(focus + second) + 0.2 * rng.normal(size=3)), pvc_t_amp=float(rng.uniform(0.3, 0.6)),
    pr70=float(rng.uniform(0.13, 0.19)), qtc=float(rng.uniform(0.38, 0.44)), qt_extra=float(max(qt_extra, 0.0)),
    resp_hz=float(rng.uniform(0.18, 0.33)), rsa=float(rng.uniform(0.02, 0.06)),
    pvc_rate=float(rng.uniform(0.04, 0.15)), pac_rate=float(rng.uniform(0.04, 0.15)),
    axis=_frontal_axis(template), sokolow=sokolow, limb_qrs=limb)


def _check_labels(labels: Sequence[str]) -> None:
  unknown = [c for c in labels if c not in CLASSES_V2]
  if unknown:
    raise ValueError(f"unknown class(es) {unknown}; version 2's classes are {list(CLASSES_V2)}")
  rhythms = [c for c in labels if c in RHYTHMS]
  if len(rhythms) > 1:
    raise ValueError(f"one rhythm per record, not {rhythms}")
  clash = [sorted(p) for p in _EXCLUSIVE if p <= set(labels)]
  if clash:
    raise ValueError(f"classes that exclude each other: {clash}")


def _split_labels(label: str | Sequence[str]) -> tuple[str, tuple[str, ...]]:
  labels = (label,) if isinstance(label, str) else tuple(label)
  _check_labels(labels)
  rhythm = next((c for c in labels if c in RHYTHMS), "sinus_rhythm")
  return rhythm, tuple(c for c in CLASSES_V2 if c in labels and c in FINDINGS)


def _schedule(rhythm: str, hr: float, seconds: float, patient: PatientV2, ectopy: tuple[bool, bool],
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """R peaks (s) covering [-1.5, seconds + 1.5], beat kinds (0 conducted, 1 PVC, 2 PAC), each beat's preceding RR,
  and flutter's atrial cycle (s; 0 otherwise, as an array of one)."""
  rr0 = 60.0 / hr
  start, end = -1.5 - rng.uniform(0.0, rr0), seconds + 1.5
  times, kinds = [], []
  if rhythm == "aflutter":
    cycle = 60.0 / rng.uniform(*_FLUTTER_ATRIAL_RATE)
    pattern = _FLUTTER_CONDUCTION[rng.choice(len(_FLUTTER_CONDUCTION), p=_FLUTTER_CONDUCTION_P)]
    delay = rng.uniform(0.16, 0.26)
    j, a = 0, start
    while a < end:
      times.append(a + delay)
      kinds.append(0)
      m = pattern[int(rng.integers(len(pattern)))]
      a += m * cycle
      j += 1
    times, kinds = np.asarray(times), np.asarray(kinds)
    rr = np.diff(times, prepend=times[0] - (times[1] - times[0]))
    return times, kinds, rr, np.asarray([cycle])
  want_pvc, want_pac = ectopy
  resp_phase, mayer_phase = rng.uniform(0.0, 2 * np.pi, 2)
  mayer_depth = rng.uniform(0.005, 0.02)
  jitter = rng.uniform(0.008, 0.02)
  af_spread = rng.uniform(0.16, 0.28)
  forced_at = rng.uniform(1.0, seconds - 1.5) if seconds > 3.0 else seconds / 2
  have = False
  t = start

  def next_rr(t: float) -> float:
    if rhythm == "afib":
      return max(0.3, rr0 * float(np.exp(rng.normal(-af_spread ** 2 / 2, af_spread))))
    mod = (patient.rsa * np.sin(2 * np.pi * patient.resp_hz * t + resp_phase)
           + mayer_depth * np.sin(2 * np.pi * 0.1 * t + mayer_phase))
    return rr0 * (1.0 + mod + jitter * rng.normal())

  while t < end:
    times.append(t)
    kinds.append(0)
    rr = next_rr(t)
    u = rng.random()
    force = (want_pvc or want_pac) and not have and t + rr > forced_at
    if want_pvc and (u < patient.pvc_rate or (force and not want_pac) or (force and rng.random() < 0.5)):
      # Premature ventricular beat; the sinus node is not reset, so the next conducted beat comes two sinus
      # cycles after the last one (the full compensatory pause).
      coupling = max(0.34, rr * rng.uniform(0.5, 0.72))
      times.append(t + coupling)
      kinds.append(1)
      have = have or 0.0 <= t + coupling < seconds
      t += rr + next_rr(t + rr) if rhythm != "afib" else coupling + max(rr, next_rr(t))
    elif want_pac and (u < patient.pvc_rate + patient.pac_rate or force):
      # Premature atrial beat: it resets the sinus node, so the pause after it is about one cycle (not
      # compensatory).
      coupling = rr * rng.uniform(0.55, 0.75)
      times.append(t + coupling)
      kinds.append(2)
      have = have or 0.0 <= t + coupling < seconds
      t += coupling + rr * rng.uniform(1.0, 1.05)
    else:
      t += rr
  times, kinds = np.asarray(times), np.asarray(kinds)
  rr = np.diff(times, prepend=times[0] - rr0)
  return times, kinds, rr, np.zeros(1)


def _flutter_waves(t: np.ndarray, cycle: float, first: float, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Typical (counter-clockwise) flutter F-waves: a sawtooth at the atrial rate, a slow descent and a quick rise in
  II, III and aVF (negative sawtooth), upright in V1. Five harmonics of a sawtooth: sharp enough, band-limited."""
  phase = (t - first) / cycle * (1.0 + rng.normal(0.0, 0.003))
  saw = sum(np.sin(2 * np.pi * k * phase) / k for k in range(1, 6)) * (2 / np.pi)
  return _unit([0.15 + 0.1 * rng.normal(), 1.0, -0.45]), rng.uniform(0.1, 0.22) * saw


def _noise_v2(t: np.ndarray, fs: float, resp_hz: float, rng: np.random.Generator) -> np.ndarray:
  """(9, T) mV at the electrodes: baseline wander, muscle (EMG), electrode motion and 50/60 Hz mains, each with a
  per-record level, so that records range from clean to a Holter's worst minutes."""
  n_el, n = 9, t.size
  out = np.zeros((n_el, n))
  # Baseline wander: breathing (shared, electrode-specific gain) and slow electrode half-cell drift (four slow
  # components mixed with electrode-specific weights: one sine evaluation per component, not per electrode).
  out += rng.uniform(0.0, 0.15, (n_el, 1)) * np.sin(2 * np.pi * resp_hz * t + rng.uniform(0, 2 * np.pi))
  slow = np.sin(2 * np.pi * rng.uniform(0.03, 0.5, (4, 1)) * t + rng.uniform(0, 2 * np.pi, (4, 1)))
  out += rng.uniform(-0.08, 0.08, (n_el, 4)) @ slow
  # Muscle: broadband, weighted to high frequencies (first difference of white noise), bursts with effort.
  level = rng.uniform(0.003, 0.03) * (1.0 + 1.5 * np.clip(np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t
                                                                 + rng.uniform(0, 2 * np.pi)), 0, None) ** 2)
  white = rng.normal(size=(n_el, n + 1))
  out += level * np.diff(white, axis=1) / np.sqrt(2)
  # Electrode motion: on some records, steps with exponential recovery on one to three electrodes.
  if rng.random() < 0.3:
    for _ in range(int(rng.integers(1, 4))):
      at, tau = rng.uniform(t[0], t[-1] + 1e-9), rng.uniform(0.15, 0.8)
      which = rng.choice(n_el, int(rng.integers(1, 4)), replace=False)
      step = (t >= at) * np.exp(-np.clip(t - at, 0.0, None) / tau)
      out[which] += rng.uniform(-1.0, 1.0, (which.size, 1)) * step
  # Mains: 50 or 60 Hz, unequal electrode impedances give each electrode its own pick-up; a third harmonic where the
  # rate can hold it.
  line = 50.0 if rng.random() < 0.5 else 60.0
  if line < fs / 2:
    amp = rng.uniform(0.01, 0.06) * rng.uniform(0.5, 1.0, (n_el, 1))
    ph = rng.uniform(0, 2 * np.pi, (n_el, 1))
    for k, a in ((1, amp), (3, 0.2 * amp)):
      if k * line < fs / 2:  # a sin(wt + ph) = a cos(ph) sin(wt) + a sin(ph) cos(wt)
        w = 2 * np.pi * k * line * t
        out += np.hstack([a * np.cos(k * ph), a * np.sin(k * ph)]) @ np.stack([np.sin(w), np.cos(w)])
  return out


def _simulate_v2(label: str | Sequence[str], seconds: float, fs: float, rng: np.random.Generator | None, *,
                 patient: PatientV2 | None, noise: bool) -> tuple[np.ndarray, dict]:
  rhythm, findings = _split_labels(label)
  _check_labels((rhythm,) + findings)
  rng = np.random.default_rng(0) if rng is None else rng
  if patient is None:
    patient = sample_patient_v2(rng, findings)
  elif not isinstance(patient, PatientV2) or patient.findings != findings:
    raise ValueError(f"the patient's findings {getattr(patient, 'findings', None)} are not the record's {findings}")
  n = int(round(seconds * fs))
  t = np.arange(n) / fs

  hr = rng.uniform(*_HR_RANGE_V2.get(rhythm, (60.0, 100.0)))
  r_times, kinds, rr, cycle = _schedule(rhythm, hr, seconds, patient, ("pvc" in findings, "pac" in findings), rng)
  beats = len(r_times)
  conducted = (kinds != 1).astype(np.float64)
  resp = 0.05 * np.sin(2 * np.pi * patient.resp_hz * r_times + rng.uniform(0, 2 * np.pi))
  beat_amp = 1.0 + rng.uniform(0.02, 0.05) * rng.normal(size=beats) + resp  # beat-to-beat and breathing
  width_jit = 1.0 + 0.02 * rng.normal(size=beats)
  rr_c = np.clip(rr, 0.3, 2.0)
  qt = patient.qtc * np.cbrt(rr_c) + patient.qt_extra                        # Fridericia
  pr = np.clip(patient.pr70 - 0.0005 * (60.0 / rr_c - 70.0), 0.1, 0.24)      # PR shortens as the rate rises
  waves: list[_Wave] = []
  if rhythm in ("sinus_rhythm", "sinus_brady", "sinus_tachy"):
    p_on = (kinds == 0).astype(np.float64)
    centre = -(pr + _QRS_ONSET - 2.2 * patient.p_sigma) + 0.004 * rng.normal(size=beats)
    waves.append(_Wave(patient.p_dir, patient.p_amp * beat_amp * p_on, centre,
                       patient.p_sigma * np.ones(beats), 0.92 * patient.p_sigma * np.ones(beats)))
  if (kinds == 2).any():
    pr_pac = np.clip(pr + rng.uniform(-0.03, 0.03), 0.11, 0.22)
    waves.append(_Wave(patient.pac_dir, patient.pac_amp * (kinds == 2) * beat_amp,
                       -(pr_pac + _QRS_ONSET - 2.2 * 0.02), 0.02 * np.ones(beats), 0.02 * np.ones(beats)))
  q = patient.qrs
  for i in range(len(q.amp)):
    waves.append(_Wave(q.dirs[i], q.amp[i] * beat_amp * conducted, q.off[i] * width_jit, q.sl[i] * width_jit,
                       q.sr[i] * width_jit))
  scale = qt / 0.4
  t_sl, t_sr = patient.t_width[0] * scale, patient.t_width[1] * scale
  t_peak = qt - _QRS_ONSET - 2.2 * t_sr
  t_amp = patient.t_amp * beat_amp * (1.0 + 0.04 * rng.normal(size=beats)) * conducted
  waves.append(_Wave(patient.t_dir, t_amp, t_peak, t_sl, t_sr))
  for direction, amp in patient.st:
    start, stop = 0.05 + patient.qt_extra, 0.85 * t_peak
    waves.append(_Wave(direction, amp * conducted * beat_amp, (start + stop) / 2, (stop - start) / 2,
                       (stop - start) / 2, power=6.0))
    if amp > 0.2:  # injury: hyperacute T with the elevation
      waves.append(_Wave(direction, 0.15 * amp * conducted, t_peak, t_sl, t_sr))
  if (kinds == 1).any():
    ectopic = (kinds == 1) * (1.0 + 0.03 * rng.normal(size=beats))
    p = patient.pvc
    for i in range(len(p.amp)):
      waves.append(_Wave(p.dirs[i], p.amp[i] * ectopic, p.off[i] * np.ones(beats), p.sl[i] * np.ones(beats),
                         p.sr[i] * np.ones(beats)))
    waves.append(_Wave(patient.pvc_t_dir, patient.pvc_t_amp * ectopic, t_peak + 0.04, 1.2 * t_sl, 1.2 * t_sr))

  directions = np.stack([w.direction for w in waves], axis=1)
  courses = np.stack([_render(w, r_times, t) for w in waves], axis=0)
  heart = directions @ courses
  if rhythm == "afib":
    d, c = _fibrillatory_waves(t, rng)
    heart += d[:, None] * c[None, :]
  elif rhythm == "aflutter":
    d, c = _flutter_waves(t, float(cycle[0]), float(r_times[0]), rng)
    heart += d[:, None] * c[None, :]
  heart = patient.rotation @ heart
  # Breathing turns the heart a few degrees in the frontal plane: the axis, and so every lead, swings with it.
  swing = np.deg2rad(rng.uniform(1.5, 5.0)) * np.sin(2 * np.pi * patient.resp_hz * t + rng.uniform(0, 2 * np.pi))
  x, y = heart[0].copy(), heart[1].copy()
  heart[0], heart[1] = np.cos(swing) * x - np.sin(swing) * y, np.sin(swing) * x + np.cos(swing) * y

  electrodes = patient.electrodes @ heart
  if noise:
    electrodes += _noise_v2(t, fs, patient.resp_hz, rng)
  signal = _ELECTRODES_TO_LEADS @ electrodes
  if noise:
    # Each channel's amplifier: its own gain error and its own noise floor.
    signal *= np.exp(rng.normal(0.0, 0.02, (12, 1)))
    signal += rng.normal(0.0, rng.uniform(0.002, 0.008), signal.shape)
  inside = (r_times >= 0) & (r_times < seconds)
  labels = (rhythm,) + findings
  info = {"label": labels, "labels": labels, "rhythm": rhythm,
          "heart_rate": float(60.0 / np.mean(np.diff(r_times[inside]))) if inside.sum() > 1 else float(hr),
          "r_times": r_times[inside], "beats": "".join("NVA"[k] for k in kinds[inside])}
  return signal.astype(np.float32), info


def _draw_condition(primary: str, classes: tuple[str, ...], rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
  """A patient's rhythm and findings for a primary class: a rhythm alone (sinus rhythm always alone; the others
  with a finding 30 % of the time) or a finding on mostly sinus rhythm, with a second finding 25 % of the time."""
  others = [c for c in classes if c in FINDINGS]
  if primary in RHYTHMS:
    rhythm, findings = primary, []
    extra = primary != "sinus_rhythm" and rng.random() < 0.3
  else:
    rhythm = RHYTHMS[rng.choice(4, p=[0.78, 0.06, 0.06, 0.1])]
    findings = [primary]
    if frozenset((primary, rhythm)) in _EXCLUSIVE:
      rhythm = "sinus_rhythm"
    extra = rng.random() < 0.25
  if extra:
    fits = [c for c in others if c not in findings
            and all(frozenset((c, g)) not in _EXCLUSIVE for g in findings + [rhythm])]
    if fits:
      findings.append(fits[int(rng.integers(len(fits)))])
  return rhythm, tuple(c for c in FINDINGS if c in findings)


def _make_dataset_v2(n: int, seed: int, seconds: float, fs: float, classes: Sequence[str] | None, *, noise: bool,
                     with_clean: bool) -> dict[str, np.ndarray]:
  classes = CLASSES_V2 if classes is None else tuple(classes)
  unknown = [c for c in classes if c not in CLASSES_V2]
  if unknown:
    raise ValueError(f"unknown class(es) {unknown}; version 2's classes are {list(CLASSES_V2)}")
  rng = np.random.default_rng(seed)
  T = int(round(seconds * fs))
  signal = np.empty((n, 12, T), np.float32)
  clean = np.empty((n, 12, T), np.float32) if with_clean else None
  labels = np.empty(n, np.int32)
  multi = np.zeros((n, len(classes)), np.float32)
  hr = np.empty(n, np.float32)
  record_id, patient_id = [], []
  i, p = 0, 0
  order = rng.permutation(len(classes))
  while i < n:
    if p % len(classes) == 0 and p:
      order = rng.permutation(len(classes))
    c = int(order[p % len(classes)])
    rhythm, findings = _draw_condition(classes[c], classes, rng)
    patient = sample_patient_v2(rng, findings)
    present = [k for k, name in enumerate(classes) if name == rhythm or name in findings]
    for k in range(min(int(rng.integers(1, 5)), n - i)):
      if clean is not None:  # the noise is drawn last: a copy of the generator gives the same heart
        clean[i] = _simulate_v2((rhythm,) + findings, seconds, fs, copy.deepcopy(rng), patient=patient,
                                noise=False)[0]
      signal[i], info = _simulate_v2((rhythm,) + findings, seconds, fs, rng, patient=patient, noise=noise)
      labels[i], hr[i] = c, info["heart_rate"]
      multi[i, present] = 1.0
      record_id.append(f"syn{seed}-p{p:05d}-r{k}")
      patient_id.append(f"syn{seed}-p{p:05d}")
      i += 1
    p += 1
  out = {"signal": signal, "labels": labels, "multilabel": multi, "label_names": np.asarray(classes),
         "record_id": np.asarray(record_id), "patient_id": np.asarray(patient_id), "heart_rate": hr}
  if clean is not None:
    out["clean_signal"] = clean
  return out
