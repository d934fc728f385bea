"""`stmem embed`: export pooled, per-lead and (optionally) per-patch embeddings of a frozen encoder.

  stmem embed --config embed --config.init_from=CKPT --config.data.records=RAW_FOLDER --config.out=FILE_PREFIX
  stmem embed --init_from CKPT (--data_dir PREPARED --split S | --records RAW_FOLDER | --num_synthetic N)
              --out FILE_PREFIX
              [--per_patch] [--lead_set 12] [--crops first|mean3] [--batch_size 32]     (see configs/embed.py)

Read top to bottom: mesh, encoder (replicated on every device), data (a prepared split or a raw folder, this
process's share of every batch), the jitted forward pass (batch sharded over every device of every process, outputs
replicated), the loop that writes rows as they come. Several processes (`launch/`, `stmem.distributed`) each read
their share and process 0 writes every record exactly once, in the global batch order.

No masking at inference: the output equals `encoder.features(...)` on the preprocessed crops. Raw folders (WFDB,
searched recursively) are read through `stmem.data.open_pool` exactly as `stmem prepare generic` would prepare them
under the checkpoint's contract (FFT-resampled to its rate, every 10 s window a row, band-pass, z-score; records it
cannot use are skipped and listed); a prepared dataset is checked against the contract and adapted where safe.
Output: FILE_PREFIX.npz and FILE_PREFIX.parquet, written as the batches come (bounded memory), with record ids,
patient ids, `window` (the row's window index in its record: a 30 s record gives rows 0, 1, 2), lead names, the
checkpoint's fingerprint and contract. `lead_mask` (rows x lead slots) says which leads each row has: the per-lead
(and per-patch) rows of a lead a record lacks, or that was flat and so masked, are NaN, never numbers that look like
features (`pooled` comes from the present leads only).
"""
from __future__ import annotations

import json
import os
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np


