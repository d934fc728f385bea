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

import numpy as np

from data_pipelines.leads import LEADS

CLASSES: tuple[str, ...] = ("normal", "afib", "brady", "tachy", "wide_qrs", "st_elevation")

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

def simulate(label: str, seconds: float = 10.0, fs: float = 500.0, rng: np.random.Generator | None = None, *,
             patient: Patient | None = None, noise: bool = True) -> tuple[np.ndarray, dict]:
  """One 12-lead ECG and what was simulated.

  Returns (signal float32 (12, T) in mV, canonical lead order; info) where info holds `heart_rate` (bpm, from the
  simulated RR intervals inside the record), `r_times` (s, R peaks inside the record) and `label`.
  With `noise=False` the output is the clean heart signal, for which the limb-lead laws hold to float precision.
  Deterministic given `rng`'s state; `rng=None` uses a fixed seed (0) rather than fresh entropy, so that a
  forgotten generator gives reproducible data instead of silently different data.
  """
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
                 classes: tuple[str, ...] | list[str] = CLASSES, *, noise: bool = True,
                 with_clean: bool = False) -> dict[str, np.ndarray]:
  """`n` labelled records from synthetic patients, each patient contributing 1-4 records of one condition.

  A patient keeps its condition across its records (a bundle branch block or a persistent AF does not come and
  go between visits), so a split that is not grouped by `patient_id` leaks morphology; use grouped splits.
  Classes are balanced at the patient level (patients cycle through `classes` in a seeded random order).

  Returns `signal` float32 (n, 12, T) mV, `labels` int32 (n,) index into `label_names`, `label_names` (str array),
  `record_id` and `patient_id` (str arrays), `heart_rate` float32 (n,) bpm. With `with_clean`, also `clean_signal`:
  the same records without their noise (the heart signal alone), for the loss floor of reconstruction targets.
  """
  classes = tuple(classes)
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
        clean[i] = simulate(classes[c], seconds, fs, copy.deepcopy(rng), patient=patient, noise=False)[0]
      signal[i], info = simulate(classes[c], seconds, fs, rng, patient=patient, noise=noise)
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
