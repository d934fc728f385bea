"""ST-MEM pretraining: `stmem pretrain --config configs/pretrain.py:PRESET --workdir DIR`.

Reads top to bottom: mesh, input pipeline, model and optimiser created sharded, checkpoint restore, the jitted and
donated update step (built by `stmem.steps`, compiled ahead and held against the device memory before the first
step), the evaluators of `config.evals` (`stmem.evaluators`), the train loop (`stmem.train_loop`: metrics,
evaluations, figures, checkpoints, preemption, NaN guard), the report. Running the same command again resumes from
the latest readable checkpoint in the workdir with exactly the next batch; a run already finished under the same
config is said so at once, before any data is built or step compiled.

Between log, evaluation and checkpoint steps the loop only dispatches: no device-to-host transfer, no cross-process
collective, so the host runs ahead of the devices (config.transfer_guard="disallow" makes any other transfer an
error: the tests run so).
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import leads as leads_lib
from data_pipelines.contract import Contract
from data_pipelines.errors import DataError
from stmem import checkpoint as ckpt_lib
from stmem import console
from stmem import data as data_lib
from stmem import entry
from stmem import evaluators as evaluators_lib
from stmem import memory_plan as plan_lib
from stmem import metrics as metrics_lib
from stmem import platforms
from stmem import sharding as sharding_lib
from stmem import steps as steps_lib
from stmem import train_loop
from stmem import workdir as workdir_lib
from stmem import workdir_hold
from stmem.memory_plan import DoesNotFit


def build_source(config) -> tuple[data_lib.Source, Contract, list[data_lib.Pool]]:
  """The training examples, the contract they are stored under and their pools: the config's `data` block
  (`stmem.data.training_pools`): the built-in simulator, a prepared dataset, a folder of raw records, or a weighted
  mix of them (`data.sources`)."""
  return data_lib.training_pools(config.data, seed=config.seed)


def refuse_overlap(train_pools, evals, allow: bool, log) -> None:
  """An evaluator that scores records pretraining trains on measures memory, not transfer: refuse it, naming the
  records, unless `data.allow_overlap` asks for it (then say so)."""
  held_out = []
  for name, _, evaluator in evals:
    pools = list(getattr(evaluator, "pools", {}).values()) or [getattr(evaluator, "pool", None)]
    held_out += [(f"evaluator {name!r}", pool) for pool in pools if pool is not None]
  data_lib.refuse_shared(train_pools, held_out, allow=allow, flag="--config.data.allow_overlap", log=log)


def _finished_checkpoint(workdir, config: ml_collections.ConfigDict):
  """The checkpoint of this workdir's last step when it is finished and its run's config is this one, else None.
  Anything else (no such step, an unreadable meta, a changed option) takes the full path, which resumes, re-plans
  or refuses with the reason."""
  step_dir = workdir / ckpt_lib.CHECKPOINT_DIR / str(config.total_steps)
  if not (step_dir / "meta").exists():
    return None
  try:
    meta, _, _ = ckpt_lib.read_meta(step_dir)
  except (DataError, OSError):
    return None
  return None if ckpt_lib.config_differences(meta.get("config") or {}, json.loads(config.to_json_best_effort())) \
    else step_dir


@workdir_hold.held("pretrain")  # one writer per workdir; a workdir belongs to one program
def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, stop_after: int | None = None) -> dict:
  """Pretrain; returns a summary dict. `stop_after` ends the loop early without a final save (tests use it to
  stand in for a crash)."""
  workdir = workdir_lib.resolve(workdir)  # a local folder, or a gs:// URL (stmem.workdir)
  log = console.Log("pretrain")
  is_main = jax.process_index() == 0
  workdir_lib.prepare(workdir)  # every process: each writes its own batches.<process>.jsonl here
  data_lib.record_simulator(config)
  if (finished := _finished_checkpoint(workdir, config)) is not None:
    log(f"already complete: step {config.total_steps} of {config.total_steps} under this config ({finished}); "
        f"nothing to train (a larger --config.total_steps trains on, another --workdir starts afresh)")
    return {"workdir": str(workdir), "start_step": config.total_steps, "step": config.total_steps,
            "checkpoint": str(finished), "metrics": str(workdir / metrics_lib.METRICS_FILE)}
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------------------------------------------- mesh
  mesh = sharding_lib.mesh_from_config(config)
  num_processes = jax.process_count()
  if advice := platforms.bf16_advice(mesh.devices.flat[0].platform, config.model.dtype):
    log(advice)

  # ---------------------------------------------------------------------------------------------------- data
  source, data_contract, train_pools = build_source(config)
  if isinstance(source, data_lib.MixedSource):
    log(f"training on {source!r}")
  # The checkpoint's contract names the leads the model was trained on; the examples keep theirs (the stored rows,
  # from which the lead set's slots are picked by name).
  contract = Contract.from_dict({**data_contract.to_dict(),
                                 "leads": list(leads_lib.parse_lead_set(config.data.lead_set))})

  def make_iter(state=None):
    return data_lib.make_iterator(source, data_contract, state=state, batch_size=config.batch_size // num_processes,
                                  train=True, seed=config.seed, lead_set=config.data.lead_set,
                                  worker_count=config.data.worker_count)

  # ------------------------------------------------------------------------------------ model and optimiser
  cfg = steps_lib.model_cfg(config, contract)

  # ------------------------------------------------------------------------------------------------ evaluators
  # Built once, before anything is compiled (their data read now, and checked against the training records); run
  # every `every` steps and at the end, at steps where the loop syncs.
  evals = evaluators_lib.from_config(config.get("evals"), contract=contract, mesh=mesh, model_cfg=cfg,
                                     lead_set=config.data.lead_set)
  refuse_overlap(train_pools, evals, bool(config.data.get("allow_overlap", False)), log)
  budget = plan_lib.device_memory(mesh.devices.flat, config.get("memory_budget_gb", 0.0))
  accum_steps = int(config.optim.accum_steps)
  if accum_steps == 0:  # derive: the smallest count that fits the budget (none known, e.g. on CPU: no accumulation)
    accum_steps = _derive_accum(config, list(mesh.devices.flat), log) if budget else 1
  if config.batch_size % (mesh.size * accum_steps) or config.batch_size % num_processes:
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the {mesh.size} devices x "
                     f"{accum_steps} accumulation steps and by the {num_processes} processes")
  step_lib = steps_lib.pretrain_step(config, mesh, cfg, accum_steps=accum_steps)
  graphdef, tx, schedule = step_lib.graphdef, step_lib.tx, step_lib.schedule
  param_shardings, opt_shardings = step_lib.param_shardings, step_lib.opt_shardings
  batch_sharding, replicated = step_lib.batch_sharding, step_lib.replicated
  # Compiled here, before anything is allocated, so that a step that cannot fit is refused with the fix instead of
  # failing at its first run; the loop runs this executable (one compile in all).
  step_fn = step_lib.jitted.lower(*steps_lib.abstract_args(step_lib, config.batch_size)).compile()
  _check_fits(step_fn, budget, config.batch_size // mesh.size, accum_steps, cfg.remat)
  # Created directly in their shardings: no device ever holds the whole model unless the mesh says so.
  params = sharding_lib.place(step_lib.init_params, param_shardings, jax.random.key(config.seed))
  opt_state = sharding_lib.place(tx.init, opt_shardings, params)

  # ------------------------------------------------------------------------------------------------ checkpoint
  checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINT_DIR, every=config.checkpoint.every,
                                       keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  # The checkpoint describes the model, not how this run executed it (remat, attention kernel).
  meta = ckpt_lib.make_meta(cfg.replace(remat="none", attention="xla"), contract,
                            config=json.loads(config.to_json_best_effort()), origin="stmem pretrain")
  start_step, restored = train_loop.restore(checkpointer, log, meta=meta, total_steps=config.total_steps,
                                            params=step_lib.abstract_params,
                                            opt_state=step_lib.abstract_opt, param_shardings=param_shardings,
                                            opt_shardings=opt_shardings)
  data_state = None
  if restored is not None:
    params, opt_state, data_state = restored["params"], restored["opt_state"], restored.get("data_state")
  data_iter = make_iter(data_state)

  # ------------------------------------------------------------------------------------------------ update step
  # Made by a jit with a replicated output: device_put of a key array onto a mesh that spans other processes' devices
  # is refused (it is not a host value), while a jitted constant lands on every process's devices.
  base_key = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=replicated)()
  ok = jax.device_put(jnp.asarray(True), replicated)

  def update(params, opt_state, batch, step, ok):
    global_batch = data_lib.to_global({k: batch[k] for k in ("signal", "lead_ids", "lead_mask")}, batch_sharding)
    return step_fn(params, opt_state, global_batch, jax.random.fold_in(base_key, step), ok)

  # ------------------------------------------------------------------------------------------------ train loop
  figure = {"batch": None}

  def keep_figure_batch(batch):  # process 0's first example, on every process: the figure's forward is collective
    figure["batch"] = _from_process_zero({k: np.asarray(batch[k][:1]) for k in ("signal", "lead_ids", "lead_mask")})

  def figure_due(step: int) -> bool:
    return bool(config.figure_every and step % config.figure_every == 0)

  def at_sync(step, params) -> dict[str, float]:
    """The loop's hook: the evaluators due at this step (their figures, under eval/NAME/, go into its metrics line)
    and the reconstruction figure."""
    if figure_due(step):
      _reconstruction_figure(graphdef, params, figure["batch"], cfg, contract,
                             workdir / f"reconstruction_{step:06d}.png", write=is_main)
    due = evaluators_lib.due(evals, step, config.total_steps)
    if not due:
      return {}
    model = evaluators_lib.Model(graphdef, params, cfg)
    return evaluators_lib.run(due, model, log=lambda line: log(f"step {step}: {line}"))

  loop = train_loop.Loop(
    workdir, checkpointer, log=log, total_steps=config.total_steps, log_every=config.log_every, meta=meta,
    schedule=schedule, batch_size=config.batch_size,
    # MFU from the analytic FLOP count (XLA's cost analysis counts the scanned blocks once, and costs a compile).
    flops_per_step=metrics_lib.pretrain_step_flops(cfg, config.batch_size, step_lib.leads),
    peak_flops=metrics_lib.device_peak_flops(cfg.dtype, mesh.devices.flat),
    extra_due=lambda step: figure_due(step) or bool(evaluators_lib.due(evals, step, config.total_steps)),
    on_sync=at_sync,
    first_batch=keep_figure_batch, transfer_guard=config.get("transfer_guard", "allow"), stop_after=stop_after,
    log_batches=bool(config.get("log_batches")))
  result = loop.run(update, params, opt_state, data_iter, start_step, ok)

  # ------------------------------------------------------------------------------------------------ report
  summary = {"workdir": str(workdir), "start_step": start_step, "step": result.step}
  if "loss" in result.metrics:
    summary["loss"] = result.metrics["loss"]
  if result.preempted or result.stopped:
    return {**summary, **({"preempted": True, "signal": result.signal} if result.preempted else {"stopped": True})}
  if figure["batch"] is not None:
    path = _reconstruction_figure(graphdef, result.params, figure["batch"], cfg, contract,
                                  workdir / "reconstruction.png", write=is_main)
    if is_main:
      summary["figure"] = str(path)
  summary.update(checkpoint=str(checkpointer.directory / str(result.step)),
                 metrics=str(workdir / metrics_lib.METRICS_FILE))
  return summary


def _from_process_zero(tree):
  """Process 0's copy of a small numpy tree, on every process (host inputs to a multi-process jit must agree)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x, y: np.asarray(y).astype(x.dtype), tree, multihost_utils.broadcast_one_to_all(tree))


