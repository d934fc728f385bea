#!/usr/bin/env bash
# One-GPU check of stmem, in under 8 minutes: install, run the tests, benchmark base pretraining at batch 256 in bf16.
#
#   bash launch/gpu_check.sh            # from anywhere; works in the repository root
#
# Prints samples/s and MFU (achieved FLOP/s over the GPU's dense bf16 peak: 989 TFLOP/s for H100 and H200 SXM).
# FLOPs are the analytic count of benchmarks/model_bench.py (forward + backward = 3 x forward matmul FLOPs).
# Budget: install ~2 min, tests <= 4 min (capped), benchmark ~1.5 min. Environment knobs: PYTHON (default python3),
# STMEM_VENV (default .venv-gpu), PEAK_TFLOPS (default 989), SKIP_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
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

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "tests (CPU, as in CI: tests/conftest.py selects 8 fake CPU devices)"
  timeout 180 python -m pytest -q -x -p no:cacheprovider tests || { rc=$?; [ $rc -eq 124 ] && echo "tests: stopped at the 180 s cap" || exit $rc; }
  step "model tests on the GPU"
  # Full-precision f32 matmuls: by default the GPU runs f32 matmuls in TF32, too coarse for the parity tolerance.
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout 120 python -m pytest -q -x -p no:cacheprovider tests/test_model.py tests/test_reference_parity.py
fi

step "benchmark: base, batch 256, bf16 compute (f32 params), 10 timed steps after warm-up"
OUT=$(mktemp -d)/bench.json
JAX_PLATFORMS=cuda timeout 240 python -m benchmarks.suite --workloads matmul,pretrain,embed --variants base \
  --dtypes bfloat16 --batch 256 --repeats 10 --matmul_size 8192 --no-isolate --output "$OUT" > /dev/null
PEAK_TFLOPS=${PEAK_TFLOPS:-989} python - "$OUT" <<'PY'
import json, os, sys
report = json.load(open(sys.argv[1]))
peak = float(os.environ["PEAK_TFLOPS"]) * 1e12
print(f"device {report['machine']['device']}, jax {report['machine']['jax']}, "
      f"bf16 {report['matmul']['bfloat16']['size']}^2 matmul {report['matmul']['bfloat16']['flop_per_s'] / 1e12:.0f} TFLOP/s")
for r in report["pretrain"] + report["embed"]:
  if "error" in r:
    print(r["workload"], "failed:", r["error"]); continue
  seconds = r.get("step_seconds", r.get("batch_seconds"))
  print(f"{r['workload']:8s} {r['variant']} {r['dtype']} batch {r['batch']}: {seconds * 1e3:.1f} ms, "
        f"{r['samples_per_s']:.0f} samples/s, {r['flop_per_s'] / 1e12:.1f} TFLOP/s, MFU {r['flop_per_s'] / peak:.3f} "
        f"(of {peak / 1e12:.0f} TFLOP/s), {r['frac_of_bf16_matmul']:.2f} of the measured bf16 matmul, "
        f"compile {r['compile_seconds']:.0f} s, compiled peak {(r['memory'] or {}).get('peak_bytes', 0) / 2**30:.1f} GiB")
PY
step "done"
