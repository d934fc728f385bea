"""`stmem bench --quick` runs end to end and its JSON has every field, with sane values. Not a timing test."""
import json
import math

import pytest

from benchmarks import suite


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
