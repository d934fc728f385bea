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
  over the crop axis); padding rows have `valid` False."""
  from stmem import data
  devices = batch_sharding.mesh.size  # a multiple of the process count: every process brings its devices
  batch_size = -(-batch_size // devices) * devices
  it = data.make_iterator(source, contract, batch_size=batch_size // jax.process_count(), train=False,
                          lead_set=lead_set, eval_starts=tuple(starts))
  for batch in it:
    arrays = data.to_global({k: batch[k] for k in ("signal", "lead_ids", "lead_mask")}, batch_sharding)
    yield step(arrays["signal"], arrays["lead_ids"], arrays["lead_mask"]), gather({k: batch[k] for k in host_keys})


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
