"""One sharded evaluation pass, shared by fine-tuning (validation, test) and embedding: every record once, its
evaluation crops on a crop axis, the batch split over every device of every process, the model's outputs replicated
and the host-side rows (validity, labels, record and patient ids) gathered, so that any process (process 0 writes)
sees the whole global batch.

`stmem.data.to_global` builds a global batch as the concatenation of the processes' local batches in process order;
`gather` concatenates host arrays the same way, so row i of a replicated model output and row i of the gathered
ids describe the same record. Text (bytes/str ids) travels as fixed-width uint8 rows. One process: no copies.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def run(step: Callable, source: Any, contract: Any, *, batch_size: int, lead_set: Any, starts: Sequence[int],
        batch_sharding: Any, host_keys: Sequence[str] = ("valid", "record_id", "patient_id")
        ) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
  """(outputs, host rows) for every global batch of `source`: `batch_size` records, rounded up to a multiple of the
  mesh's devices (the extra rows are padding, like those ending the last batch).

  `step(signal (B, K, L, T), lead_ids, lead_mask)` is jitted with replicated outputs (`features.crop_mean` averages
  over the crop axis); padding rows have `valid` False. The rows also carry `index`, the source index of each row
  (-1 for padding): with several processes the global batch interleaves their shards."""
  from stmem import data
  devices = batch_sharding.mesh.size  # a multiple of the process count: every process brings its devices
  batch_size = -(-batch_size // devices) * devices
  processes = jax.process_count()
  local = batch_size // processes
  it = data.make_iterator(source, contract, batch_size=local, train=False, lead_set=lead_set,
                          eval_starts=tuple(starts))
  for j, batch in enumerate(it):
    arrays = data.to_global({k: batch[k] for k in ("signal", "lead_ids", "lead_mask")}, batch_sharding)
    rows = gather({k: batch[k] for k in host_keys})
    rows["index"] = _global_index(len(source), processes, local, j)
    yield step(arrays["signal"], arrays["lead_ids"], arrays["lead_mask"]), rows


def _global_index(n: int, processes: int, local: int, j: int) -> np.ndarray:
  """Source index of each row of global batch j: process p evaluates examples p, p + P, p + 2P, ... (the layout of
  `stmem.data.make_dataset`), `local` at a time, and the global batch is the processes' rows in process order."""
  position = j * local + np.arange(local)  # within each process's shard
  index = np.arange(processes)[:, None] + processes * position[None, :]
  return np.where(index < n, index, -1).reshape(-1)


def extract(encoders: Mapping[str, Any], source: Any, contract: Any, *, mesh: Any, lead_set: Any = None,
            batch_size: int = 32, last_blocks: int = 0) -> dict[str, Any]:
  """`features.extract` over a mesh: the pooled features of every example of `source`, in source order, for each
  encoder (one data pass feeds them all), averaged over the evaluation crops; the same return value."""
  from flax import nnx

  from data_pipelines import transforms
  from stmem import sharding as sharding_lib
  from stmem import features
  batch_sharding, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  fn = features.feature_fn(last_blocks)
  split = {}
  for name, e in encoders.items():
    graphdef, state = nnx.split(e.encoder if isinstance(e, features.Loaded) else e)
    split[name] = (graphdef, sharding_lib.place(state, replicated))
  graphdef = next(iter(split.values()))[0]  # one architecture: one compilation for every encoder
  forward = jax.jit(lambda state, *b: fn(graphdef, state, *b)["pooled"],
                    in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding), out_shardings=replicated)
  n = len(source)
  starts = transforms.eval_starts(contract.record_samples, contract.window)
  feats: dict[str, np.ndarray | None] = {name: None for name in split}
  labels = rids = pids = None
  for out, rows in run(lambda *b: {name: forward(state, *b) for name, (_, state) in split.items()}, source, contract,
                       batch_size=batch_size, lead_set=lead_set, starts=starts, batch_sharding=batch_sharding,
                       host_keys=("valid", "labels", "record_id", "patient_id")):
    keep = rows["valid"] & (rows["index"] >= 0)
    at = rows["index"][keep]
    if labels is None:
      labels = np.zeros((n, rows["labels"].shape[1]), np.float32)
      rids, pids = np.empty(n, object), np.empty(n, object)
    for name, v in out.items():
      v = np.asarray(v)
      if feats[name] is None:
        feats[name] = np.zeros((n, v.shape[-1]), np.float32)
      feats[name][at] = v[keep]
    labels[at] = rows["labels"][keep]
    rids[at] = [r.decode() for r in rows["record_id"][keep]]
    pids[at] = [p.decode() for p in rows["patient_id"][keep]]
  return {"features": {k: v if v is not None else np.zeros((0, 0), np.float32) for k, v in feats.items()},
          "labels": labels if labels is not None else np.zeros((0, 0), np.float32),
          "record_id": np.asarray(rids if rids is not None else [], dtype=str),
          "patient_id": np.asarray(pids if pids is not None else [], dtype=str)}


def gather(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{name: (B_local, ...)} on each process -> {name: (B_global, ...)} on every process."""
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in arrays.items()}
  from jax.experimental import multihost_utils
  out = {}
  for key, value in arrays.items():
    value = np.asarray(value)
    if value.dtype.kind in ("S", "U", "O"):
      out[key] = _gather_text(value, multihost_utils)
    else:
      out[key] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return out


def _gather_text(value: np.ndarray, multihost_utils) -> np.ndarray:
  encoded = [v if isinstance(v, bytes) else str(v).encode() for v in value.tolist()]
  # Every process must send the same shape: agree on the widest id first.
  width = int(np.max(multihost_utils.process_allgather(np.asarray(max(map(len, encoded), default=0)))))
  rows = np.zeros((len(encoded), max(width, 1)), np.uint8)
  for i, v in enumerate(encoded):
    rows[i, :len(v)] = np.frombuffer(v, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
  return np.asarray([bytes(r).rstrip(b"\0") for r in rows])
