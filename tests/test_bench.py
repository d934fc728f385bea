"""`stmem bench --quick` runs end to end and its JSON has every field, with sane values; the step it times is the
production one; MFU from the analytic FLOP count, by hand. Not a timing test."""
import json
import math
import pathlib

import pytest

from benchmarks import machine, model_bench, suite
from stmem import steps
from stmem.models import model_config
from stmem import metrics


def _fraction(v) -> bool:
  return isinstance(v, float) and 0.0 < v <= 1.5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "bench.json"
  assert suite.main(["--quick", "--repeats", "1", "--output", str(path)]) == 0
  return json.loads(path.read_text())


def test_machine_and_matmul_yardstick(report):
  m = report["machine"]
  assert m["cpus"] >= 1 and m["jax"] and len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
  if pathlib.Path("/proc/cpuinfo").exists():  # every figure names its CPU
    assert m["cpu"]["model_name"] and all(f in machine.FLAGS_OF_INTEREST for f in m["cpu"]["features"])
  for dtype in ("float32", "bfloat16"):
    assert report["matmul"][dtype]["flop_per_s"] > 1e8
    assert report["matmul"]["before_flop_per_s"][dtype] > 0 and report["matmul"]["after_flop_per_s"][dtype] > 0


@pytest.mark.parametrize("kind,time_field", [("pretrain", "step_seconds"), ("embed", "batch_seconds")])
def test_model_workloads(report, kind, time_field):
  rows = report[kind]
  assert sorted(r["dtype"] for r in rows) == ["bfloat16", "float32"]
  for r in rows:
    assert "error" not in r, r.get("error")
    assert r["variant"] == "tiny" and r["batch"] == 8
    for field in (time_field, "cpu_seconds", "compile_seconds", "samples_per_s", "flop_per_s", "flops_analytic",
                  "peak_rss_bytes"):
      assert r[field] > 0, field
    assert math.isclose(r["samples_per_s"], 8 / r[time_field], rel_tol=1e-6)
    # XLA's count adds elementwise work to the analytic matmul count: close, and a little above.
    assert 0.9 <= r["flops_xla"] / r["flops_analytic"] <= 1.3
    for field in ("frac_of_f32_matmul", "frac_of_bf16_matmul", "frac_of_own_dtype_matmul"):
      assert _fraction(r[field]), (field, r[field])
    mem = r["memory"]
    assert mem["peak_bytes"] > 0 and mem["temp_bytes"] > 0 and mem["argument_bytes"] > 0
    key = f"{kind}/tiny/{r['dtype']}"
    assert report["summary"][key]["samples_per_s"] == r["samples_per_s"]


def test_pretrain_donates_params_and_optimizer_state(report):
  f32 = next(r for r in report["pretrain"] if r["dtype"] == "float32")
  assert f32["memory"]["alias_bytes"] > 0.5 * f32["memory"]["argument_bytes"]


def test_bf16_convergence(report):
  c = report["bf16_convergence"]
  for dtype in ("float32", "bfloat16"):
    run = c[dtype]
    for field in ("initial_train_loss", "final_train_loss", "held_out_loss"):
      assert math.isfinite(run[field]) and run[field] > 0
  assert c["relative_difference"] >= 0 and isinstance(c["within_tolerance"], bool) and c["tolerance"] == 0.02


def test_input_pipeline_and_probe(report):
  pipe = report["input_pipeline"]
  assert "skipped" in pipe or pipe["best_samples_per_s"] > 0
  probe = report["probe"]
  assert "skipped" in probe or (probe["fit_seconds"] > 0 and probe["first_fit_seconds"] > 0)


def test_pretrain_row_times_the_production_step(monkeypatch):
  """The benchmark compiles stmem.steps.pretrain_step, the step `stmem pretrain` runs (lead masks, mesh shardings,
  donation): this fails if it builds a step of its own."""
  built = []
  real = steps.make_train_step

  def recording(graphdef, tx, accum_steps):
    built.append(accum_steps)
    return real(graphdef, tx, accum_steps)

  scans = []
  real_step = steps.pretrain_step

  def recording_step(config, mesh, cfg, *args, **kwargs):
    scans.append(cfg.scan_blocks)
    return real_step(config, mesh, cfg, *args, **kwargs)

  monkeypatch.setattr(steps, "make_train_step", recording)
  monkeypatch.setattr(steps, "pretrain_step", recording_step)
  monkeypatch.setattr(model_bench, "_COMPILED", {})  # no step compiled earlier in this process
  row = model_bench.bench_pretrain("tiny", "float32", 8, 1)
  assert built and built[0] == 1  # the timed step, then the unrolled one lowered for XLA's FLOP count
  # The timed step scans its blocks; only the step lowered for the FLOP count is unrolled, by its own model config,
  # and nothing else in the process changes: the next model still scans.
  assert scans == [True, False] and model_config("tiny").scan_blocks
  compiled = model_bench._COMPILED[("tiny", "float32", 8)][0]
  # The compiled program takes the lead mask and the mesh's shardings, and donates parameters and optimiser state.
  batch_arg = compiled.input_shardings[0][2]
  assert set(batch_arg) == {"signal", "lead_ids", "lead_mask"}
  assert row["memory"]["alias_bytes"] > 0.5 * row["memory"]["argument_bytes"]


def test_mfu_by_hand():
  # tiny: D 128, 2 blocks, MLP 4D, decoder 128 wide with 1 block; 12 leads of 30 patches of 75 samples, 7 kept.
  # Encoder tokens T = 12 (7 + 2) = 108; per token a block costs 24 D^2 + 4 T D; the decoder's sequences are 32 long.
  d, t = 128, 108
  forward = (12 * 30 * 2 * 75 * d                          # patch embedding
             + t * 2 * (24 * d * d + 4 * t * d)            # encoder, 2 blocks
             + t * 2 * d * d                               # encoder -> decoder
             + 12 * 32 * 1 * (24 * d * d + 4 * 32 * d)     # decoder, 1 block
             + 12 * 32 * 2 * d * 75)                       # reconstruction head
  assert forward == 271_988_736
  step = 3 * 16 * forward
  assert metrics.pretrain_step_flops(model_config("tiny"), 16) == step
  # 0.1 s a step on 4 v5e chips (197 TFLOP/s bf16 each): 13.06 GFLOP / 0.1 s / 788 TFLOP/s.
  chips = [type("Device", (), {"device_kind": "TPU v5 lite"})()] * 4
  assert metrics.device_peak_flops("bfloat16", chips) == 4 * 197e12
  assert math.isclose(metrics.mfu(step, 0.1, 4 * 197e12), 13_055_459_328 / 0.1 / 788e12)
  # The peak table: v5p reports itself as "TPU v5", v5e as "TPU v5 lite"; f32 on an H100 is its f32 peak.
  assert metrics.peak_flops("TPU v5", "bfloat16") == 459e12 and metrics.peak_flops("TPU v5 lite", "float32") == 197e12
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 67e12
  for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA B200", "NVIDIA A100-SXM4-80GB", "TPU v4", "TPU v5 lite",
               "TPU v5", "TPU v6 lite"):
    assert metrics.peak_flops(kind, "bfloat16") and metrics.peak_flops(kind, "float32"), kind
  assert metrics.peak_flops("cpu", "float32") is None