class Writer:
  """Rows to Parquet (one row group per batch) and to memory-mapped .npy files, zipped into .npz at `close`.

  The .npy files are preallocated for `capacity` rows (an upper bound: unreadable raw records are skipped) and the
  .npz entries are written with the true row count, copied in slices, so no array is ever whole in memory.
  """

  def __init__(self, prefix: str, capacity: int, shapes: dict[str, tuple[int, ...]], metadata: dict[str, Any],
               staging: Any):
    import pyarrow as pa
    import pyarrow.parquet as pq
    self.prefix, self.capacity, self.shapes, self.metadata = prefix, capacity, shapes, metadata
    # Everything is written in `staging` (a stmem.atomic.Staging) and moved into place by `close`: a failed or empty
    # run leaves neither a 0-row file nor a temporary folder behind.
    self.staging, self.tmp = staging, staging.folder
    self.maps = {k: _reserved_memmap(os.path.join(self.tmp, f"{k}.npy"), (max(capacity, 1), *s))
                 for k, s in shapes.items()}
    self.ids: dict[str, list[str]] = {"record_id": [], "patient_id": []}
    self.masks: list[np.ndarray] = []
    self.windows: list[np.ndarray] = []
    self.n = 0

    def vec(shape):
      t = pa.float32()
      for size in reversed(shape):
        t = pa.list_(t, size)
      return t

    fields = [pa.field("record_id", pa.string()), pa.field("patient_id", pa.string()),
              pa.field("window", pa.int32()), pa.field("lead_mask", pa.list_(pa.bool_(), shapes["per_lead"][0]))]
    fields += [pa.field(k, vec(s)) for k, s in shapes.items()]
    self.schema = pa.schema(fields, metadata={k: json.dumps(v) for k, v in metadata.items()})
    self.parquet = pq.ParquetWriter(staging.path("out.parquet"), self.schema)

  def write(self, arrays: dict[str, np.ndarray], record_id: Sequence[str], patient_id: Sequence[str],
            window: np.ndarray, lead_mask: np.ndarray) -> None:
    """One batch of rows; `window` is each row's window index in its record (0 for a record of one window)."""
    import pyarrow as pa
    b = len(record_id)
    if self.n + b > self.capacity:
      raise RuntimeError(f"more rows than the {self.capacity} announced")
    arrays = absent_as_nan(arrays, lead_mask)
    for k in self.shapes:
      self.maps[k][self.n:self.n + b] = arrays[k]
    self.ids["record_id"] += list(record_id)
    self.ids["patient_id"] += list(patient_id)
    self.masks.append(np.asarray(lead_mask, bool))
    self.windows.append(np.asarray(window, np.int32))
    columns = [pa.array(list(record_id), pa.string()), pa.array(list(patient_id), pa.string()),
               pa.array(np.asarray(window, np.int32), pa.int32()),
               pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(lead_mask, bool).ravel()), lead_mask.shape[1])]
    for k, s in self.shapes.items():
      flat = pa.array(np.ascontiguousarray(arrays[k], np.float32).ravel())
      for size in reversed(s):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
      columns.append(flat)
    self.parquet.write_table(pa.Table.from_arrays(columns, schema=self.schema))
    self.n += b

  def close(self) -> tuple[str, str]:
    self.parquet.close()
    extra = {"record_id": np.asarray(self.ids["record_id"], dtype=str),
             "patient_id": np.asarray(self.ids["patient_id"], dtype=str),
             "window": np.concatenate(self.windows) if self.windows else np.zeros((0,), np.int32),
             "lead_mask": np.concatenate(self.masks) if self.masks else np.zeros((0, self.shapes["per_lead"][0]), bool)}
    for k, v in self.metadata.items():  # lists of names stay arrays of names; anything else is JSON text
      plain = isinstance(v, list) and all(isinstance(x, str) for x in v)
      extra[k] = np.asarray(v if plain or isinstance(v, str) else json.dumps(v), dtype=str)
    with zipfile.ZipFile(self.staging.path("out.npz"), "w", allowZip64=True) as z:
      for k, m in self.maps.items():
        with z.open(f"{k}.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(m.dtype),
                                                   "fortran_order": False, "shape": (self.n, *self.shapes[k])})
          step = max(1, (64 << 20) // max(m[0].nbytes, 1))  # 64 MiB at a time
          for a in range(0, self.n, step):
            f.write(np.ascontiguousarray(m[a:min(a + step, self.n)]).tobytes())
      for k, v in extra.items():
        with z.open(f"{k}.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, v, allow_pickle=False)
    for m in self.maps.values():
      m._mmap.close()
    self.staging.commit({"out.npz": self.prefix + ".npz", "out.parquet": self.prefix + ".parquet"})
    return self.prefix + ".npz", self.prefix + ".parquet"


def absent_as_nan(arrays: dict[str, np.ndarray], lead_mask: np.ndarray) -> dict[str, np.ndarray]:
  """The per-lead outputs with the rows of absent lead slots set to NaN: what the encoder gives there is computed
  from zeros it never attended to, a number that would pass for a feature. Outputs whose second axis is not the lead
  slots (pooled; MTAE's time tokens) are left as they are."""
  present = np.asarray(lead_mask, bool)
  out = dict(arrays)
  for k in ("per_lead", "per_patch"):
    if k in out and out[k].ndim >= 2 and out[k].shape[:2] == present.shape and not present.all():
      out[k] = np.array(out[k], np.float32)
      out[k][~present] = np.nan
  return out


def _reserved_memmap(path: str, shape: tuple[int, ...]) -> np.ndarray:
  """A float32 .npy file mapped into memory, its disk space reserved now: a sparse mapped file that meets a full disk
  later kills the process with SIGBUS at the first page it cannot place, where a reservation fails here with an
  OSError (ENOSPC), reported in one line."""
  import errno
  m = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
  if hasattr(os, "posix_fallocate"):  # Linux (elsewhere the file stays sparse)
    with open(path, "r+b") as f:
      try:
        os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
      except OSError as e:  # a file system that cannot reserve (EOPNOTSUPP, EINVAL): the file stays sparse
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
          raise
  return m


def run(config, workdir=None) -> dict:
  """Write the embeddings that `config` (configs/embed.py) asks for; returns a summary (process 0's is complete).
  Everything goes to `config.out`: there is no workdir."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from data_pipelines import errors, leads as leads_lib
  from data_pipelines import transforms
  from data_pipelines.errors import DataError
  from stmem import console, data, sharding as sharding_lib
  from stmem import features

  log = console.Log("embed")

  # ------------------------------------------------------------------------------------------------ mesh
  mesh = sharding_lib.mesh_from_config(config)
  batch_sharding, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  is_main = jax.process_index() == 0

  # ------------------------------------------------------------------------------------------------ encoder
  loaded = features.load_encoder(config.init_from)
  names = leads_lib.parse_lead_set(config.data.lead_set)
  crops = 1 if config.crops == "first" else transforms.EVAL_CROPS
  graphdef, state = nnx.split(loaded.encoder)
  state = sharding_lib.place(state, replicated)

  # ------------------------------------------------------------------------------------------------ data
  # A prepared split, a folder of WFDB records (read as `stmem prepare generic` reads it, under the contract) or
  # simulated ECGs (stmem.synthetic).
  spec = data.spec_from_config(config.data)
  if spec.source == "prepared":  # a missing split: a usage error naming the splits there
    for split in spec.splits:
      data.open_prepared(spec.path, split, spec.name or None)
  pool = data.open_pool(spec, loaded.contract)
  for q in pool.quarantine.get("records", []):
    log(f"skipped {q['path']}: {q['reason']} ({q['detail']})")
  source, contract, adapted = features.adapt(loaded.contract, pool.contract, pool.source, names)
  for line in adapted:
    log(f"adapted {line}")
  if spec.source != "prepared":
    log(f"raw records preprocessed by the checkpoint's contract ({contract.fs:g} Hz, every "
         f"{contract.record_samples / contract.fs:g} s window, crops: {config.crops})")
  starts = transforms.eval_starts(contract.record_samples, contract.window, crops)

  # ------------------------------------------------------------------------------------------------ forward pass
  fn = features.feature_fn(per_lead=True, per_patch=config.per_patch)

  # Outputs replicated: process 0 holds every row of the global batch and writes them. (B, K, L, T) inputs: the
  # features are averaged over the K crops inside `fn`.
  forward = jax.jit(lambda state, *batch: fn(graphdef, state, *batch),
                    in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding), out_shardings=replicated)

  # ------------------------------------------------------------------------------------------------ export loop
  cfg = loaded.encoder.cfg
  # Each output's row shape, from the model itself: ST-MEM's patch tokens are (leads, patches, D), MTAE's time
  # tokens (1, 30, D) (each spans all leads), MLAE's lead tokens (12, 1, D).
  example = (jax.ShapeDtypeStruct((1, len(starts), len(names), contract.window), jnp.float32),
             jax.ShapeDtypeStruct((1, len(names)), jnp.int32), jax.ShapeDtypeStruct((1, len(names)), jnp.bool_))
  shapes = {{"tokens": "per_patch"}.get(k, k): tuple(v.shape[1:])
            for k, v in jax.eval_shape(lambda s, *b: fn(graphdef, s, *b), state, *example).items()}
  capacity = len(source)
  from stmem import atomic
  # Process 0 writes into a staging folder and moves the files into place only when every record is written.
  staging = atomic.Staging(os.path.dirname(os.path.abspath(config.out))) if is_main else None
  writer = bar = None
  try:
    if is_main:
      writer = Writer(config.out, capacity, shapes, {
        "fingerprint": loaded.fingerprint, "contract": loaded.contract.to_dict(), "checkpoint": loaded.name,
        "lead_names": list(names), "crops": config.crops,
        "model": dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}}, staging)
      if not config.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=capacity, unit="record", desc="embed", file=sys.stderr)
    written = 0
    for out, rows in features.eval_pass(lambda *b: forward(state, *b), source, contract, batch_size=config.batch_size,
                                         lead_set=names, starts=starts, batch_sharding=batch_sharding,
                                         host_keys=("valid", "record_id", "patient_id", "window", "lead_mask")):
      valid = rows["valid"]
      written += int(valid.sum())
      if writer is not None:
        writer.write({{"tokens": "per_patch"}.get(k, k): np.asarray(v)[valid] for k, v in out.items()},
                     [r.decode() for r in rows["record_id"][valid]], [p.decode() for p in rows["patient_id"][valid]],
                     rows["window"][valid], rows["lead_mask"][valid])
      if bar is not None:
        bar.update(int(valid.sum()))
    if bar is not None:
      bar.close()
    if written == 0:
      raise DataError(f"no usable record in {spec.path} ({capacity} found, each skipped "
                      f"one listed above); nothing written to {config.out}.npz / .parquet")
    paths = writer.close() if writer is not None else (None, None)
  except Exception as e:  # noqa: BLE001 - only a write that found no room is turned into a DataError
    reason = None if isinstance(e, errors.UserError) else errors.no_space(e)
    if reason is None or staging is None:
      raise
    previous = [p for p in (config.out + ".npz", config.out + ".parquet") if os.path.exists(p)]
    kept = f"{' and '.join(previous)} {'is' if len(previous) == 1 else 'are'} intact" if previous else \
      "nothing was kept"
    raise DataError(f"{reason} while writing the embeddings {config.out}.npz / .parquet in "
                    f"{os.path.dirname(os.path.abspath(config.out))} (staged, the staging folder is removed); {kept}; "
                    "free space and run again") from e
  finally:
    if staging is not None:
      staging.remove()
  summary = {"records": written, "fingerprint": loaded.fingerprint, "devices": mesh.size,
             "processes": jax.process_count()}
  if writer is not None:
    summary["npz"], summary["parquet"] = paths
    log(f"{writer.n} records -> {summary['npz']}, {summary['parquet']} (fingerprint {loaded.fingerprint})")
  return summary


def check(config) -> None:
  """The command line's usage errors, before the (slow) checkpoint load."""
  from stmem import configflags, data
  spec = data.spec_from_config(config.data)  # a data block that names no data, or two: refused before any work
  configflags.require(config, "stmem embed", "init_from", "out")
  configflags.require_positive(config, "stmem embed", "batch_size", "data.num_synthetic",
                               zero_ok=("data.num_synthetic",))
  from data_pipelines import errors
  errors.require_output(config.out, "--out")  # FILE/x, or a folder nobody may write in: said before any work
  if config.crops not in ("first", "mean3"):
    raise configflags.ConfigError(f"--config.crops={config.crops}: choose first or mean3")
  from data_pipelines import errors
  if spec.source == "raw":
    errors.require_dir(spec.path, "--records")


def main(argv: Sequence[str]) -> int:
  from stmem import entry
  return entry.main(argv, run, program="embed", config="embed", workdir=None, check=check)
