"""ST-MEM pretraining: `stmem pretrain --config configs/pretrain.py:PRESET --workdir DIR`.

Reads top to bottom: mesh, input pipeline, model and optimiser created sharded, checkpoint restore, the jitted and
donated update step, the train loop (metrics, figures, checkpoints, preemption, NaN guard). Running the same command
again resumes from the latest checkpoint in the workdir with exactly the next batch.
"""
from __future__ import annotations

import json
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from data_pipelines import leads as leads_lib
from stmem import checkpoint as ckpt_lib
from stmem import data as data_lib
from stmem import sharding as sharding_lib
from data_pipelines.contract import Contract
from stmem.models import model_config, pretraining_model
from stmem.train import metrics as metrics_lib
from stmem.train import optim


class NonFiniteLoss(FloatingPointError):
  pass


def parse_mesh(spec: str) -> list[tuple[str, int]]:
  """'data:-1,fsdp:2' -> [('data', -1), ('fsdp', 2)]."""
  axes = []
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    axes.append((name, int(size or -1)))
  return axes


def build_source(config) -> tuple[data_lib.Source, Contract]:
  """The training examples and their contract: the built-in simulator, or a prepared dataset (`stmem.data`)."""
  if config.data.source == "synthetic":
    # Filtered once when simulated (the contract's "offline" stage) rather than per crop: the simulator's records
    # are in memory anyway, and per-crop filtering would be most of a tiny model's step.
    spec = data_lib.DatasetSpec("synthetic", num_synthetic=config.data.num_synthetic, seed=config.seed)
    pool = data_lib.open_pool(spec, Contract(filter_stage="offline"))
  elif config.data.source == "prepared":
    spec = data_lib.DatasetSpec("prepared", path=config.data.data_dir, name=config.data.name,
                                splits=(config.data.split,))
    pool = data_lib.open_pool(spec)
  else:
    raise ValueError(f"config.data.source must be 'synthetic' or 'prepared', not {config.data.source!r}")
  return pool.source, pool.contract


