"""Figures of docs/simulator.md: each class of simulator version 2 beside a real recording of that class.

  python -m benchmarks.simulator_figures --data ../shared/data [--out docs/figures/simulator] [--seconds 4]
  python -m benchmarks.simulator_figures --speed          # records/s of versions 1 and 2 (250 Hz, 10 s), JSON

The real recordings are LUDB records (diagnoses in their header comments) read from `--data`; low voltage, which no
label there names, is the LUDB or CinC 2021 record with the smallest limb-lead amplitudes, measured. Both traces are
band-passed 0.5-40 Hz the same way and drawn as a cardiologist reads them: mV against seconds, the same scale for
both. Only our drawings are written; the recordings stay where they are.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
from scipy import signal as sps

from data_pipelines.leads import LEAD_ID

FS = 500.0
# class -> (header phrase of a LUDB record of that class, leads drawn). The phrase is matched case-insensitively
# against the record's header comments; records with a pacemaker are skipped.
CLASSES = {
  "sinus_rhythm": ("rhythm: sinus rhythm.", ("II", "V1", "V5")),
  "sinus_brady": ("sinus bradycardia", ("II", "V1")),
  "sinus_tachy": ("sinus tachycardia", ("II", "V1")),
  "afib": ("atrial fibrillation", ("II", "V1")),
  "aflutter": ("atrial flutter", ("II", "aVF", "V1")),
  "pvc": ("single pvc", ("II", "V1", "V5")),
  "pac": ("single pac", ("II", "V1")),
  "rbbb": ("complete right bundle branch block", ("I", "V1", "V6")),
  "lbbb": ("complete left bundle branch block", ("I", "V1", "V6")),
  "lvh": ("left ventricular overload", ("V1", "V5", "V6")),
  "axis_left_deviation": ("left axis deviation", ("I", "II", "aVF")),
  "axis_right_deviation": ("right axis deviation", ("I", "II", "aVF")),
  "low_voltage": ("", ("I", "II", "III")),
  "q_waves": ("scar formation", ("III", "aVF", "V2")),
  "st_elevation": ("stemi", ("II", "V2", "V5")),
}


def _read(path: pathlib.Path) -> tuple[np.ndarray, list[str], str]:
  """(leads x samples mV in canonical order, header comments, record name) of a WFDB record."""
  import wfdb
  rec = wfdb.rdrecord(str(path))
  names = [n.upper().replace("AV", "aV") for n in rec.sig_name]
  x = np.zeros((12, rec.p_signal.shape[0]))
  for i, n in enumerate(names):
    if n in LEAD_ID:
      x[LEAD_ID[n]] = np.nan_to_num(rec.p_signal[:, i])
  if rec.fs != FS:
    x = sps.resample_poly(x, int(FS), int(rec.fs), axis=1)
  return x, [c.lower() for c in rec.comments], path.name


def _bandpass(x: np.ndarray) -> np.ndarray:
  return sps.sosfiltfilt(sps.butter(3, [0.5, 40.0], btype="bandpass", fs=FS, output="sos"), x, axis=-1)


def _limb_qrs(x: np.ndarray) -> float:
  """The largest limb-lead amplitude (mV): per lead, the 0.5th to 99.5th percentile range of the band-passed signal
  (the QRS where it is the largest deflection; never less than it). Flat (missing) leads are passed over."""
  y = _bandpass(x)[:6]
  spread = np.percentile(y, 99.5, axis=1) - np.percentile(y, 0.5, axis=1)
  return float(spread.max()) if (spread > 0.02).all() else np.inf


def _premature_window(x: np.ndarray, seconds: float) -> int:
  """Start sample of a window centred on the most premature beat (for the ectopic classes)."""
  e = np.convolve((np.diff(_bandpass(x), axis=-1) ** 2).sum(0), np.ones(40) / 40, mode="same")
  peaks, _ = sps.find_peaks(e, height=0.1 * np.percentile(e, 99), distance=int(0.25 * FS))
  if len(peaks) < 3:
    return 0
  rr = np.diff(peaks)
  k = int(np.argmin(rr[1:] / rr[:-1])) + 2  # the beat whose RR is shortest against the one before
  return int(np.clip(peaks[k] - seconds * FS / 2, 0, x.shape[1] - seconds * FS))


def find_real(data: pathlib.Path) -> dict[str, tuple[np.ndarray, str]]:
  """For each class, the first LUDB record (by number) whose header names it; low voltage by measurement."""
  ludb = sorted((data / "ludb").glob("*.hea"), key=lambda p: int(p.stem) if p.stem.isdigit() else 1_000_000)
  records = [_read(p.with_suffix("")) for p in ludb]
  found = {}
  for name, (phrase, _) in CLASSES.items():
    if not phrase:
      continue
    for x, comments, rec in records:
      text = " ".join(comments)
      if phrase in text and "pacing" not in text:
        if name == "sinus_rhythm" and ("hypertrophy" in text or "block" in text or "axis deviation" in text):
          continue
        found[name] = (x, f"LUDB record {rec}")
        break
  cinc = [_read(p.with_suffix("")) for p in sorted((data / "cinc2021").glob("*.hea"))]
  unpaced = [r for r in records + cinc if "pacing" not in " ".join(r[1])]
  x, _, rec = min(unpaced, key=lambda r: _limb_qrs(r[0]))
  found["low_voltage"] = (x, f"{'LUDB' if rec.isdigit() else 'CinC 2021'} record {rec} "
                             f"(limb leads within {_limb_qrs(x):.2f} mV)")
  return found


def simulated(name: str, seconds: float) -> tuple[np.ndarray, int]:
  """A noisy version-2 record of the class, and the start of the window drawn (an ectopic beat inside for pvc/pac)."""
  from stmem import synthetic
  for seed in range(50):
    x, info = synthetic.simulate(name, 10.0, FS, np.random.default_rng(seed), version=2)
    if name not in ("pvc", "pac"):
      return x.astype(np.float64), 0
    ectopic = [t for t, b in zip(info["r_times"], info["beats"]) if b in "VA" and 1.0 < t < 9.0]
    if ectopic:
      return x.astype(np.float64), int(np.clip((ectopic[0] - seconds / 2) * FS, 0, (10.0 - seconds) * FS))
  raise RuntimeError(f"no {name} record with an ectopic beat inside")


def draw(name: str, sim: np.ndarray, sim_start: int, real: np.ndarray, real_label: str, seconds: float,
         out: pathlib.Path, dpi: int) -> pathlib.Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  leads = CLASSES[name][1]
  n = int(seconds * FS)
  real_start = _premature_window(real, seconds) if name in ("pvc", "pac") else 0
  traces = [(_bandpass(sim)[:, sim_start:sim_start + n], "simulated (version 2)"),
            (_bandpass(real)[:, real_start:real_start + n], real_label)]
  lo = min(t[[LEAD_ID[l] for l in leads]].min() for t, _ in traces) - 0.1
  hi = max(t[[LEAD_ID[l] for l in leads]].max() for t, _ in traces) + 0.1
  fig, axes = plt.subplots(len(leads), 2, figsize=(9, 1.25 * len(leads) + 0.5), sharex=True, squeeze=False)
  t = np.arange(n) / FS
  for col, (x, title) in enumerate(traces):
    axes[0, col].set_title(title, fontsize=9)
    for row, lead in enumerate(leads):
      ax = axes[row, col]
      ax.plot(t[:x.shape[1]], x[LEAD_ID[lead]], lw=0.7, color="black")
      ax.set_ylim(lo, hi)
      ax.set_xticks(np.arange(0, seconds + 1e-9, 1.0))
      ax.grid(True, color="#f0b0b0", lw=0.4)
      ax.tick_params(labelsize=7)
      ax.text(0.005, 0.95, lead, transform=ax.transAxes, fontsize=8, va="top")
      if col == 0:
        ax.set_ylabel("mV", fontsize=7)
  for ax in axes[-1]:
    ax.set_xlabel("s", fontsize=7)
  fig.suptitle(name.replace("_", " "), fontsize=10)
  fig.tight_layout()
  path = out / f"{name}.png"
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def speed(n: int = 256) -> dict:
  from stmem import synthetic
  out = {}
  for version in (1, 2):
    synthetic.make_dataset(8, seed=1, fs=250.0, version=version)  # warm-up
    start = time.perf_counter()
    synthetic.make_dataset(n, seed=0, fs=250.0, version=version)
    out[f"version_{version}_records_per_s"] = round(n / (time.perf_counter() - start), 1)
  import os
  out["loadavg"] = os.getloadavg()
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default="../shared/data", help="folder holding ludb/ and cinc2021/")
  p.add_argument("--out", default="docs/figures/simulator")
  p.add_argument("--seconds", type=float, default=4.0)
  p.add_argument("--dpi", type=int, default=80)
  p.add_argument("--classes", default="", help="comma-separated subset (default: all)")
  p.add_argument("--speed", action="store_true", help="print records/s of versions 1 and 2 instead")
  a = p.parse_args(argv)
  if a.speed:
    print(json.dumps(speed()))
    return
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  real = find_real(pathlib.Path(a.data).expanduser())
  names = [c for c in a.classes.split(",") if c] or list(CLASSES)
  written = {}
  for name in names:
    sim, start = simulated(name, a.seconds)
    x, label = real[name]
    path = draw(name, sim, start, x, label, a.seconds, out, a.dpi)
    written[name] = {"file": str(path), "real": label, "bytes": path.stat().st_size}
  print(json.dumps(written, indent=1))


if __name__ == "__main__":
  main()
