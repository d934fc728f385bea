#!/usr/bin/env python3
"""Embed a folder of ECGs with an encoder from `stmem export --format onnx`, using onnxruntime and numpy only (no JAX,
no stmem, no scipy): a template for serving the features wherever Python has onnxruntime.

  python launch/embed_onnx.py --model EXPORT/model.onnx --records FOLDER --out OUT_DIR
                              [--lead_set 12|I|I+II+V2] [--crops first|mean3] [--batch_size 32] [--per_patch]

Records: every `*.npz` under FOLDER (searched recursively, in sorted path order), each holding
  signal  float (leads, samples), in millivolts;
  leads   (leads,) text: the standard names I, II, III, aVR, aVL, aVF, V1 ... V6 (case ignored; other channels are
          skipped);
  fs      the sampling rate in Hz.
`stmem embed --records` reads WFDB instead; one WFDB record becomes such a file with
  r = wfdb.rdrecord(path, physical=True); np.savez(name, signal=r.p_signal.T, leads=r.sig_name, fs=r.fs)
(in mV: scale channels whose `r.units` are uV by 0.001).

Every number the preprocessing needs comes from the model's metadata (`stmem_contract`, `stmem_preprocessing`), and
each step is the one `stmem embed` applies to a raw folder: a record holding NaN or inf is skipped, a constant lead
counts as absent; each record is cut into windows of record_samples / fs seconds at its own rate and each window
FFT-resampled to record_samples at the contract's rate; leads go into the lead set's slots (absent ones stay
zero, lead_mask False); crops of `window` samples are cut (the first one, or with --crops mean3 the three evaluation
crops, whose features are averaged), band-passed (Butterworth sections from the metadata, zero phase, in float64) and
z-scored per ECG over its present leads.

Writes into OUT_DIR: pooled.npy (N, D), per_lead.npy (N, L, D), with --per_patch per_patch.npy (N, L, patches, D),
record_id.npy (N,) (the file's path under FOLDER without `.npz`), window.npy (N,) (the window's index in its record),
lead_mask.npy (N, L) and lead_names.npy (L,). Row i of every file is one window of one record. As in `stmem embed`,
the per_lead (and per_patch) rows of a slot that lead_mask marks absent are NaN.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

LEAD_SETS = {"12": None, "limb6": ("I", "II", "III", "aVR", "aVL", "aVF"),
             "precordial6": ("V1", "V2", "V3", "V4", "V5", "V6"), "limb3": ("I", "II", "III")}


# ------------------------------------------------------------------------------------------------ the model


def load_model(path: str):
  """(onnxruntime session, metadata dict) of an exported encoder; every `stmem_*` metadata value is JSON text."""
  import onnxruntime as ort
  options = ort.SessionOptions()
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  props = session.get_modelmeta().custom_metadata_map
  meta = {k[len("stmem_"):]: json.loads(v) for k, v in props.items() if k.startswith("stmem_")}
  if "contract" not in meta or "preprocessing" not in meta:
    raise SystemExit(f"{path}: no stmem metadata (stmem_contract, stmem_preprocessing); export it with "
                     "`stmem export --format onnx`")
  return session, meta


def onnx_runner(session):
  """run(signal, lead_ids, lead_mask) -> {pooled, per_lead, per_patch} through onnxruntime."""
  names = [o.name for o in session.get_outputs()]

  def run(signal, lead_ids, lead_mask):
    out = session.run(names, {"signal": signal, "lead_ids": lead_ids, "lead_mask": lead_mask})
    return dict(zip(names, out))

  return run


# ------------------------------------------------------------------------------------------------ preprocessing


def resample(x: np.ndarray, num: int) -> np.ndarray:
  """FFT resampling of x (..., n) to `num` samples along the last axis, as scipy.signal.resample (float64)."""
  n = x.shape[-1]
  if n == num:
    return x.astype(np.float64, copy=True)
  m = min(n, num)
  spectrum = np.fft.rfft(np.asarray(x, np.float64), axis=-1)[..., :m // 2 + 1]
  if m % 2 == 0:  # the unpaired bin at m / 2: united from a pair (down) or split into one (up)
    spectrum[..., m // 2] *= 2.0 if num < n else 0.5
  return np.fft.irfft(spectrum / (n / num), n=num, axis=-1)


def _sosfilt(sos: np.ndarray, x: np.ndarray, zi: np.ndarray) -> np.ndarray:
  """Second-order sections over the last axis of x (rows, n), initial states zi (sections, rows, 2): each section
  in direct form II transposed with scipy.signal.sosfilt's order of operations.

  Why skewed: a Python loop over samples and sections costs n x sections steps. Section s here runs one sample
  behind section s - 1 (it filters sample k - s at step k, from what s - 1 gave at step k - 1), so one vectorised
  step updates every section: n + sections - 1 steps, each a few numpy operations on (sections, rows) arrays."""
  sections, (rows, n) = len(sos), x.shape
  b0, b1, b2, a1, a2 = (sos[:, i, None] for i in (0, 1, 2, 4, 5))
  z0, z1 = zi[:, :, 0].copy(), zi[:, :, 1].copy()
  columns = np.ascontiguousarray(x.T)  # one contiguous row per time step
  out = np.zeros((sections, rows))
  y = np.empty((n, rows))
  for k in range(n + sections - 1):
    v = np.concatenate([columns[min(k, n - 1)][None], out[:-1]])  # section s's input: s - 1's last output
    new = b0 * v + z0
    new_z0 = b1 * v - a1 * new + z1
    new_z1 = b2 * v - a2 * new
    if k < sections - 1:  # sections s > k have not started: they keep their initial state
      started = (np.arange(sections) <= k)[:, None]
      new, new_z0, new_z1 = (np.where(started, a, b) for a, b in ((new, out), (new_z0, z0), (new_z1, z1)))
    out, z0, z1 = new, new_z0, new_z1
    if k >= sections - 1:
      y[k - sections + 1] = out[-1]
  return np.ascontiguousarray(y.T)


def sosfiltfilt(sos: np.ndarray, zi: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Zero-phase filtering of x (..., n) as scipy.signal.sosfiltfilt with its defaults (odd extension of
  3 * (2 * sections + 1 - trailing zero coefficients) samples at each end)."""
  sos, zi = np.asarray(sos, np.float64), np.asarray(zi, np.float64)
  shape = x.shape
  rows = np.asarray(x, np.float64).reshape(-1, shape[-1])
  ntaps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
  edge = 3 * ntaps
  if shape[-1] <= edge:
    raise ValueError(f"{shape[-1]} samples are too few to filter (more than {edge} needed)")
  ext = np.concatenate([2 * rows[:, :1] - rows[:, edge:0:-1], rows,
                        2 * rows[:, -1:] - rows[:, -2:-(edge + 2):-1]], axis=1)
  y = _sosfilt(sos, ext, zi[:, None, :] * ext[None, :, :1])
  y = _sosfilt(sos, y[:, ::-1], zi[:, None, :] * y[None, :, -1:])[:, ::-1]
  return y[:, edge:-edge].reshape(shape)