def make_train_step(graphdef, tx: optax.GradientTransformation, accum_steps: int):
  """The pure update step: (params, opt_state, batch, key, ok) -> (params, opt_state, metrics, ok)."""

  def loss_fn(params, batch, key):
    model = nnx.merge(graphdef, params)
    return model(batch["signal"], batch["lead_ids"], batch["lead_mask"], key=key)["loss"]

  grad_fn = jax.value_and_grad(loss_fn)

  def step(params, opt_state, batch, key, ok):
    if accum_steps == 1:
      loss, grads = grad_fn(params, batch, key)
    else:  # micro-batches in a scan: the gradient of the whole batch with a fraction of the activation memory
      micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        loss, grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
      loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return params, opt_state, metrics, ok & jnp.isfinite(loss)

  return step


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, stop_after: int | None = None) -> dict:
  """Pretrain; returns a summary dict. `stop_after` ends the loop early without a final save (tests use it to
  stand in for a crash)."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)  # every process: each writes its own batches.<process>.jsonl here
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------------------------------------------- mesh
  devices = jax.devices()[:config.num_devices] if config.get("num_devices") else None
  mesh = sharding_lib.make_mesh(parse_mesh(config.mesh), devices=devices)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  num_processes = jax.process_count()
  if config.batch_size % (mesh.size * config.optim.accum_steps) or config.batch_size % num_processes:
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the {mesh.size} devices x "
                     f"{config.optim.accum_steps} accumulation steps and by the {num_processes} processes")

  # -------------------------------------------------------------------------------------------- input pipeline
  source, contract = build_source(config)
  # The checkpoint's contract names the leads the model was trained on.
  contract = Contract.from_dict({**contract.to_dict(), "leads": list(leads_lib.parse_lead_set(config.data.lead_set))})

  def make_iter(state=None):
    return data_lib.make_iterator(source, contract, state=state, batch_size=config.batch_size // num_processes,
                                  train=True, seed=config.seed, lead_set=config.data.lead_set,
                                  worker_count=config.data.worker_count)

  # ------------------------------------------------------------------------------------ model and optimiser
  cfg = model_config(config.model.variant, dtype=config.model.dtype, mask_ratio=config.model.mask_ratio,
                     method=config.model.get("method", "stmem"),
                     patch_size=contract.patch_size, num_patches=contract.window // contract.patch_size)

  def init_params(key):
    return nnx.state(pretraining_model(cfg, rngs=nnx.Rngs(key)), nnx.Param).to_pure_dict()

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: pretraining_model(cfg, rngs=nnx.Rngs(0))))
  abstract_params = jax.eval_shape(init_params, jax.random.key(config.seed))
  lr = optim.scaled_lr(config.optim.base_lr, config.batch_size)
  schedule = optim.warmup_cosine(lr, config.warmup_steps, config.total_steps)
  tx = optim.adamw(abstract_params, schedule=schedule, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
                   weight_decay=config.optim.weight_decay, decay_mask=config.optim.decay_mask,
                   clip_norm=config.optim.clip_norm, frozen=tuple(config.optim.frozen))
  param_shardings = sharding_lib.tree_shardings(abstract_params, mesh, min_size=config.fsdp_min_size)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding_lib.tree_shardings(abstract_opt, mesh, min_size=config.fsdp_min_size)
  # Created directly in their shardings: no device ever holds the whole model unless the mesh says so.
  params = jax.jit(init_params, out_shardings=param_shardings)(jax.random.key(config.seed))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

  # ------------------------------------------------------------------------------------------------ checkpoint
  checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINT_DIR, every=config.checkpoint.every,
                                       keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  meta = ckpt_lib.make_meta(cfg, contract, config=json.loads(config.to_json_best_effort()), origin="stmem pretrain")
  data_state = None
  # The newest checkpoint that reads back: a corrupt latest step is moved aside, said, and the one before it used.
  start_step, restored = checkpointer.restore_latest_readable(
    log=(lambda m: print(m, file=sys.stderr)) if is_main else None, params=abstract_params, opt_state=abstract_opt,
    param_shardings=param_shardings, opt_shardings=opt_shardings)
  if restored is not None:
    params, opt_state = restored["params"], restored["opt_state"]
    data_state = restored.get("data_state")
    if is_main:
      print(f"resuming from step {start_step} ({checkpointer.directory / str(start_step)})", file=sys.stderr)
  data_iter = make_iter(data_state)

  # ------------------------------------------------------------------------------------------------ update step
  # Key, flag and metrics replicated: every process can read the scalars. The flag starts on the mesh, as every later
  # step returns it: a flag off the mesh made the second step trace and compile again (twice the start-up time).
  replicated = sharding_lib.replicated(mesh)
  step_fn = jax.jit(make_train_step(graphdef, tx, config.optim.accum_steps),
                    in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated, replicated),
                    out_shardings=(param_shardings, opt_shardings, replicated, replicated), donate_argnums=(0, 1))
  base_key = jax.random.key(config.seed + 1)
  ok = jax.device_put(jnp.asarray(True), replicated)

  # ------------------------------------------------------------------------------------------------ train loop
  writer = metrics_lib.MetricWriter(workdir)
  preempted = {"flag": False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True)) \
    if _main_thread() else None
  figure_batch = None
  flops_per_step, peak = None, metrics_lib.device_peak_flops(config.model.dtype)
  last_good, step, last_log = start_step, start_step, (time.perf_counter(), start_step)
  summary = {"workdir": str(workdir), "start_step": start_step}
  # Which records each step saw, per process: to check exact resumption of the data order.
  batch_log = (workdir / f"batches.{jax.process_index()}.jsonl").open("a") if config.get("log_batches") else None

  def check_finite(step: int):
    if not bool(ok):  # a device sync: done at log steps and before saves, not every step
      raise NonFiniteLoss(f"the loss became non-finite between step {last_good} and step {step}; "
                          f"the last good checkpoint is step {last_good} in {checkpointer.directory}")

  def save(step: int, force: bool = False):
    nonlocal last_good
    if step == last_good or not (force or step % checkpointer.every == 0):  # already saved, or not due
      return
    check_finite(step)  # never overwrite good checkpoints with a diverged state
    if checkpointer.save(step, params=params, opt_state=opt_state, data_state=data_iter.get_state(),
                         meta={**meta, "step": step}, force=force):
      last_good = step

  try:
    while step < config.total_steps:
      batch = next(data_iter)
      if figure_batch is None:  # process 0's first example, on every process: the figure's forward pass is collective
        figure_batch = _from_process_zero({k: np.asarray(batch[k][:1]) for k in ("signal", "lead_ids", "lead_mask")})
      if batch_log is not None:
        batch_log.write(json.dumps({"step": step, "record_id": [_str(r) for r in batch["record_id"]]}) + "\n")
      global_batch = data_lib.to_global({k: batch[k] for k in ("signal", "lead_ids", "lead_mask")}, batch_sharding)
      if flops_per_step is None:
        flops_per_step = _flops(step_fn, params, opt_state, global_batch, base_key, ok)
      params, opt_state, step_metrics, ok = step_fn(params, opt_state, global_batch,
                                                    jax.random.fold_in(base_key, step), ok)
      step += 1
      if step % config.log_every == 0 or step == config.total_steps:
        check_finite(step)
        now = time.perf_counter()
        steps_per_s = (step - last_log[1]) / max(now - last_log[0], 1e-9)
        last_log = (now, step)
        m = {k: float(v) for k, v in step_metrics.items()}
        m.update(lr=float(schedule(step - 1)), steps_per_s=steps_per_s, samples_per_s=steps_per_s * config.batch_size)
        if flops_per_step and peak:
          m["mfu"] = flops_per_step * steps_per_s / peak
        writer.write(step, m)
        writer.console(step, config.total_steps, m, force=step == config.total_steps)
        summary["loss"] = m["loss"]
      if config.figure_every and step % config.figure_every == 0:
        _reconstruction_figure(graphdef, params, figure_batch, cfg, contract,
                               workdir / f"reconstruction_{step:06d}.png", write=is_main)
      save(step)
      if _stop_requested(preempted["flag"]):
        save(step, force=True)
        checkpointer.wait()
        if is_main:
          print(f"preempted at step {step}: checkpoint saved in {checkpointer.directory}; run the same command "
                f"to resume", file=sys.stderr)
        summary.update(preempted=True, step=step)
        return summary
      if stop_after is not None and step >= stop_after:
        checkpointer.wait()
        summary.update(stopped=True, step=step)
        return summary
    save(step, force=True)
    checkpointer.wait()
    if figure_batch is not None:
      figure = _reconstruction_figure(graphdef, params, figure_batch, cfg, contract, workdir / "reconstruction.png",
                                      write=is_main)
      if is_main:
        summary["figure"] = str(figure)
    summary.update(step=step, checkpoint=str(checkpointer.directory / str(step)), metrics=str(writer.path))
    return summary
  finally:
    writer.close()
    if batch_log is not None:
      batch_log.close()
    checkpointer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)


def _str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _stop_requested(local_flag: bool) -> bool:
  """Every process stops at the same step: a SIGTERM seen by any process stops all of them."""
  if jax.process_count() == 1:
    return local_flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(local_flag))))


def _from_process_zero(tree):
  """Process 0's copy of a small numpy tree, on every process (host inputs to a multi-process jit must agree)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x, y: np.asarray(y).astype(x.dtype), tree, multihost_utils.broadcast_one_to_all(tree))


