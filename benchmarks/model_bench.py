"""Model workloads: the pretraining step, 12-lead embedding, and bf16-versus-f32 convergence of a tiny model.

The pretraining step timed is the production one, `stmem.steps.pretrain_step` (what `stmem pretrain` compiles:
lead masks, mesh shardings, donation), on one device; there is no benchmark copy of it.

FLOPs are counted analytically from the config (matmuls only, 2 FLOPs per multiply-add; see benchmarks/README.md)
and cross-checked with XLA's own count, `compiled.cost_analysis()["flops"]`, which also counts elementwise work.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmem import sharding as sharding_lib
from stmem import steps as steps_lib
from stmem.models import model_config
from stmem.models.config import ModelConfig
from stmem import metrics

LEADS = 12


# -- helpers ------------------------------------------------------------------------------------------------------------
def xla_flops(lowered_or_compiled) -> float | None:
  ca = lowered_or_compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax returned one dict per device
    ca = ca[0] if ca else {}
  return float(ca["flops"]) if ca and "flops" in ca else None


def unrolled(cfg: ModelConfig) -> ModelConfig:
  """The same model with its transformer blocks unrolled (`ModelConfig.scan_blocks=False`).

  The timed program runs the blocks as a scan, and XLA's cost analysis counts a loop body once, so the FLOP
  cross-check lowers (without compiling) the same computation built from this config instead.
  """
  return cfg.replace(scan_blocks=False)


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's static plan: arguments + outputs (less donated aliases) + temporaries is the executable's peak."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend reports it
    return None
  if m is None:
    return None
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
          "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak)}


def peak_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _time(fn, repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
  """Wall-clock and process CPU seconds (all threads) of each timed run. On a busy machine wall time grows while
  CPU time stays near the work done, so cpu / wall below the core count shows contention."""
  for _ in range(warmup):
    fn()
  times, cpu = [], []
  for _ in range(max(repeats, 1)):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return times, cpu


def _rates(flops: float, seconds: float, matmul: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  out: dict[str, Any] = {"flop_per_s": flops / seconds}
  if matmul:
    f32, bf16 = matmul["float32"]["flop_per_s"], matmul["bfloat16"]["flop_per_s"]
    out["frac_of_f32_matmul"] = flops / seconds / f32
    out["frac_of_bf16_matmul"] = flops / seconds / bf16
    out["frac_of_own_dtype_matmul"] = flops / seconds / (bf16 if dtype == "bfloat16" else f32)
  return out


def _inputs(cfg: ModelConfig, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  # Host numpy, not device arrays: donation of a device_put copy can delete its source (docs/style.md).
  signal = rng.standard_normal((batch, LEADS, cfg.window)).astype(np.float32)
  return signal, np.tile(np.arange(LEADS, dtype=np.int32), (batch, 1)), np.ones((batch, LEADS), bool)


# One schedule for timing and for the convergence check: its constants are baked into the compiled step, so sharing
# them lets --quick (tiny model, batch 8 in both) compile each dtype's step once. Timing does not depend on them.
LR, WARMUP, TOTAL = 1e-3, 20, 200


def pretrain_config(variant: str, dtype: str, batch: int):
  """configs/pretrain.py with the benchmark's model, batch and schedule, on one device: the reference recipe
  (AdamW 0.9/0.95, weight decay 0.01, sin-cos tables frozen) with peak learning rate LR."""
  from configs import pretrain as pretrain_configs
  c = pretrain_configs.get_config("tiny")
  c.model.variant, c.model.dtype, c.batch_size = variant, dtype, batch
  c.optim.base_lr = LR * 256 / batch  # optim.scaled_lr: base_lr x batch / 256 = LR
  c.warmup_steps, c.total_steps, c.optim.accum_steps = WARMUP, TOTAL, 1
  c.mesh, c.num_devices = "data:-1,fsdp:1", 1
  return c


_COMPILED: dict[tuple, tuple[Any, float, Any]] = {}


def production_step(variant: str, dtype: str, batch: int):
  """(compiled step, seconds its compilation took, steps.PretrainStep, params, opt_state): the update step that
  `stmem pretrain` runs (stmem.steps.pretrain_step: lead masks, mesh shardings, donation), compiled once per
  (variant, dtype, batch) in this process, with freshly initialised parameters (seed 0)."""
  config = pretrain_config(variant, dtype, batch)
  key = (variant, dtype, batch)
  if key not in _COMPILED:
    mesh = sharding_lib.mesh_from_config(config)
    step = steps_lib.pretrain_step(config, mesh, steps_lib.model_cfg(config))
    start = time.perf_counter()
    compiled = step.jitted.lower(*steps_lib.abstract_args(step, batch)).compile()
    _COMPILED[key] = (compiled, time.perf_counter() - start, step)
  compiled, seconds, step = _COMPILED[key]
  params = sharding_lib.place(step.init_params, step.param_shardings, jax.random.key(config.seed))
  opt_state = sharding_lib.place(step.tx.init, step.opt_shardings, params)
  return compiled, seconds, step, params, opt_state


def _device_batch(step, signal, lead_ids, lead_mask) -> dict[str, jax.Array]:
  return {k: jax.device_put(v, step.batch_sharding)
          for k, v in (("signal", signal), ("lead_ids", lead_ids), ("lead_mask", lead_mask))}


# -- workloads ----------------------------------------------------------------------------------------------------------
def pretrain_runner(variant: str, dtype: str, batch: int):
  """(one, compiled, compile seconds, step): `one()` runs one production pretraining update (a fresh key each call,
  parameters and optimiser state donated and carried over) and waits for it."""
  compiled, compile_s, step, params, opt_state = production_step(variant, dtype, batch)
  data = _device_batch(step, *_inputs(step.cfg, batch))
  ok = jax.device_put(jnp.asarray(True), step.replicated)
  state = {"params": params, "opt": opt_state, "ok": ok, "i": 0}

  def one():
    state["i"] += 1
    key = jax.device_put(jax.random.key(state["i"]), step.replicated)
    state["params"], state["opt"], m, state["ok"] = compiled(state["params"], state["opt"], data, key, state["ok"])
    jax.block_until_ready((state["params"], m["loss"]))

  return one, compiled, compile_s, step


def embed_runner(variant: str, dtype: str, batch: int):
  """(one, compiled, compile seconds, (cfg, params, signal, lead_ids, lead_mask)): `one()` computes the pooled
  12-lead features of one batch (`steps.embed_forward`, what `stmem embed` jits) and waits for them."""
  cfg = model_config(variant, dtype=dtype)
  graphdef, params = steps_lib.encoder_graphdef_and_params(cfg)
  embed = jax.jit(steps_lib.embed_forward(graphdef))
  signal, lead_ids, lead_mask = (jnp.asarray(a) for a in _inputs(cfg, batch))
  start = time.perf_counter()
  compiled = embed.lower(params, signal, lead_ids, lead_mask).compile()
  compile_s = time.perf_counter() - start
  return (lambda: compiled(params, signal, lead_ids, lead_mask).block_until_ready(), compiled, compile_s,
          (cfg, params, signal, lead_ids, lead_mask))


def bench_pretrain(variant: str, dtype: str, batch: int, repeats: int,
                   matmul: dict[str, Any] | None = None) -> dict[str, Any]:
  one, compiled, compile_s, step = pretrain_runner(variant, dtype, batch)
  cfg = step.cfg
  times, cpu = _time(one, repeats)
  rss = peak_rss_bytes()  # before the FLOP cross-check below traces a second program
  seconds = statistics.median(times)
  flops = metrics.pretrain_step_flops(cfg, batch)
  # The same step built from the unrolled model, lowered only, for XLA's FLOP count.
  fresh = steps_lib.pretrain_step(pretrain_config(variant, dtype, batch), step.batch_sharding.mesh, unrolled(cfg))
  flops_xla = xla_flops(fresh.jitted.lower(*steps_lib.abstract_args(fresh, batch)))

  return {"workload": "pretrain", "variant": variant, "dtype": dtype, "batch": batch,
          "compile_seconds": compile_s, "step_seconds": seconds, "times": [round(t, 4) for t in times],
          "cpu_seconds": statistics.median(cpu),
          "samples_per_s": batch / seconds, "flops_analytic": flops, "flops_xla": flops_xla,
          **_rates(flops, seconds, matmul, dtype), "memory": compiled_memory(compiled),
          "peak_rss_bytes": rss}


def bench_embed(variant: str, dtype: str, batch: int, repeats: int,
                matmul: dict[str, Any] | None = None) -> dict[str, Any]:
  one, compiled, compile_s, (cfg, params, signal, lead_ids, lead_mask) = embed_runner(variant, dtype, batch)
  times, cpu = _time(one, repeats)
  rss = peak_rss_bytes()
  seconds = statistics.median(times)
  flops = batch * metrics.embed_forward_flops(cfg)
  unrolled_graphdef, _ = steps_lib.encoder_graphdef_and_params(unrolled(cfg), abstract=True)
  flops_xla = xla_flops(jax.jit(steps_lib.embed_forward(unrolled_graphdef)).lower(params, signal, lead_ids, lead_mask))
  return {"workload": "embed", "variant": variant, "dtype": dtype, "batch": batch, "leads": LEADS,
          "compile_seconds": compile_s, "batch_seconds": seconds, "times": [round(t, 4) for t in times],
          "cpu_seconds": statistics.median(cpu),
          "samples_per_s": batch / seconds, "flops_analytic": flops, "flops_xla": flops_xla,
          **_rates(flops, seconds, matmul, dtype), "memory": compiled_memory(compiled),
          "peak_rss_bytes": rss}


def _synthetic_windows(n: int, seed: int, window: int) -> np.ndarray:
  """z-scored synthetic 12-lead ECGs at 250 Hz, cut to the model's window (real-looking signals, not white noise,
  so that the loss has something to learn)."""
  from stmem import synthetic
  x = synthetic.make_dataset(n, seed, seconds=window / 250.0, fs=250.0)["signal"][:, :, :window]
  mean = x.mean(axis=(1, 2), keepdims=True)
  std = x.std(axis=(1, 2), keepdims=True)
  return ((x - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def bf16_convergence(variant: str = "tiny", steps: int = TOTAL, batch: int = 8,
                     tolerance: float = 0.02) -> dict[str, Any]:
  """Train the same model from the same seed on the same batches and masks in float32 and in bfloat16 compute;
  compare the loss on a held-out set (fixed masks, each model in its own compute dtype)."""
  cfg32 = model_config(variant)
  train = _synthetic_windows(64, 0, cfg32.window)
  held_out = _synthetic_windows(32, 1, cfg32.window)
  ids = np.tile(np.arange(LEADS, dtype=np.int32), (batch, 1))
  eval_ids = jnp.asarray(np.tile(np.arange(LEADS, dtype=np.int32), (len(held_out), 1)))
  eval_noise = jax.random.uniform(jax.random.key(99), (len(held_out), LEADS, cfg32.num_patches))
  order = np.random.default_rng(0).permutation(np.resize(np.arange(len(train)), steps * batch)).reshape(steps, batch)
  # Shorter runs stop partway down the same schedule (warmup 20, cosine to step 200); that is fine for a smoke test.
  out: dict[str, Any] = {"workload": "bf16_convergence", "variant": variant, "steps": steps, "batch": batch,
                         "peak_lr": LR, "warmup_steps": WARMUP, "schedule_steps": TOTAL}
  for dtype in ("float32", "bfloat16"):
    step, _, prod, params, opt_state = production_step(variant, dtype, batch)
    graphdef = prod.graphdef
    ok = jax.device_put(jnp.asarray(True), prod.replicated)
    start = time.perf_counter()
    losses = []
    for i in range(steps):
      data = _device_batch(prod, train[order[i]], ids, np.ones(ids.shape, bool))
      params, opt_state, m, ok = step(params, opt_state, data, jax.device_put(jax.random.key(i), prod.replicated), ok)
      losses.append(m["loss"])
    losses = [float(v) for v in losses]

    # Inputs as arguments, not closed-over constants: XLA would otherwise constant-fold the masking argsort.
    @jax.jit
    def evaluate(params, signal, lead_ids, noise):
      return nnx.merge(graphdef, params)(signal, lead_ids, noise=noise)["loss"]

    held_out_loss = float(evaluate(params, jnp.asarray(held_out), eval_ids, eval_noise))
    out[dtype] = {"initial_train_loss": losses[0], "final_train_loss": float(np.mean(losses[-10:])),
                  "train_loss_every_20_steps": [round(v, 5) for v in losses[::20]],
                  "held_out_loss": held_out_loss, "seconds": time.perf_counter() - start}
  f32, bf16 = out["float32"]["held_out_loss"], out["bfloat16"]["held_out_loss"]
  out["relative_difference"] = abs(bf16 - f32) / abs(f32)
  out["tolerance"] = tolerance
  out["within_tolerance"] = bool(out["relative_difference"] <= tolerance)
  return out
