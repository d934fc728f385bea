"""Model workloads: the pretraining step, 12-lead embedding, and bf16-versus-f32 convergence of a tiny model.

FLOPs are counted analytically from the config (matmuls only, 2 FLOPs per multiply-add; see benchmarks/README.md)
and cross-checked with XLA's own count, `compiled.cost_analysis()["flops"]`, which also counts elementwise work.
"""
from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stmem.models import Encoder, StMem, layers, model_config
from stmem.models.config import ModelConfig
from stmem.train.optim import adamw, warmup_cosine

LEADS = 12


# -- analytic FLOP counts ----------------------------------------------------------------------------------------------
def block_flops_per_token(width: int, mlp_ratio: int, seq_len: int) -> float:
  """One pre-LN transformer block, per token: q/k/v 6D^2, output 2D^2, MLP 4rD^2, scores and weighted sum 4SD."""
  return 2.0 * width * 3 * width + 2.0 * width * width + 2 * 2.0 * width * mlp_ratio * width + 4.0 * seq_len * width


def pretrain_forward_flops(cfg: ModelConfig, leads: int = LEADS) -> float:
  """Forward FLOPs of one ECG in pretraining: patch embedding of every patch, the encoder over the kept tokens of
  all leads as one sequence, the decoder over each lead's N + 2 tokens, and the reconstruction head."""
  n, p, d, dd = cfg.num_patches, cfg.patch_size, cfg.width, cfg.decoder_width
  enc_tokens = leads * (cfg.num_keep + 2)
  dec_seq = n + 2
  return (leads * n * 2.0 * p * d
          + enc_tokens * cfg.depth * block_flops_per_token(d, cfg.mlp_ratio, enc_tokens)
          + enc_tokens * 2.0 * d * dd
          + leads * dec_seq * cfg.decoder_depth * block_flops_per_token(dd, cfg.mlp_ratio, dec_seq)
          + leads * dec_seq * 2.0 * dd * p)


def embed_forward_flops(cfg: ModelConfig, leads: int = LEADS) -> float:
  """Forward FLOPs of one unmasked ECG through the encoder: every patch token of every lead plus 2 SEPs per lead."""
  tokens = leads * (cfg.num_patches + 2)
  return (leads * cfg.num_patches * 2.0 * cfg.patch_size * cfg.width
          + tokens * cfg.depth * block_flops_per_token(cfg.width, cfg.mlp_ratio, tokens))


def pretrain_step_flops(cfg: ModelConfig, batch: int) -> float:
  """Forward + backward: the backward pass costs two forwards (gradients of activations and of weights)."""
  return 3.0 * batch * pretrain_forward_flops(cfg)


# -- helpers ------------------------------------------------------------------------------------------------------------
def xla_flops(lowered_or_compiled) -> float | None:
  ca = lowered_or_compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax returned one dict per device
    ca = ca[0] if ca else {}
  return float(ca["flops"]) if ca and "flops" in ca else None


def unrolled_xla_flops(lower: Callable[[], Any]) -> float | None:
  """XLA's FLOP count of a program lowered with the transformer blocks unrolled.

  The timed program runs the blocks as a scan, and XLA's cost analysis counts a loop body once, so the cross-check
  lowers (without compiling) the same computation with the plain loop instead.
  """
  previous = layers.SCAN_BLOCKS
  layers.SCAN_BLOCKS = False
  try:
    return xla_flops(lower())
  finally:
    layers.SCAN_BLOCKS = previous


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


def _inputs(cfg: ModelConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  # Host numpy, not device arrays: donation of a device_put copy can delete its source (docs/style.md).
  signal = rng.standard_normal((batch, LEADS, cfg.window)).astype(np.float32)
  return signal, np.tile(np.arange(LEADS, dtype=np.int32), (batch, 1))


# One schedule for timing and for the convergence check: its constants are baked into the compiled step, so sharing
# them lets --quick (tiny model, batch 8 in both) compile each dtype's step once. Timing does not depend on them.
LR, WARMUP, TOTAL = 1e-3, 20, 200


def make_train_step(cfg: ModelConfig, lr: float = LR, warmup: int = WARMUP, total: int = TOTAL, *,
                    abstract: bool = False):
  """The pretraining update as one jitted pure function (split once, merge inside, donate params and opt state).

  Returns (step, params, opt_state, graphdef, rest) with freshly initialised params (seed 0), or with shapes only
  when `abstract` (for lowering without allocating a second model).
  """
  build = lambda: StMem(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  model = nnx.eval_shape(build) if abstract else build()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # The reference recipe: AdamW (0.9, 0.95), weight decay 0.01 on everything, fixed sin-cos tables frozen.
  tx = adamw(params, schedule=warmup_cosine(lr, warmup, total), b1=0.9, b2=0.95, weight_decay=0.01,
             frozen=(r"(.*/)?(decoder_)?pos_embedding",))
  opt_state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)

  def step(params, opt_state, signal, lead_ids, key):
    def loss_fn(p):
      return nnx.merge(graphdef, p, rest)(signal, lead_ids, key=key)["loss"]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), params, opt_state, graphdef, rest


