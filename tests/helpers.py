"""Helpers shared by several test modules (imported from here, never from another test module)."""
from __future__ import annotations

import csv
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Tests run tiny models, whose time goes into compiling, not running: LLVM's optimisation of the generated code is
# turned off for them (about 40 % less CPU on a cold compilation cache). Tests only; no user run sets this.
TEST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {TEST_COMPILE_FLAGS}"


def tiny_checkpoint(path):
  """A one-block tiny ST-MEM checkpoint (seed 0, the default contract) at `path`: fast to load, fixed features."""
  from flax import nnx

  from data_pipelines.contract import Contract
  from stmem.checkpoint import make_meta, save_params
  from stmem.models import StMem, model_config
  cfg = model_config("tiny", width=64, depth=1, num_heads=1, decoder_width=64, decoder_heads=1)
  model = StMem(cfg, rngs=nnx.Rngs(0))
  save_params(path, nnx.state(model, nnx.Param).to_pure_dict(), make_meta(cfg, Contract(), origin="test"))
  return path


def synthesize(label: str, seconds: float = 10.0, fs: float = 500.0, rng=None, **kw) -> np.ndarray:
  """One simulated 12-lead ECG (12, T) in mV of class `label` (`stmem.synthetic.simulate` without its info)."""
  from stmem import synthetic
  return synthetic.simulate(label, seconds, fs, rng, **kw)[0]


def ecg_like(leads: int, samples: int, seed: int = 0) -> np.ndarray:
  """A crude but non-flat ECG-like signal (leads, samples) in mV."""
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / 400.0
  beats = np.sin(2 * np.pi * 1.2 * t) ** 15
  return (beats[None] * rng.uniform(0.5, 1.5, (leads, 1)) + 0.02 * rng.standard_normal((leads, samples)))


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def write_code15_folder(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[int, np.ndarray]]:
  """Two part files in the CODE-15 layout: (N, 4096, 12) float32 at 400 Hz, zero-padded at both ends."""
  import h5py
  tmp_path.mkdir(parents=True, exist_ok=True)
  truth = {}
  for part, exam_ids in ((0, [101, 102, 0]), (1, [201, 202])):
    tracings = np.zeros((len(exam_ids), 4096, 12), np.float32)
    for i, exam_id in enumerate(exam_ids):
      if exam_id in (0, 202):  # an empty filler slot, and an all-zero exam
        continue
      n = 4000 if exam_id != 102 else 2934  # 10 s and the short 7.3 s acquisition group
      pad = (4096 - n) // 2
      signal = ecg_like(12, n, seed=exam_id)
      tracings[i, pad:pad + n] = signal.T
      truth[exam_id] = signal
    with h5py.File(tmp_path / f"exams_part{part}.hdf5", "w") as f:
      f["tracings"] = tracings
      f["exam_id"] = np.asarray(exam_ids, np.int64)
  write_csv(tmp_path / "exams.csv", [
    {"exam_id": 101, "age": 54, "is_male": "True", "nn_predicted_age": 50.1, "1dAVb": "False", "RBBB": "True",
     "LBBB": "False", "SB": "False", "ST": "False", "AF": "False", "patient_id": 7, "death": "", "timey": "",
     "normal_ecg": "False", "trace_file": "exams_part0.hdf5"},
    {"exam_id": 102, "age": 60, "is_male": "False", "nn_predicted_age": 61.0, "1dAVb": "False", "RBBB": "False",
     "LBBB": "False", "SB": "True", "ST": "False", "AF": "True", "patient_id": 7, "death": "", "timey": "",
     "normal_ecg": "False", "trace_file": "exams_part0.hdf5"},
    {"exam_id": 201, "age": 33, "is_male": "False", "nn_predicted_age": 30.0, "1dAVb": "False", "RBBB": "False",
     "LBBB": "False", "SB": "False", "ST": "False", "AF": "False", "patient_id": 9, "death": "", "timey": "",
     "normal_ecg": "True", "trace_file": "exams_part1.hdf5"},
  ])
  return tmp_path, truth


