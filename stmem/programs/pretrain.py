"""ST-MEM pretraining: `stmem pretrain --config configs/pretrain.py:PRESET --workdir DIR`.

Reads top to bottom: mesh, input pipeline, model and optimiser created sharded, checkpoint restore, the jitted and
donated update step (built by `stmem.steps`, compiled ahead and held against the device memory before the first
step), the evaluators of `config.evals` (`stmem.evaluators`), the train loop (metrics, evaluations, figures,
checkpoints, preemption, NaN guard). Running the same command again resumes from the latest checkpoint in the
workdir with exactly the next batch.

Between log, evaluation and checkpoint steps the loop only dispatches: no device-to-host transfer, no cross-process collective,
so the host runs ahead of the devices. The NaN flag stays on the devices until a log or save step reads it, and a
SIGTERM is agreed between processes at those steps (config.transfer_guard="disallow" makes any other transfer an
error: the tests run so).
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import leads as leads_lib
from stmem import checkpoint as ckpt_lib
from stmem import data as data_lib
from stmem import evaluators as evaluators_lib
from stmem import memory_plan as plan_lib
from stmem import preemption
from stmem import sharding as sharding_lib
from stmem import steps as steps_lib
from stmem.preemption import NonFiniteLoss
from data_pipelines.contract import Contract
from stmem import metrics as metrics_lib


class DoesNotFit(ValueError):
  """The compiled step needs more memory per device than the device has (or config.memory_budget_gb allows)."""


# Names kept for callers of this module: the step and the mesh parser live in the library (stmem.steps).
make_train_step, parse_mesh = steps_lib.make_train_step, steps_lib.parse_mesh


def build_source(config) -> tuple[data_lib.Source, Contract]:
  """The training examples and their contract: the config's `data` block (`stmem.data.spec_from_config`): the
  built-in simulator, a prepared dataset or a folder of raw records."""
  spec = data_lib.spec_from_config(config.data, seed=config.seed)
  # Simulated records are filtered once when made (the contract's "offline" stage) rather than per crop: they are in
  # memory anyway, and per-crop filtering would be most of a tiny model's step. Raw records are read as `stmem
  # prepare` would prepare them (the default contract); a prepared dataset keeps its own.
  contract = Contract(filter_stage="offline") if spec.source == "synthetic" else None
  pool = data_lib.open_pool(spec, contract)
  return pool.source, pool.contract


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, stop_after: int | None = None) -> dict:
  """Pretrain; returns a summary dict. `stop_after` ends the loop early without a final save (tests use it to
  stand in for a crash)."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)  # every process: each writes its own batches.<process>.jsonl here
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------------------------------------------- mesh
  devices = sharding_lib.program_devices(config.get("num_devices", 0))
  mesh = sharding_lib.make_mesh(parse_mesh(config.mesh), devices=devices)
  num_processes = jax.process_count()

  # -------------------------------------------------------------------------------------------- input pipeline
  source, contract = build_source(config)
  # The checkpoint's contract names the leads the model was trained on.
  contract = Contract.from_dict({**contract.to_dict(), "leads": list(leads_lib.parse_lead_set(config.data.lead_set))})

  def make_iter(state=None):
    return data_lib.make_iterator(source, contract, state=state, batch_size=config.batch_size // num_processes,
                                  train=True, seed=config.seed, lead_set=config.data.lead_set,
                                  worker_count=config.data.worker_count)

  # ------------------------------------------------------------------------------------ model and optimiser
  cfg = steps_lib.model_cfg(config, contract)
  budget = plan_lib.device_memory(mesh.devices.flat, config.get("memory_budget_gb", 0.0))
  accum_steps = int(config.optim.accum_steps)
  if accum_steps == 0:  # derive: the smallest count that fits the budget (none known, e.g. on CPU: no accumulation)
    accum_steps = _derive_accum(config, list(mesh.devices.flat), is_main) if budget else 1
  if config.batch_size % (mesh.size * accum_steps) or config.batch_size % num_processes:
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the {mesh.size} devices x "
                     f"{accum_steps} accumulation steps and by the {num_processes} processes")
  step_lib = steps_lib.pretrain_step(config, mesh, cfg, accum_steps=accum_steps)
  graphdef, tx, schedule = step_lib.graphdef, step_lib.tx, step_lib.schedule
  abstract_params, abstract_opt = step_lib.abstract_params, step_lib.abstract_opt
  param_shardings, opt_shardings = step_lib.param_shardings, step_lib.opt_shardings
  batch_sharding, replicated = step_lib.batch_sharding, step_lib.replicated
  # Compiled here, before anything is allocated, so that a step that cannot fit is refused with the fix instead of
  # failing at its first run; the loop runs this executable (one compile in all).
  step_fn = step_lib.jitted.lower(*steps_lib.abstract_args(step_lib, config.batch_size)).compile()
  _check_fits(step_fn, budget, config.batch_size // mesh.size, accum_steps, cfg.remat)
  # Created directly in their shardings: no device ever holds the whole model unless the mesh says so.
  params = jax.jit(step_lib.init_params, out_shardings=param_shardings)(jax.random.key(config.seed))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

  # ------------------------------------------------------------------------------------------------ checkpoint
  checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINT_DIR, every=config.checkpoint.every,
                                       keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  # The checkpoint describes the model, not how this run executed it (remat, attention kernel).
  meta = ckpt_lib.make_meta(cfg.replace(remat="none", attention="xla"), contract,
                            config=json.loads(config.to_json_best_effort()), origin="stmem pretrain")
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
  # Made by a jit with a replicated output: device_put of a key array onto a mesh that spans other processes' devices
  # is refused (it is not a host value), while a jitted constant lands on every process's devices.
  base_key = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=replicated)()
  ok = jax.device_put(jnp.asarray(True), replicated)

  # ------------------------------------------------------------------------------------------------ evaluators
  # Built once (their data read now); run every `every` steps and at the end, only at steps where the loop syncs.
  log = (lambda line: print(line, file=sys.stderr)) if is_main else (lambda line: None)
  evals = evaluators_lib.from_config(config.get("evals"), contract=contract, mesh=mesh, model_cfg=cfg,
                                     lead_set=config.data.lead_set)

  # ------------------------------------------------------------------------------------------------ train loop
  writer = metrics_lib.MetricWriter(workdir)
  preempted = {"flag": False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True)) \
    if preemption.main_thread() else None
  figure_batch = None
  # MFU from the analytic FLOP count (XLA's cost analysis counts the scanned blocks once, and costs a compile).
  flops_per_step = metrics_lib.pretrain_step_flops(cfg, config.batch_size, step_lib.leads)
  peak = metrics_lib.device_peak_flops(cfg.dtype, mesh.devices.flat)
  guard = config.get("transfer_guard", "allow")
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

  def sync_due(step: int) -> bool:
    """Steps at which the loop reads from the devices: logs, figures, checkpoints, the end."""
    return (step % config.log_every == 0 or step == config.total_steps or step % checkpointer.every == 0
            or bool(config.figure_every and step % config.figure_every == 0)
            or bool(evaluators_lib.due(evals, step, config.total_steps))
            or (stop_after is not None and step >= stop_after))

  try:
    while step < config.total_steps:
      batch = next(data_iter)
      if figure_batch is None:  # process 0's first example, on every process: the figure's forward pass is collective
        figure_batch = _from_process_zero({k: np.asarray(batch[k][:1]) for k in ("signal", "lead_ids", "lead_mask")})
      # Every other step only dispatches; under transfer_guard="disallow" a read from the devices there is an error.
      with contextlib.nullcontext() if sync_due(step + 1) else jax.transfer_guard_device_to_host(guard):
        if batch_log is not None:
          batch_log.write(json.dumps({"step": step, "record_id": [_str(r) for r in batch["record_id"]]}) + "\n")
        global_batch = data_lib.to_global({k: batch[k] for k in ("signal", "lead_ids", "lead_mask")}, batch_sharding)
        params, opt_state, step_metrics, ok = step_fn(params, opt_state, global_batch,
                                                      jax.random.fold_in(base_key, step), ok)
        step += 1
        save(step)  # returns at once unless a checkpoint is due
        if not sync_due(step):
          continue
      m = {}  # this step's line of metrics.jsonl
      due = evaluators_lib.due(evals, step, config.total_steps)
      if due:  # the evaluators: at sync steps only; their time is kept out of steps_per_s
        check_finite(step)  # never evaluate a diverged state
        began = time.perf_counter()
        m = evaluators_lib.run(due, evaluators_lib.Model(graphdef, params, cfg), log=lambda x: log(f"step {step}: {x}"))
        last_log = (last_log[0] + time.perf_counter() - began, last_log[1])
      if step % config.log_every == 0 or step == config.total_steps:
        check_finite(step)
        now = time.perf_counter()
        steps_per_s = (step - last_log[1]) / max(now - last_log[0], 1e-9)
        last_log = (now, step)
        m.update({k: float(v) for k, v in step_metrics.items()})
        m.update(lr=float(schedule(step - 1)), steps_per_s=steps_per_s, samples_per_s=steps_per_s * config.batch_size)
        if peak:
          m["mfu"] = metrics_lib.mfu(flops_per_step, 1.0 / steps_per_s, peak)
        writer.write(step, m)
        writer.console(step, config.total_steps, m, force=step == config.total_steps)
        summary["loss"] = m["loss"]
      elif m:  # an evaluation between log steps: its own line
        writer.write(step, m)
      if config.figure_every and step % config.figure_every == 0:
        _reconstruction_figure(graphdef, params, figure_batch, cfg, contract,
                               workdir / f"reconstruction_{step:06d}.png", write=is_main)
      if preemption.stop_requested(preempted["flag"]):  # at sync steps only: a collective across processes
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