_COMPILED: dict[tuple, tuple[Any, float]] = {}


def compiled_train_step(cfg: ModelConfig, batch: int):
  """(compiled step, seconds its compilation took, params, opt_state, graphdef, rest); compiled once per
  (config, batch) in this process."""
  step, params, opt_state, graphdef, rest = make_train_step(cfg)
  key = (cfg, batch)
  if key not in _COMPILED:
    signal = jax.ShapeDtypeStruct((batch, LEADS, cfg.window), jnp.float32)
    lead_ids = jax.ShapeDtypeStruct((batch, LEADS), jnp.int32)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, signal, lead_ids, jax.random.key(0)).compile()
    _COMPILED[key] = (compiled, time.perf_counter() - start)
  compiled, seconds = _COMPILED[key]
  return compiled, seconds, params, opt_state, graphdef, rest


# -- workloads ----------------------------------------------------------------------------------------------------------
def bench_pretrain(variant: str, dtype: str, batch: int, repeats: int,
                   matmul: dict[str, Any] | None = None) -> dict[str, Any]:
  cfg = model_config(variant, dtype=dtype)
  compiled, compile_s, params, opt_state, _, _ = compiled_train_step(cfg, batch)
  signal, lead_ids = (jnp.asarray(a) for a in _inputs(cfg, batch))
  state = {"params": params, "opt": opt_state, "i": 0}

  def one():
    state["i"] += 1
    state["params"], state["opt"], loss = compiled(state["params"], state["opt"], signal, lead_ids,
                                                   jax.random.key(state["i"]))
    jax.block_until_ready((state["params"], loss))

  times, cpu = _time(one, repeats)
  rss = peak_rss_bytes()  # before the FLOP cross-check below traces a second program
  seconds = statistics.median(times)
  flops = pretrain_step_flops(cfg, batch)

  def lower():
    step, p, o, _, _ = make_train_step(cfg, abstract=True)
    return step.lower(p, o, signal, lead_ids, jax.random.key(0))

  return {"workload": "pretrain", "variant": variant, "dtype": dtype, "batch": batch,
          "compile_seconds": compile_s, "step_seconds": seconds, "times": [round(t, 4) for t in times],
          "cpu_seconds": statistics.median(cpu),
          "samples_per_s": batch / seconds, "flops_analytic": flops, "flops_xla": unrolled_xla_flops(lower),
          **_rates(flops, seconds, matmul, dtype), "memory": compiled_memory(compiled),
          "peak_rss_bytes": rss}


def bench_embed(variant: str, dtype: str, batch: int, repeats: int,
                matmul: dict[str, Any] | None = None) -> dict[str, Any]:
  cfg = model_config(variant, dtype=dtype)
  encoder = Encoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(encoder)

  def pooled(params, signal, lead_ids):
    return nnx.merge(graphdef, params).features(signal, lead_ids)["pooled"]

  embed = jax.jit(pooled)

  signal, lead_ids = (jnp.asarray(a) for a in _inputs(cfg, batch))
  start = time.perf_counter()
  compiled = embed.lower(params, signal, lead_ids).compile()
  compile_s = time.perf_counter() - start
  times, cpu = _time(lambda: compiled(params, signal, lead_ids).block_until_ready(), repeats)
  rss = peak_rss_bytes()
  seconds = statistics.median(times)
  flops = batch * embed_forward_flops(cfg)
  flops_xla = unrolled_xla_flops(lambda: jax.jit(lambda *a: pooled(*a)).lower(params, signal, lead_ids))
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
    cfg = cfg32.replace(dtype=dtype)
    step, _, params, opt_state, graphdef, rest = compiled_train_step(cfg, batch)
    start = time.perf_counter()
    losses = []
    for i in range(steps):
      params, opt_state, loss = step(params, opt_state, jnp.asarray(train[order[i]]), jnp.asarray(ids),
                                     jax.random.key(i))
      losses.append(loss)
    losses = [float(v) for v in losses]

    # Inputs as arguments, not closed-over constants: XLA would otherwise constant-fold the masking argsort.
    @jax.jit
    def evaluate(params, signal, lead_ids, noise):
      return nnx.merge(graphdef, params, rest)(signal, lead_ids, noise=noise)["loss"]

    held_out_loss = float(evaluate(params, jnp.asarray(held_out), eval_ids, eval_noise))
    out[dtype] = {"initial_train_loss": losses[0], "final_train_loss": float(np.mean(losses[-10:])),
                  "train_loss_every_20_steps": [round(v, 5) for v in losses[::20]],
                  "held_out_loss": held_out_loss, "seconds": time.perf_counter() - start}
  f32, bf16 = out["float32"]["held_out_loss"], out["bfloat16"]["held_out_loss"]
  out["relative_difference"] = abs(bf16 - f32) / abs(f32)
  out["tolerance"] = tolerance
  out["within_tolerance"] = bool(out["relative_difference"] <= tolerance)
  return out