def truncate_largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """Cut the largest array file of a checkpoint step's parameters in half (a step whose save was interrupted)."""
  files = sorted((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                 key=lambda p: p.stat().st_size)
  victim = files[-1]
  with open(victim, "r+b") as f:
    f.truncate(victim.stat().st_size // 2)
  return victim


# Single-process oracles of the library's sharded feature pass (`stmem.features`): simple enough to trust, used only
# to check it.


def eval_batches(source: Any, contract: Any, *, lead_set: Any, batch_size: int, crops: int = 3):
  """The evaluation pipeline (`stmem.data`) over a source: every example once, in order, `crops` crops each."""
  from data_pipelines import transforms
  from stmem import data
  starts = transforms.eval_starts(contract.record_samples, contract.window, crops)
  return data.make_iterator(source, contract, batch_size=batch_size, train=False, lead_set=lead_set,
                            eval_starts=starts, process_index=0, process_count=1)


def extract_one_process(encoders: Mapping[str, Any], source: Any, contract: Any, *, lead_set: Any = None,
                        batch_size: int = 32, blocks: Sequence[str] = (), crops: int = 3
                        ) -> dict[str, Any]:
  """The oracle of `stmem.features.extract` (the sharded pass): the same features computed in one process, on one
  device, batch by batch in source order, for each encoder (one data pass feeds them all).

  Returns {"features": {name: (N, D) float32}, "labels": (N, C), "record_id": (N,) str, "patient_id": (N,) str}
  and, with `blocks`, "blocks": {spec: {name: (N, D)}}. Features are averaged over the `crops` evaluation crops of
  each example.
  """
  from flax import nnx

  from stmem.features import feature_fn
  fn = feature_fn(tuple(blocks))
  split = {name: nnx.split(getattr(e, "encoder", e)) for name, e in encoders.items()}
  feats: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
  by_block: dict[str, dict[str, list[np.ndarray]]] = {spec: {name: [] for name in encoders} for spec in blocks}
  labels, rids, pids = [], [], []
  it = eval_batches(source, contract, lead_set=lead_set, batch_size=batch_size, crops=crops)
  for batch in it:
    valid = batch["valid"]
    for name, (graphdef, state) in split.items():
      out = fn(graphdef, state, batch["signal"], batch["lead_ids"], batch["lead_mask"])
      feats[name].append(np.asarray(out["pooled"])[valid])
      for spec in blocks:
        by_block[spec][name].append(np.asarray(out["blocks"][spec])[valid])
    labels.append(batch["labels"][valid])
    rids += [r.decode() for r in batch["record_id"][valid]]
    pids += [p.decode() for p in batch["patient_id"][valid]]
  n_labels = labels[0].shape[1] if labels else 0
  out = {"features": {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in feats.items()},
         "labels": np.concatenate(labels) if labels else np.zeros((0, n_labels), np.float32),
         "record_id": np.asarray(rids, dtype=str), "patient_id": np.asarray(pids, dtype=str)}
  if blocks:
    out["blocks"] = {spec: {k: np.concatenate(v) for k, v in f.items()} for spec, f in by_block.items()}
  return out


def embed_arrays(encoder: Any, signal: np.ndarray, lead_ids: np.ndarray, lead_mask: np.ndarray | None = None,
                 batch_size: int = 32, per_patch: bool = False) -> dict[str, np.ndarray]:
  """Embeddings of model-ready inputs (signal (N, L, window), already preprocessed), without masking, batch by
  batch on one device: the oracle the embed program's outputs are checked against.

  Returns pooled (N, D), per_lead (N, L, D) and, with `per_patch`, per_patch (N, L, patches, D): exactly
  `encoder.features(...)`, computed in batches (the last one padded, the padding dropped).
  """
  signal = np.asarray(signal, np.float32)
  n = signal.shape[0]
  lead_ids = np.broadcast_to(np.asarray(lead_ids, np.int32), signal.shape[:2])
  lead_mask = np.ones(signal.shape[:2], bool) if lead_mask is None else np.broadcast_to(lead_mask, signal.shape[:2])
  from flax import nnx

  from stmem.features import feature_fn
  fn = feature_fn(per_lead=True, per_patch=per_patch)
  graphdef, state = nnx.split(getattr(encoder, "encoder", encoder))
  parts: dict[str, list[np.ndarray]] = {}
  for a in range(0, n, batch_size):
    b = min(a + batch_size, n)
    pad = batch_size - (b - a)  # one batch shape, one compilation

    def padded(x):
      return np.concatenate([x[a:b], np.repeat(x[b - 1:b], pad, axis=0)]) if pad else x[a:b]

    out = fn(graphdef, state, padded(signal), padded(lead_ids), padded(lead_mask))
    for k, v in out.items():
      parts.setdefault({"tokens": "per_patch"}.get(k, k), []).append(np.asarray(v)[:b - a])
  return {k: np.concatenate(v) for k, v in parts.items()}