def bandpass(x: np.ndarray, preprocessing: dict) -> np.ndarray:
  """High-pass then low-pass, each zero phase (`sosfiltfilt`), in float64; a filter the contract lacks is skipped."""
  y = np.asarray(x, np.float64)
  for name in ("highpass", "lowpass"):
    if preprocessing.get(name):
      y = sosfiltfilt(preprocessing[name]["sos"], preprocessing[name]["zi"], y)
  return y


def zscore(x: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """One mean and std over the present leads and all time of each ECG (..., L, T); absent leads stay zero and a flat
  ECG becomes zeros."""
  present = np.broadcast_to(np.asarray(mask, bool), x.shape[:-1])
  axes = (-2, -1)
  if present.all():
    count = x.shape[-2] * x.shape[-1]
    centred = x - x.mean(axis=axes, keepdims=True)
  else:
    weight = present[..., None].astype(x.dtype)
    count = np.maximum(present.sum(axis=-1) * x.shape[-1], 1)[..., None, None].astype(x.dtype)
    centred = (x - (x * weight).sum(axis=axes, keepdims=True) / count) * weight
  std = np.sqrt(np.square(centred).sum(axis=axes, keepdims=True) / count)
  centred *= np.where(std > eps, 1.0 / np.maximum(std, eps), 0.0).astype(x.dtype)
  return centred


def record_windows(signal: np.ndarray, leads, fs: float, contract: dict, preprocessing: dict
                   ) -> tuple[np.ndarray, np.ndarray]:
  """One record -> (windows (W, contract leads, record_samples) float32 at the contract's rate, present (leads,)).
  W is 0 for a record shorter than one window."""
  names = {str(n).lower(): i for i, n in enumerate(contract["leads"])}
  signal = np.asarray(signal, np.float64)
  slots = np.zeros((len(names), signal.shape[-1]), np.float64)
  present = np.zeros(len(names), bool)
  for row, name in zip(signal, leads):
    slot = names.get(str(name).strip().lower())
    if slot is None or present[slot] or row.max() - row.min() <= 0.0:  # constant: a disconnected electrode
      continue
    slots[slot], present[slot] = row, True
  record_samples = int(contract["record_samples"])
  native = int(round(record_samples * float(fs) / float(contract["fs"])))
  count = slots.shape[-1] // native
  out = np.zeros((count, len(names), record_samples), np.float32)
  for i in range(count):
    y = resample(slots[:, i * native:(i + 1) * native], record_samples)
    if contract["filter_stage"] == "offline":
      y = bandpass(y, preprocessing)
    y[~present] = 0.0
    out[i] = y
  return out, present


def model_input(windows: np.ndarray, present: np.ndarray, rows: np.ndarray, starts, contract: dict,
                preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
  """Windows (B, contract leads, record_samples) and their present leads (B, contract leads) -> the graph's signal
  (B, K, slots, window) float32 for the crops at `starts`, and lead_mask (B, slots)."""
  window = int(contract["window"])
  mask = present[:, rows]
  crops = np.stack([windows[:, rows, s:s + window] for s in starts], axis=1)
  if contract["filter_stage"] == "per_crop":
    crops = bandpass(crops.astype(np.float64), preprocessing)
  if contract["normalisation"] != "zscore_per_ecg":
    raise ValueError(f"unknown normalisation {contract['normalisation']!r}")
  return zscore(crops, mask[:, None]).astype(np.float32), mask


# ------------------------------------------------------------------------------------------------ a folder


def lead_slots(lead_set: str, meta: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
  """A lead set ("12", "limb6", "I+II+V2") -> (names, rows of the contract's leads, canonical lead ids)."""
  contract_leads = list(meta["contract"]["leads"])
  named = LEAD_SETS.get(lead_set, ()) if lead_set in LEAD_SETS else tuple(lead_set.replace(",", "+").split("+"))
  spelled = {n.lower(): n for n in contract_leads}
  names = contract_leads if named is None else [spelled.get(n.strip().lower(), n.strip()) for n in named if n.strip()]
  unknown = [n for n in names if n not in contract_leads]
  if unknown or not names or len(set(names)) != len(names):
    raise SystemExit(f"lead set {lead_set!r}: name each of the model's leads at most once ({contract_leads})")
  rows = np.asarray([contract_leads.index(n) for n in names])
  ids = np.asarray([meta["lead_ids"][n] for n in names], np.int32)
  return names, rows, ids


def read_folder(folder: str) -> list[tuple[str, np.ndarray, list[str], float]]:
  """(record id, signal, lead names, fs) of every .npz under `folder`, in sorted path order."""
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".npz"))
  records = []
  for path in paths:
    with np.load(path, allow_pickle=False) as z:
      rid = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
      records.append((rid, np.asarray(z["signal"]), [str(n) for n in z["leads"]], float(z["fs"])))
  return records


def embed(records, meta: dict, run, *, lead_set: str = "12", crops: str = "first", batch_size: int = 32,
          per_patch: bool = False) -> dict[str, np.ndarray]:
  """Features of every window of `records` ([(id, signal, leads, fs)]) through `run(signal, lead_ids, lead_mask)`,
  `batch_size` windows a call; returns the arrays that `main` writes."""
  contract, pre = meta["contract"], meta["preprocessing"]
  names, rows, ids = lead_slots(lead_set, meta)
  starts = pre["crop_starts"] if crops == "mean3" else [0]
  windows, present, rid, index = [], [], [], []
  for record_id, signal, leads, fs in records:
    if not np.isfinite(signal).all():
      print(f"skipped {record_id}: NaN or inf samples", file=sys.stderr)
      continue
    w, p = record_windows(signal, leads, fs, contract, pre)
    if not p.any():
      print(f"skipped {record_id}: no standard lead that is not constant ({list(leads)})", file=sys.stderr)
      continue
    if not len(w):
      print(f"skipped {record_id}: shorter than one window of {contract['record_samples'] / contract['fs']:g} s",
            file=sys.stderr)
      continue
    windows += list(w)
    present += [p] * len(w)
    rid += [record_id] * len(w)
    index += list(range(len(w)))
  keys = ["pooled", "per_lead"] + (["per_patch"] if per_patch else [])
  parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  masks = []
  for a in range(0, len(windows), batch_size):
    signal, mask = model_input(np.stack(windows[a:a + batch_size]), np.stack(present[a:a + batch_size]), rows, starts,
                               contract, pre)
    b, k = signal.shape[:2]
    out = run(signal.reshape(b * k, *signal.shape[2:]), np.broadcast_to(ids, (b * k, len(ids))).copy(),
              np.repeat(mask, k, axis=0))
    for key in keys:  # the crops of one window: their features averaged
      v = np.asarray(out[key], np.float32)
      parts[key].append(v.reshape(b, k, *v.shape[1:]).mean(axis=1))
    masks.append(mask)
  if not windows:
    raise SystemExit("no usable record: nothing written")
  result = {k: np.concatenate(v) for k, v in parts.items()}
  mask = np.concatenate(masks)
  for key in ("per_lead", "per_patch"):  # an absent slot's rows: NaN, not numbers that pass for features
    if key in result and result[key].shape[:2] == mask.shape:
      result[key][~mask] = np.nan
  result.update(record_id=np.asarray(rid), window=np.asarray(index, np.int32), lead_mask=np.concatenate(masks),
                lead_names=np.asarray(names))
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="model.onnx written by `stmem export --format onnx`")
  parser.add_argument("--records", required=True, help="folder of .npz records (signal, leads, fs), searched recursively")
  parser.add_argument("--out", required=True, help="folder for the .npy outputs")
  parser.add_argument("--lead_set", default="12", help="12, limb6, precordial6, limb3 or names joined by + (I+II+V2)")
  parser.add_argument("--crops", default="first", choices=("first", "mean3"))
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--per_patch", action="store_true", help="also write every patch token (large)")
  args = parser.parse_args(argv)
  session, meta = load_model(args.model)
  result = embed(read_folder(args.records), meta, onnx_runner(session), lead_set=args.lead_set, crops=args.crops,
                 batch_size=args.batch_size, per_patch=args.per_patch)
  os.makedirs(args.out, exist_ok=True)
  for key, value in result.items():
    np.save(os.path.join(args.out, f"{key}.npy"), value)
  print(f"{len(result['pooled'])} windows of {len(set(result['record_id'].tolist()))} records -> {args.out} "
        f"(model fingerprint {meta.get('fingerprint')})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
