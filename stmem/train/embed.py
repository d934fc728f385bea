"""`stmem embed`: export pooled, per-lead and (optionally) per-patch embeddings of a frozen encoder.

  stmem embed --checkpoint CKPT (--data_dir PREPARED --split S | --records RAW_FOLDER) --out FILE_PREFIX
              [--per_patch] [--lead_set 12] [--crops first|mean3] [--batch_size 32]

No masking at inference: the output equals `encoder.features(...)` on the preprocessed crops. Raw folders (WFDB,
searched recursively) are read through `stmem.data.open_pool` exactly as `stmem prepare generic` would prepare them
under the checkpoint's contract (FFT-resampled to its rate, every 10 s window a row, band-pass, z-score; records
it cannot use are skipped and listed); a prepared dataset is checked against the contract and adapted where safe. Crops: see configs/embed.py. Output: FILE_PREFIX.npz and FILE_PREFIX.parquet, written as the
batches come (bounded memory), with record ids, lead names, the checkpoint's fingerprint and contract.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  import importlib.util
  spec = importlib.util.spec_from_file_location(
    "embed_config", pathlib.Path(__file__).resolve().parents[2] / "configs" / "embed.py")
  defaults = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(defaults)
  d = defaults.get_config()
  p = argparse.ArgumentParser(prog="stmem embed", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--data_dir", help="a prepared dataset (stmem prepare)")
  src.add_argument("--records", help="a folder of raw WFDB records")
  p.add_argument("--split", default=d.split)
  p.add_argument("--out", required=True, help="output prefix: writes PREFIX.npz and PREFIX.parquet")
  p.add_argument("--per_patch", action="store_true", help="also export every patch token (N, L, 30, D)")
  p.add_argument("--lead_set", default=d.lead_set)
  p.add_argument("--crops", choices=("first", "mean3"), default=d.crops)
  p.add_argument("--batch_size", type=int, default=d.batch_size)
  p.add_argument("--no_progress", action="store_true")
  return p.parse_args(list(argv))


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
    self.maps = {k: np.lib.format.open_memmap(os.path.join(self.tmp, f"{k}.npy"), mode="w+", dtype=np.float32,
                                              shape=(max(capacity, 1), *s)) for k, s in shapes.items()}
    self.ids: dict[str, list[str]] = {"record_id": [], "patient_id": []}
    self.masks: list[np.ndarray] = []
    self.n = 0

    def vec(shape):
      t = pa.float32()
      for size in reversed(shape):
        t = pa.list_(t, size)
      return t

    fields = [pa.field("record_id", pa.string()), pa.field("patient_id", pa.string()),
              pa.field("lead_mask", pa.list_(pa.bool_(), shapes["per_lead"][0]))]
    fields += [pa.field(k, vec(s)) for k, s in shapes.items()]
    self.schema = pa.schema(fields, metadata={k: json.dumps(v) for k, v in metadata.items()})
    self.parquet = pq.ParquetWriter(staging.path("out.parquet"), self.schema)

  def write(self, arrays: dict[str, np.ndarray], record_id: Sequence[str], patient_id: Sequence[str],
            lead_mask: np.ndarray) -> None:
    import pyarrow as pa
    b = len(record_id)
    if self.n + b > self.capacity:
      raise RuntimeError(f"more rows than the {self.capacity} announced")
    for k in self.shapes:
      self.maps[k][self.n:self.n + b] = arrays[k]
    self.ids["record_id"] += list(record_id)
    self.ids["patient_id"] += list(patient_id)
    self.masks.append(np.asarray(lead_mask, bool))
    columns = [pa.array(list(record_id), pa.string()), pa.array(list(patient_id), pa.string()),
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


def main(argv: Sequence[str]) -> int:
  args = _parse(argv)
  import sys

  from data_pipelines import errors, leads as leads_lib
  from data_pipelines import transforms
  from data_pipelines.errors import DataError
  from stmem import data
  from stmem.train import features

  def log(msg: str) -> None:
    print(f"stmem embed: {msg}", file=sys.stderr)

  if args.records:  # before the (slow) checkpoint load
    errors.require_dir(args.records, "--records")

  # ------------------------------------------------------------------------------------------ encoder
  loaded = features.load_encoder(args.checkpoint)
  names = leads_lib.parse_lead_set(args.lead_set)
  crops = 1 if args.crops == "first" else transforms.EVAL_CROPS

  # ------------------------------------------------------------------------------------------ data
  if args.data_dir:
    spec = data.DatasetSpec("prepared", path=args.data_dir, splits=(args.split,))
  else:  # a folder of WFDB records, read as `stmem prepare generic` reads it, under the checkpoint's contract
    spec = data.DatasetSpec("raw", path=args.records, name="generic")
  pool = data.open_pool(spec, loaded.contract)
  for q in pool.quarantine.get("records", []):
    log(f"skipped {q['path']}: {q['reason']} ({q['detail']})")
  source, contract, adapted = features.adapt(loaded.contract, pool.contract, pool.source, names)
  for line in adapted:
    log(f"adapted {line}")
  capacity = len(source)
  if not args.data_dir:
    log(f"raw records preprocessed by the checkpoint's contract ({contract.fs:g} Hz, every "
        f"{contract.record_samples / contract.fs:g} s window, crops: {args.crops})")

  # ------------------------------------------------------------------------------------------ export
  cfg = loaded.encoder.cfg
  shapes = {"pooled": (cfg.width,), "per_lead": (len(names), cfg.width)}
  if args.per_patch:
    shapes["per_patch"] = (len(names), contract.window // contract.patch_size, cfg.width)
  from stmem import atomic
  with atomic.Staging(os.path.dirname(os.path.abspath(args.out))) as staging:
    writer = Writer(args.out, capacity, shapes, {
      "fingerprint": loaded.fingerprint, "contract": loaded.contract.to_dict(), "checkpoint": loaded.name,
      "lead_names": list(names), "crops": args.crops, "model": dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}},
      staging)
    fn = features.feature_fn(per_lead=True, per_patch=args.per_patch)
    from flax import nnx
    graphdef, state = nnx.split(loaded.encoder)
    bar = None
    if not args.no_progress:
      from tqdm import tqdm
      bar = tqdm(total=capacity, unit="record", desc="embed", file=sys.stderr)
    for batch in features.eval_batches(source, contract, lead_set=names, batch_size=args.batch_size, crops=crops):
      out = fn(graphdef, state, batch["signal"], batch["lead_ids"], batch["lead_mask"])
      valid = batch["valid"]
      arrays = {{"tokens": "per_patch"}.get(k, k): np.asarray(v)[valid] for k, v in out.items()}
      writer.write(arrays, [r.decode() for r in batch["record_id"][valid]],
                   [p.decode() for p in batch["patient_id"][valid]], batch["lead_mask"][valid])
      if bar is not None:
        bar.update(int(valid.sum()))
    if bar is not None:
      bar.close()
    if writer.n == 0:
      raise DataError(f"no usable record in {args.records or args.data_dir} ({capacity} found, each skipped one "
                      f"listed above); nothing written to {args.out}.npz / .parquet")
    npz, parquet = writer.close()
  log(f"{writer.n} records -> {npz}, {parquet} (fingerprint {loaded.fingerprint})")
  return 0