def _derive_accum(config, devices, log) -> int:
  """accum_steps = 0: the smallest count that the planner finds fits the device memory (stmem.memory_plan.fit)."""
  chosen, tried = plan_lib.fit(config, devices, budget_gb=config.get("memory_budget_gb", 0.0))
  log(f"accum_steps 0: {chosen.accum_steps} fits ({chosen.total_bytes / plan_lib.GiB:.2f} GiB of "
      f"{chosen.budget_bytes / plan_lib.GiB:.2f} GiB per device; {len(tried)} compiles)")
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
  with workdir_lib.local_dir(path.parent) as folder:  # matplotlib writes local files; a bucket gets it uploaded
    plots.plot_reconstruction(patches, pred, np.asarray(mask[0]), folder / path.name, lead_names=names,
                              fs=contract.fs,
                              title=f"ST-MEM reconstruction ({int(np.asarray(mask[0]).sum())} masked patches)")
  return str(path)


def check(config) -> None:
  """The command line's usage errors, before any JAX work: counts that would run nothing."""
  from stmem import configflags
  configflags.require_positive(config, "stmem pretrain", "total_steps", "batch_size", "checkpoint.every",
                               "warmup_steps", "log_every", zero_ok=("warmup_steps", "log_every"))


def main(argv: list[str]) -> int:
  return entry.main(argv, run, program="pretrain", check=check)