def _from_process_zero(tree):
  """Process 0's copy of a small numpy tree, on every process (host inputs to a multi-process jit must agree)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x, y: np.asarray(y).astype(x.dtype), tree, multihost_utils.broadcast_one_to_all(tree))


def _derive_accum(config, devices, is_main: bool) -> int:
  """accum_steps = 0: the smallest count that the planner finds fits the device memory (stmem.memory_plan.fit)."""
  chosen, tried = plan_lib.fit(config, devices, budget_gb=config.get("memory_budget_gb", 0.0))
  if is_main:
    print(f"accum_steps 0: {chosen.accum_steps} fits ({chosen.total_bytes / plan_lib.GiB:.2f} GiB of "
          f"{chosen.budget_bytes / plan_lib.GiB:.2f} GiB per device; {len(tried)} compiles)", file=sys.stderr)
  if chosen.fits is False:
    raise DoesNotFit(f"no accum_steps fits {chosen.budget_bytes / plan_lib.GiB:.2f} GiB per device, even with "
                     f"remat {chosen.remat}: use more devices, --config.mesh=data:-1,fsdp:N or a smaller batch_size")
  if chosen.remat != steps_lib.model_cfg(config).remat:
    raise DoesNotFit(f"accum_steps alone does not fit the budget: pass --config.model.remat={chosen.remat} "
                     f"--config.optim.accum_steps={chosen.accum_steps}")
  return chosen.accum_steps


def _check_fits(compiled, budget: int | None, per_device: int, accum_steps: int, remat: str) -> None:
  """Refuse a compiled step whose memory plan exceeds the device budget (None: no budget known, nothing to check)."""
  if budget is None:
    return
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  if total <= budget:
    return
  fixed = total - m.temp_size_in_bytes
  guess = next((a for a in range(accum_steps + 1, per_device + 1)
                if per_device % a == 0 and m.temp_size_in_bytes * accum_steps / a <= budget - fixed), None)
  fix = (f"--config.optim.accum_steps={guess}" if guess else
         f"--config.model.remat={'block' if remat != 'block' else remat} with a larger accum_steps")
  raise DoesNotFit(f"the pretraining step needs {total / plan_lib.GiB:.2f} GiB per device and the budget is "
                   f"{budget / plan_lib.GiB:.2f} GiB (config.memory_budget_gb, or the chip's memory): try {fix}, or "
                   f"--config.optim.accum_steps=0 to let the planner choose (`stmem plan` shows the options)")


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
  from stmem import configflags
  config, workdir = configflags.parse(argv, "stmem pretrain", None)
  from stmem import distributed
  distributed.initialize()  # a no-op for one process; must come before any JAX computation
  try:
    summary = train(config, workdir)
  except NonFiniteLoss as e:
    print(f"stmem pretrain: {e}", file=sys.stderr)
    return 3
  except DoesNotFit as e:
    print(f"stmem pretrain: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  return 0
