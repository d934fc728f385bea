"""Input-pipeline throughput: records/s building from WFDB, samples/s delivered to training.

  python -m benchmarks.input_pipeline [--ludb ../shared/data/ludb] [--batch_size 64] [--batches 30]

Builds LUDB (200 WFDB records, 500 Hz) twice, once per filter stage, then times the training pipeline (read,
random crop, band-pass if per_crop, z-score, batch) over the prepared shards with 0 and 2 grain worker processes.
Prints one JSON object. The target on a 2-core CPU is >= 2,000 samples/s; `meets_target` says which settings reach it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_LUDB = ROOT.parent / "shared" / "data" / "ludb"
TARGET_SAMPLES_PER_S = 2000.0


def _build(ludb: pathlib.Path, data_dir: str, filter_stage: str) -> dict[str, Any]:
  import tensorflow_datasets as tfds

  from data_pipelines.ludb import ludb_dataset_builder
  from data_pipelines.contract import Contract
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


def _time_pipeline(folder: str, *, batch_size: int, batches: int, worker_count: int, read_threads: int
                   ) -> dict[str, Any]:
  from stmem import data
  it, prepared = data.prepared_iterator(folder, "train", batch_size=batch_size, train=True, seed=0,
                                        worker_count=worker_count, read_threads=read_threads)
  for _ in range(3 if worker_count else 1):  # warm-up: worker start and first fills are not throughput
    next(it)
  start = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += next(it)["signal"].shape[0]
  seconds = time.perf_counter() - start
  del it
  return {"filter_stage": prepared.contract.filter_stage, "worker_count": worker_count, "read_threads": read_threads,
          "batch_size": batch_size, "samples": n, "seconds": round(seconds, 3),
          "samples_per_s": round(n / seconds, 1)}


def run(ludb: str | os.PathLike[str] = DEFAULT_LUDB, batch_size: int = 64, batches: int = 30,
        worker_counts: Sequence[int] = (0, 2), filter_stages: Sequence[str] = ("per_crop", "offline"),
        read_threads: int = 0, workdir: str | None = None) -> dict[str, Any]:
  """Build LUDB under each filter stage and time the training pipeline; returns the figures as a dict."""
  ludb = pathlib.Path(ludb)
  if not ludb.is_dir():
    raise FileNotFoundError(f"{ludb} is missing (the benchmark reads LUDB from ../shared/data/ludb)")
  result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "python": platform.python_version()},
                            "target_samples_per_s": TARGET_SAMPLES_PER_S, "build": [], "pipeline": []}
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    for stage in filter_stages:
      built = _build(ludb, os.path.join(tmp, stage), stage)
      result["build"].append({k: v for k, v in built.items() if k != "folder"})
      for workers in worker_counts:
        result["pipeline"].append(_time_pipeline(built["folder"], batch_size=batch_size, batches=batches,
                                                 worker_count=workers, read_threads=read_threads))
  result["meets_target"] = [f"filter_stage={p['filter_stage']} worker_count={p['worker_count']}"
                            for p in result["pipeline"] if p["samples_per_s"] >= TARGET_SAMPLES_PER_S]
  return result


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ludb", default=str(DEFAULT_LUDB))
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--workers", default="0,2", help="comma-separated grain worker counts to time")
  p.add_argument("--filter_stages", default="per_crop,offline")
  p.add_argument("--read_threads", type=int, default=0)
  args = p.parse_args(argv)
  out = run(args.ludb, batch_size=args.batch_size, batches=args.batches,
            worker_counts=[int(w) for w in args.workers.split(",") if w.strip()],
            filter_stages=[s for s in args.filter_stages.split(",") if s.strip()], read_threads=args.read_threads)
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
