"""Input-pipeline throughput: records/s building from WFDB, samples/s delivered to training, and where the time goes.

  python -m benchmarks.input_pipeline [--ludb ../shared/data/ludb] [--batch_size 64] [--batches 30]
      [--workers 0,auto] [--filter_stages offline,per_crop] [--step_rate 5000]

Builds LUDB (200 WFDB records, 500 Hz) once per filter stage, then, over the prepared shards:
- `stages`: the cost of each stage of one training batch, in one process, in microseconds per sample: `read`
  (ArrayRecord bytes of the batch, one batched read), `decode` (bytes -> arrays, `data_pipelines.example_codec`),
  `crop` (one random crop per example copied into the batch array), `zscore` (band-pass when the stage is per_crop,
  then one z-score per ECG, for the whole batch), `batch` (the rest of assembling a batch: crop RNGs, ids, masks,
  labels), as wall time and as CPU time. The CPU total gives `samples_per_s_per_core`, and `cores_to_feed` is how
  many such cores keep up with an accelerator consuming `step_rate` samples/s (about 4,000-6,000
  ECGs/s for one H100-class GPU on the base step).
- `pipeline`: the whole grain pipeline (`stmem.data.make_iterator`, training mode) timed end to end with each
  worker count (`auto`: `stmem.data.default_worker_count`, one per core).
Prints one JSON object with the machine, its load averages at the start and the end (other processes take cores:
repeat when the load is above about 1), and `meets_target` (>= 4,000 samples/s on a 2-core machine).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_LUDB = ROOT.parent / "shared" / "data" / "ludb"
TARGET_SAMPLES_PER_S = 4000.0
STEP_RATE = 5000.0  # samples/s one H100-class GPU consumes on the base pretraining step (an estimate)


def _build(ludb: pathlib.Path, data_dir: str, filter_stage: str) -> dict[str, Any]:
  import tensorflow_datasets as tfds

  from data_pipelines.contract import Contract
  from data_pipelines.ludb import ludb_dataset_builder
  tfds.disable_progress_bar()
  builder = ludb_dataset_builder.Builder(data_dir=data_dir, manual_dir=str(ludb), show_progress=False,
                                         contract=Contract(filter_stage=filter_stage))
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(ludb)))
  seconds = time.perf_counter() - start
  stats = builder.stats.to_dict()
  return {"filter_stage": filter_stage, "records": stats["records_read"], "examples": stats["examples_written"],
          "seconds": round(seconds, 2), "records_per_s": round(stats["records_read"] / seconds, 1),
          "folder": os.fspath(builder.data_dir)}


def _stages(folder: str, *, batch_size: int, batches: int, step_rate: float) -> dict[str, Any]:
  """Each stage of a training batch timed alone, in this process, on the same batches: microseconds per sample
  (median over the batches), of wall time and of this process's CPU time (all its threads).

  Why CPU time too: on a shared machine the wall time of a stage includes waiting for a core; the CPU time is what
  the stage costs a core, which is what `cores_to_feed` needs.
  """
  import numpy as np

  from stmem import data
  prepared = data.open_prepared(folder, "train")
  source, contract = prepared.source, prepared.contract
  make = data._TrainBatch(source, contract, None, 0, data._num_labels(source))  # noqa: SLF001
  rng = np.random.default_rng(0)
  names = ("read", "decode", "crop", "zscore", "total")
  wall: dict[str, list[float]] = {k: [] for k in names}
  cpu: dict[str, list[float]] = {k: [] for k in names}
  for b in range(batches + 1):
    indices = rng.permutation(len(source))[:batch_size]
    order = np.stack([np.zeros_like(indices), indices], axis=1)  # [epoch, source index]
    starts = rng.integers(0, contract.record_samples - contract.window + 1, (batch_size, 1))
    marks = [(time.perf_counter(), time.process_time())]
    raw = source.tfds_source.data_source.__getitems__([int(i) for i in indices])
    marks.append((time.perf_counter(), time.process_time()))
    examples = [source.decode(r) for r in raw]
    marks.append((time.perf_counter(), time.process_time()))
    columns = data._Columns(examples, indices, make.rows, starts, contract.window, make.num_labels)  # noqa: SLF001
    marks.append((time.perf_counter(), time.process_time()))
    data._finish(columns.signal[:, 0], columns.lead_mask, contract)  # noqa: SLF001
    marks.append((time.perf_counter(), time.process_time()))
    make(order)  # the whole batch as the pipeline makes it
    marks.append((time.perf_counter(), time.process_time()))
    if b == 0:  # warm-up: first reads open files, first filter designs are cached
      continue
    for i, k in enumerate(names):
      wall[k].append((marks[i + 1][0] - marks[i][0]) / batch_size * 1e6)
      cpu[k].append((marks[i + 1][1] - marks[i][1]) / batch_size * 1e6)

  def table(times: dict[str, list[float]]) -> dict[str, float]:
    us = {k: statistics.median(v) for k, v in times.items()}
    us["batch"] = max(us["total"] - sum(us[k] for k in names[:-1]), 0.0)  # crop RNG, ids, masks, labels
    return {k: round(us[k], 1) for k in (*names[:-1], "batch", "total")}

  wall_us, cpu_us = table(wall), table(cpu)
  per_core = 1e6 / cpu_us["total"]
  return {"filter_stage": contract.filter_stage, "batch_size": batch_size, "us_per_sample": wall_us,
          "cpu_us_per_sample": cpu_us,
          "cpu_share": {k: round(v / cpu_us["total"], 3) for k, v in cpu_us.items() if k != "total"},
          "samples_per_s_per_core": round(per_core, 1), "step_rate": step_rate,
          "cores_to_feed": math.ceil(step_rate / per_core)}


def _time_pipeline(folder: str, *, batch_size: int, batches: int, worker_count: int | None, read_threads: int
                   ) -> dict[str, Any]:
  from stmem import data
  prepared = data.open_prepared(folder, "train")
  workers = data.default_worker_count(prepared.source) if worker_count is None else worker_count
  it = data.make_iterator(prepared.source, prepared.contract, batch_size=batch_size, train=True, seed=0,
                          worker_count=workers, read_threads=read_threads)
  for _ in range(3 if workers else 1):  # warm-up: worker start and first fills are not throughput
    next(it)
  start = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += next(it)["signal"].shape[0]
  seconds = time.perf_counter() - start
  del it
  return {"filter_stage": prepared.contract.filter_stage, "worker_count": workers,
          "worker_count_chosen": "auto" if worker_count is None else "given", "read_threads": read_threads,
          "batch_size": batch_size, "samples": n, "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 1)}


def run(ludb: str | os.PathLike[str] = DEFAULT_LUDB, batch_size: int = 64, batches: int = 30,
        worker_counts: Sequence[int | None] = (0, None), filter_stages: Sequence[str] = ("offline", "per_crop"),
        read_threads: int = 0, step_rate: float = STEP_RATE, workdir: str | None = None) -> dict[str, Any]:
  """Build LUDB under each filter stage, cost each stage and time the training pipeline; the figures as a dict.
  A worker count of None is `stmem.data.default_worker_count` (one per core)."""
  ludb = pathlib.Path(ludb)
  if not ludb.is_dir():
    raise FileNotFoundError(f"{ludb} is missing (the benchmark reads LUDB from ../shared/data/ludb)")
  result: dict[str, Any] = {"machine": machine.describe(),
                            "target_samples_per_s": TARGET_SAMPLES_PER_S, "build": [], "stages": [],
                            "pipeline": []}
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    for stage in filter_stages:
      built = _build(ludb, os.path.join(tmp, stage), stage)
      result["build"].append({k: v for k, v in built.items() if k != "folder"})
      result["stages"].append(_stages(built["folder"], batch_size=batch_size, batches=min(batches, 20),
                                      step_rate=step_rate))
      for workers in worker_counts:
        result["pipeline"].append(_time_pipeline(built["folder"], batch_size=batch_size, batches=batches,
                                                 worker_count=workers, read_threads=read_threads))
  result["machine"]["loadavg_end"] = os.getloadavg()
  result["meets_target"] = [f"filter_stage={p['filter_stage']} worker_count={p['worker_count']}"
                            for p in result["pipeline"] if p["samples_per_s"] >= TARGET_SAMPLES_PER_S]
  return result


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ludb", default=str(DEFAULT_LUDB))
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--workers", default="0,auto", help="comma-separated grain worker counts to time ('auto': per core)")
  p.add_argument("--filter_stages", default="offline,per_crop")
  p.add_argument("--read_threads", type=int, default=0)
  p.add_argument("--step_rate", type=float, default=STEP_RATE,
                 help="samples/s an accelerator consumes, for `cores_to_feed` (default: one H100 on the base step)")
  args = p.parse_args(argv)
  workers = [None if w.strip() == "auto" else int(w) for w in args.workers.split(",") if w.strip()]
  out = run(args.ludb, batch_size=args.batch_size, batches=args.batches, worker_counts=workers,
            filter_stages=[s for s in args.filter_stages.split(",") if s.strip()], read_threads=args.read_threads,
            step_rate=args.step_rate)
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
