#!/usr/bin/env bash
# One-GPU check of stmem, in under 8 minutes: install, plan, time the production step, the input pipeline, and a
# short end-to-end pretraining run (benchmarks/README.md, "Memory plans").
#
#   bash launch/gpu_check.sh            # from anywhere; works in the repository root
#
# 1. install (jax with CUDA wheels for the driver);                                        ~2 min
# 2. `stmem plan --topology local` for base at batch 256 (bytes per device, FLOPs, verdict);  ~1 min
# 3. `stmem bench` pretraining step (the production step: stmem.steps) base bf16 at batch 256 and 512, with MFU
#    against the GPU's dense bf16 peak (stmem.metrics.PEAK_FLOPS);                   ~2 min
# 4. the input pipeline with 0 and 4 grain workers (LUDB from ../shared when present);       ~1 min
# 5. `stmem pretrain` base bf16 at batch 256 for 60 steps, end to end on synthetic ECGs: samples/s against step 3's
#    model-only figure (target >= 90 %).                                                   ~2 min
# Targets: MFU >= 0.35 for base bf16 at batch 256 on an H100/H200-class GPU. Environment knobs: PYTHON (default
# python3), STMEM_VENV (default .venv-gpu), ATTENTION (xla or cudnn, default xla).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=$(mktemp -d)
step() { echo; echo "== [$((SECONDS - T0)) s] $*"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# jax ships CUDA as pip wheels: jax[cuda13] needs an R580+ driver, jax[cuda12] an R525+ one.
DRIVER_MAJOR=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
if [ "${DRIVER_MAJOR:-0}" -ge 580 ]; then CUDA_EXTRA=cuda13; else CUDA_EXTRA=cuda12; fi
echo "driver ${DRIVER_MAJOR}: installing jax[${CUDA_EXTRA}]"

step "install"
PYTHON=${PYTHON:-python3}
VENV=${STMEM_VENV:-.venv-gpu}
ATTENTION=${ATTENTION:-xla}
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q -U pip
# One resolve for both, so that pip picks a jax whose CUDA plugin matches it.
python -m pip install -q -e ".[test]" "jax[${CUDA_EXTRA}]"
python - <<'PY'
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())
assert jax.default_backend() == "gpu", "jax does not see the GPU: check the driver against the CUDA wheels"
PY
export JAX_PLATFORMS=cuda

step "plan: base bf16, batch 256, this GPU"
timeout 120 python -m stmem.cli plan --config configs/pretrain.py:base --topology local --config.batch_size=256 \
  --config.num_devices=1 --config.model.attention="$ATTENTION" --json "$OUT/plan.json" || echo "plan: exit $?"

step "benchmark: the production pretraining step, base bf16, batch 256 and 512, 10 timed steps each"
for B in 256 512; do
  timeout 150 python -m benchmarks.suite --workloads pretrain --variants base --dtypes bfloat16 --batch "$B" \
    --repeats 10 --no-isolate --output "$OUT/bench_$B.json" > /dev/null || echo "bench batch $B: exit $?"
done
python - "$OUT" <<'PY'
import json, pathlib, sys
from stmem import metrics
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("bench_*.json")):
  report = json.loads(path.read_text())
  peak = metrics.peak_flops(report["machine"]["device"], "bfloat16")
  for r in report["pretrain"]:
    if "error" in r:
      print(r["workload"], "failed:", r["error"][-400:]); continue
    mfu = metrics.mfu(r["flops_analytic"], r["step_seconds"], peak) if peak else float("nan")
    print(f"pretrain {r['variant']} {r['dtype']} batch {r['batch']} on {report['machine']['device']}: "
          f"{r['step_seconds'] * 1e3:.1f} ms, {r['samples_per_s']:.0f} samples/s, {r['flop_per_s'] / 1e12:.1f} TFLOP/s, "
          f"MFU {mfu:.3f} (target 0.35), compile {r['compile_seconds']:.0f} s, "
          f"XLA plan {(r['memory'] or {}).get('peak_bytes', 0) / 2**30:.1f} GiB")
PY

step "input pipeline, 0 and 4 grain workers"
timeout 90 python - <<'PY' || echo "input pipeline: exit $?"
from benchmarks import input_pipeline
try:
  result = input_pipeline.run(batches=20, worker_counts=(0, 4), filter_stages=("offline",))
except FileNotFoundError as e:
  print("skipped:", e)
else:
  for row in result.get("pipeline", []):
    print({k: row[k] for k in row if k in ("worker_count", "filter_stage", "samples_per_s")})
PY

step "stmem pretrain: base bf16, batch 256, 60 steps end to end (synthetic ECGs)"
WORK=$OUT/pretrain
timeout 180 python -m stmem.cli pretrain --config configs/pretrain.py:base --workdir "$WORK" --config.batch_size=256 \
  --config.total_steps=60 --config.warmup_steps=10 --config.log_every=20 --config.num_devices=1 \
  --config.data.num_synthetic=2048 --config.data.worker_count=4 --config.checkpoint.every=1000 \
  --config.model.attention="$ATTENTION" > "$OUT/pretrain.json" || echo "pretrain: exit $?"
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = [json.loads(l) for l in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
last = lines[-1]  # steps 41-60: compiled, warmed up
bench = json.loads((out / "bench_256.json").read_text())["pretrain"][0]
ratio = last["samples_per_s"] / bench["samples_per_s"]
print(f"pretrain end to end: {last['samples_per_s']:.0f} samples/s, MFU {last.get('mfu', float('nan')):.3f}; "
      f"{ratio:.2f} of the model-only {bench['samples_per_s']:.0f} samples/s (target >= 0.90)")
PY
step "done (outputs in $OUT)"
