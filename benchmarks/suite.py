"""`stmem bench`: speed and memory of the model and the input pipeline, printed as one JSON object.

  stmem bench                                   # everything: small and base, float32 and bfloat16, batch 8
  stmem bench --workloads pretrain,embed --variants base --repeats 5
  stmem bench --quick                           # tiny model, 2 repeats: the shape of the output in under a minute

Each model workload (pretraining step, 12-lead embedding) is timed as the median of --repeats runs after one
warm-up run and reported as FLOP/s against an analytic FLOP count and as a fraction of the machine's own float32 and
bfloat16 4096^2 matmul rates, measured in the same run (before and after the model workloads; the higher of the two
is the yardstick). By default every (workload, variant, dtype) runs in its own child process, so that its peak
resident memory is its own. Field meanings: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

ALL_WORKLOADS = ("matmul", "pretrain", "embed", "input_pipeline", "probe", "bf16_convergence")


def _parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="stmem bench", description=__doc__.split("\n")[0])
  p.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help=f"comma-separated, from {ALL_WORKLOADS}")
  p.add_argument("--variants", default="small,base", help="model variants for pretrain and embed")
  p.add_argument("--dtypes", default="float32,bfloat16", help="computation dtypes (parameters stay float32)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5, help="timed runs per workload after one warm-up")
  p.add_argument("--matmul_size", type=int, default=4096)
  p.add_argument("--convergence_steps", type=int, default=200)
  p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats, short convergence, small pipeline run")
  p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                 help="one child process per model workload (default: on, off with --quick)")
  p.add_argument("--output", default=None, help="also write the JSON here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one workload, print its JSON
  args = p.parse_args(argv)
  if args.quick:
    args.variants = "tiny" if args.variants == "small,base" else args.variants
    args.repeats = min(args.repeats, 2)
    args.matmul_size = min(args.matmul_size, 1024)
    args.convergence_steps = min(args.convergence_steps, 10)
  if args.isolate is None:
    args.isolate = not args.quick
  return args


def _split(s: str) -> list[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


def _model_workload(kind: str, variant: str, dtype: str, batch: int, repeats: int) -> dict[str, Any]:
  from benchmarks import model_bench
  fn = {"pretrain": model_bench.bench_pretrain, "embed": model_bench.bench_embed}[kind]
  return fn(variant, dtype, batch, repeats)


def _in_child(kind: str, variant: str, dtype: str, batch: int, repeats: int) -> dict[str, Any]:
  spec = json.dumps({"kind": kind, "variant": variant, "dtype": dtype, "batch": batch, "repeats": repeats})
  proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--child", spec], capture_output=True, text=True,
                        env=os.environ.copy())
  if proc.returncode != 0:
    return {"workload": kind, "variant": variant, "dtype": dtype, "error": proc.stderr.strip()[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _with_rates(result: dict[str, Any], matmul: dict[str, Any]) -> dict[str, Any]:
  from benchmarks.model_bench import _rates
  if "error" in result:
    return result
  seconds = result.get("step_seconds", result.get("batch_seconds"))
  return {**result, **_rates(result["flops_analytic"], seconds, matmul, result["dtype"])}


def _input_pipeline(quick: bool) -> dict[str, Any]:
  if importlib.util.find_spec("benchmarks.input_pipeline") is None:
    return {"skipped": "benchmarks/input_pipeline.py is absent"}
  from benchmarks import input_pipeline
  kw = {"batches": 5, "worker_counts": (0,), "filter_stages": ("offline",)} if quick else {}
  start = time.perf_counter()
  try:
    result = input_pipeline.run(**kw)
  except FileNotFoundError as e:
    return {"skipped": str(e)}
  best = max((p["samples_per_s"] for p in result.get("pipeline", [])), default=None)
  return {"best_samples_per_s": best, "seconds": time.perf_counter() - start, **result}


def _probe(quick: bool) -> dict[str, Any]:
  """Fit time of the linear probe (stmem.linear_heads_heads.fit: every L2 of its grid at once) on random features of the
  base width; the first call includes compilation, the second is the fit alone."""
  if importlib.util.find_spec("stmem.linear_heads") is None:
    return {"skipped": "stmem/linear_heads.py is absent; no probe to time"}
  import numpy as np
  from stmem import linear_heads
  rng = np.random.default_rng(0)
  n, d, c, steps = (256, 128, 5, 20) if quick else (4096, 768, 5, 100)
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = (x[:, :c] + rng.standard_normal((n, c)) > 0).astype(np.float32)  # learnable multi-label targets
  times = []
  for _ in range(2):
    start = time.perf_counter()
    linear_heads.fit(x, y, kind="multilabel", steps=steps)
    times.append(time.perf_counter() - start)
  return {"examples": n, "features": d, "classes": c, "lbfgs_steps": steps, "l2_grid": len(linear_heads.L2_GRID),
          "first_fit_seconds": times[0], "fit_seconds": times[1]}


def _summary(out: dict[str, Any]) -> dict[str, Any]:
  """The headline figures, one line per model workload."""
  rows = {}
  for r in out.get("pretrain", []) + out.get("embed", []):
    if "error" in r:
      continue
    key = f"{r['workload']}/{r['variant']}/{r['dtype']}"
    rows[key] = {k: r.get(k) for k in ("step_seconds", "batch_seconds", "cpu_seconds", "samples_per_s", "flop_per_s",
                                       "frac_of_f32_matmul", "frac_of_bf16_matmul", "compile_seconds",
                                       "peak_rss_bytes") if k in r}
    rows[key]["compiled_peak_bytes"] = (r.get("memory") or {}).get("peak_bytes")
  return rows


def main(argv: list[str] | None = None) -> int:
  args = _parse(list(sys.argv[1:] if argv is None else argv))
  if args.child:
    spec = json.loads(args.child)
    print(json.dumps(_model_workload(spec["kind"], spec["variant"], spec["dtype"], spec["batch"], spec["repeats"])))
    return 0
  workloads = _split(args.workloads)
  unknown = sorted(set(workloads) - set(ALL_WORKLOADS))
  if unknown:
    from stmem import console
    console.Log("bench")(f"unknown workload(s) {unknown}; choose from {ALL_WORKLOADS}")
    return 2

  import jax
  from benchmarks import machine, matmul
  out: dict[str, Any] = {
    "machine": {**machine.describe(), "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
                "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
    "settings": {"workloads": workloads, "variants": _split(args.variants), "dtypes": _split(args.dtypes),
                 "batch": args.batch, "repeats": args.repeats, "quick": args.quick, "isolate": args.isolate},
  }
  # The yardstick is measured whenever a model workload is, so their fractions always come from this run.
  model_kinds = [k for k in ("pretrain", "embed") if k in workloads]
  needs_matmul = "matmul" in workloads or bool(model_kinds)
  before = matmul.run(args.matmul_size, args.repeats) if needs_matmul else None

  for kind in model_kinds:
    out[kind] = []
    for variant in _split(args.variants):
      for dtype in _split(args.dtypes):
        run = _in_child if args.isolate else _model_workload
        start = time.perf_counter()
        out[kind].append({**run(kind, variant, dtype, args.batch, args.repeats),
                          "wall_seconds": time.perf_counter() - start})

  if needs_matmul:
    after = matmul.run(args.matmul_size, args.repeats) if model_kinds else before
    best = {dt: max(before[dt], after[dt], key=lambda r: r["flop_per_s"]) for dt in before}
    out["matmul"] = {**best, "before_flop_per_s": {dt: before[dt]["flop_per_s"] for dt in before},
                     "after_flop_per_s": {dt: after[dt]["flop_per_s"] for dt in after}}
    for kind in model_kinds:
      out[kind] = [_with_rates(r, best) for r in out[kind]]

  if "bf16_convergence" in workloads:
    from benchmarks import model_bench
    start = time.perf_counter()
    out["bf16_convergence"] = model_bench.bf16_convergence(steps=args.convergence_steps)
    out["bf16_convergence"]["seconds"] = time.perf_counter() - start
  if "input_pipeline" in workloads:
    out["input_pipeline"] = _input_pipeline(args.quick)
  if "probe" in workloads:
    out["probe"] = _probe(args.quick)
  out["summary"] = _summary(out)
  out["machine"]["loadavg_end"] = list(os.getloadavg())

  text = json.dumps(out, indent=2)
  print(text)
  if args.output:
    with open(args.output, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