def _flops(step_fn, *args) -> float | None:
  """FLOPs of one update step from XLA's cost analysis (None where the backend gives none)."""
  try:
    cost = step_fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # cost analysis is a nicety; never let it stop training
    return None


def _reconstruction_figure(graphdef, params, batch, cfg, contract, path, *, write: bool = True):
  """One ECG: its patches, the masked ones shaded and the model's reconstruction over them (in z-score units).

  Every process must call this (the parameters may be sharded over all of them); only those with `write` plot."""
  from stmem import plots
  from stmem.models.stmem import patch_targets

  @jax.jit
  def forward(params, signal, lead_ids, lead_mask):
    out = nnx.merge(graphdef, params)(signal, lead_ids, lead_mask, key=jax.random.key(0))
    return out["pred"], out["mask"]

  pred, mask = forward(params, batch["signal"], batch["lead_ids"], batch["lead_mask"])
  if jax.process_count() > 1:  # the outputs may live partly on other processes' devices
    from jax.experimental import multihost_utils
    pred, mask = multihost_utils.process_allgather((pred, mask), tiled=True)
  if not write:
    return None
  patches = np.asarray(batch["signal"][0]).reshape(batch["signal"].shape[1], -1, cfg.patch_size)
  pred = np.asarray(pred[0])
  if cfg.norm_pix_loss:  # predictions are per-patch normalised: put them back in the patch's own scale
    mean, std = patches.mean(-1, keepdims=True), np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    pred = pred * std + mean
  names = [leads_lib.LEADS[i] for i in np.asarray(batch["lead_ids"][0])]
  return plots.plot_reconstruction(patches, pred, np.asarray(mask[0]), path, lead_names=names, fs=contract.fs,
                                   title=f"ST-MEM reconstruction ({int(np.asarray(mask[0]).sum())} masked patches)")


def main(argv: list[str]) -> int:
  from stmem.train import configflags
  config, workdir = configflags.parse(argv, "stmem pretrain", None)
  from stmem import distributed
  distributed.initialize()  # a no-op for one process; must come before any JAX computation
  try:
    summary = train(config, workdir)
  except NonFiniteLoss as e:
    print(f"stmem pretrain: {e}", file=sys.stderr)
    return 3
  print(json.dumps(summary, indent=2))
  return 0
