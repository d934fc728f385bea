"""Host-side arrays of every process, in the global batch's row order: what a sharded evaluation pass needs to
know about its rows (validity, labels, record and patient ids) on the process that writes the results.

`stmem.data.to_global` builds a global batch as the concatenation of the processes' local batches in process order;
`gather` concatenates host arrays the same way, so row i of a replicated model output and row i of the gathered
ids describe the same record. Text (bytes/str ids) travels as fixed-width uint8 rows. One process: no-op.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


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
