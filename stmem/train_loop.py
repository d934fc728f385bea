"""The training loop of `stmem pretrain` and `stmem finetune`: steps, metrics, checkpoints, preemption, NaN guard.

A program builds its mesh, data, model, optimiser and update step, then:

    checkpointer = checkpoint.Checkpointer(...)
    start_step, restored = train_loop.restore(checkpointer, log, params=..., opt_state=..., ...)
    loop = train_loop.Loop(workdir, checkpointer, log=log, total_steps=..., log_every=..., meta=..., ...)
    result = loop.run(update, params, opt_state, batches, start_step, ok)

What every training program gets from it, alike:

- Restore: the newest checkpoint that reads back (`Checkpointer.restore_latest_readable`: a corrupt latest step is
  moved aside, said, and the one before it used), with its data-iterator state, so a rerun of the same command
  resumes with exactly the next batch. A checkpoint that reads back but holds another model (the config changed)
  is a usage error naming the differing keys (`restore(..., meta=...)`), and nothing is moved.
- One writer per workdir: a program's `run` is wrapped by `stmem.workdir_hold.held(PROGRAM)`, which holds the
  workdir while it runs (a second run refuses, naming the holder) and keeps it to one program.
- Steps: `update(params, opt_state, batch, step, ok) -> (params, opt_state, metrics, ok)` runs the program's jitted
  step on the host batch `batch` (`step`: the number of steps done before it). `ok` is the devices' "every loss so
  far was finite" flag; `metrics` a dict of device scalars.
- No host sync between sync steps. A sync step is a log step (`log_every`), a checkpoint step (the checkpointer's
  `every`), a step `extra_due(step)` names, a step `stop_check_every` names, the last step (and `stop_after`). Every
  other step only dispatches: no device-to-host transfer, no collective across processes, so the host runs ahead of
  the devices; those steps run under `jax.transfer_guard_device_to_host(transfer_guard)` ("disallow" makes any
  read there an error: the tests run so).
- The NaN guard: the flag is read at log, hook and save steps; a non-finite loss raises `NonFiniteLoss` naming the
  last good checkpoint, and a diverged state is never saved over a good one.
- SIGTERM (a preempted VM, a scheduler's notice) is agreed between processes at sync steps (`preemption`): every
  process saves the same step and the run returns `preempted`; the same command resumes it.
- Checkpoints every `checkpointer.every` steps and at the end; `save_items(params) -> (meta, items)` adds a
  program's own meta fields and array items (fine-tuning's best-so-far model) to each.
- Metrics: at log steps the step's metrics as floats, `lr` (from `schedule`), `steps_per_s`, `samples_per_s` and
  `mfu` (when `flops_per_step` and `peak_flops` are known) go to `metrics.jsonl` and TensorBoard (process 0), and a
  progress line to the log (at most one every 2 s, unless a hook ran or it is the last step).

The hook, for work that needs the current parameters while training (evaluators, figures, validation):

    extra_due(step) -> bool                      further sync steps, besides log and checkpoint steps
    on_sync(step, params) -> dict[str, float]    run at those steps and at the last step, on every process (the
                                                 parameters may be sharded over all of them); what it returns is
                                                 written with that step's metrics

It runs after the NaN guard and before that step's checkpoint, so a checkpoint carries what the hook decided (e.g.
the best-so-far model). `first_batch(batch)` sees the run's first host batch, outside the transfer guard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax

from stmem import metrics as metrics_lib
from stmem import preemption
from stmem.preemption import NonFiniteLoss

PROGRESS_KEYS = ("loss", "train_loss", "val_loss", "val_auroc", "lr", "grad_norm", "steps_per_s", "samples_per_s",
                 "mfu")
PROGRESS_SECONDS = 2.0  # at most one plain progress line this often


def restore(checkpointer, log: Callable[[str], None], **kwargs) -> tuple[int, dict[str, Any] | None]:
  """(step, items) of the newest readable checkpoint (`Checkpointer.restore` arguments), or (0, None); says which."""
  step, restored = checkpointer.restore_latest_readable(log=log, **kwargs)
  if restored is not None:
    log(f"resuming from step {step} ({checkpointer.directory / str(step)})")
  return step, restored


@dataclasses.dataclass
class Result:
  step: int                      # steps done when the loop returned
  params: Any
  opt_state: Any
  metrics: dict[str, float]      # the last metrics written (empty when none was)
  preempted: bool = False        # stopped by a SIGTERM, after saving this step
  stopped: bool = False          # stopped by `stop_after`, without a final save


class Loop:
  """One training run's loop; see the module docstring. `stop_after` ends the loop early without a final save
  (tests use it to stand in for a crash); `log_batches` writes which records each step saw to
  `batches.<process>.jsonl` (to check that a resumed run sees exactly the batches of an uninterrupted one)."""

  def __init__(self, workdir: str | pathlib.Path, checkpointer, *, log: Callable[[str], None], total_steps: int,
               log_every: int, meta: dict, schedule: Callable | None = None, batch_size: int | None = None,
               flops_per_step: float | None = None, peak_flops: float | None = None,
               extra_due: Callable[[int], bool] | None = None,
               on_sync: Callable[[int, Any], dict[str, float]] | None = None,
               save_items: Callable[[Any], tuple[dict, dict | None]] | None = None,
               first_batch: Callable[[dict], None] | None = None, stop_check_every: int = 0,
               transfer_guard: str = "allow", stop_after: int | None = None, log_batches: bool = False):
    self.workdir, self.checkpointer, self.log = pathlib.Path(workdir), checkpointer, log
    self.total_steps, self.log_every, self.meta = int(total_steps), int(log_every), meta
    self.schedule, self.batch_size = schedule, batch_size
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self.extra_due, self.on_sync, self.save_items = extra_due, on_sync, save_items
    self.first_batch, self.stop_check_every = first_batch, int(stop_check_every or 0)
    self.transfer_guard, self.stop_after, self.log_batches = transfer_guard, stop_after, log_batches

  # -- which steps read from the devices ------------------------------------------------------------------------------
  def log_due(self, step: int) -> bool:
    return bool(self.log_every and step % self.log_every == 0) or step == self.total_steps

  def hook_due(self, step: int) -> bool:
    return self.on_sync is not None and (step == self.total_steps
                                         or (self.extra_due is not None and bool(self.extra_due(step))))

  def save_due(self, step: int) -> bool:
    return step % self.checkpointer.every == 0

  def sync_due(self, step: int) -> bool:
    """Steps at which the loop reads from the devices: logs, hooks, checkpoints, stop checks, the end."""
    return (self.log_due(step) or self.hook_due(step) or self.save_due(step)
            or bool(self.stop_check_every and step % self.stop_check_every == 0)
            or (self.stop_after is not None and step >= self.stop_after))

  # -- the loop -------------------------------------------------------------------------------------------------------
  def run(self, update: Callable, params, opt_state, batches, start_step: int, ok) -> Result:
    checkpointer, total = self.checkpointer, self.total_steps
    writer = metrics_lib.MetricWriter(self.workdir)
    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True)) \
      if preemption.main_thread() else None
    batch_log = (self.workdir / f"batches.{jax.process_index()}.jsonl").open("a") if self.log_batches else None
    step, last_good, last_log = start_step, start_step, (time.perf_counter(), start_step)
    last_line, written, first = 0.0, {}, True

    def check_finite(step: int):
      if not bool(ok):  # a device sync: done at sync steps only, never every step
        raise NonFiniteLoss(f"the loss became non-finite between step {last_good} and step {step}; "
                            f"the last good checkpoint is step {last_good} in {checkpointer.directory}")

    def save(step: int, force: bool = False):
      nonlocal last_good
      if step == last_good or not (force or self.save_due(step)):  # already saved, or not due
        return
      check_finite(step)  # never overwrite good checkpoints with a diverged state
      meta, items = self.save_items(params) if self.save_items is not None else ({}, None)
      if checkpointer.save(step, params=params, opt_state=opt_state, data_state=batches.get_state(),
                           meta={**self.meta, **meta, "step": step}, force=force, extra_items=items):
        last_good = step

    try:
      while step < total:
        batch = next(batches)
        if first and self.first_batch is not None:
          self.first_batch(batch)
        first = False
        # Every other step only dispatches; under transfer_guard="disallow" a read from the devices there is an error.
        with contextlib.nullcontext() if self.sync_due(step + 1) else \
            jax.transfer_guard_device_to_host(self.transfer_guard):
          if batch_log is not None:
            batch_log.write(json.dumps({"step": step, "record_id": [_str(r) for r in batch["record_id"]]}) + "\n")
          params, opt_state, step_metrics, ok = update(params, opt_state, batch, step, ok)
          step += 1
          if not self.sync_due(step):
            continue
        logged, hooked = self.log_due(step), self.hook_due(step)
        m: dict[str, float] = {}
        if logged or hooked:
          check_finite(step)
        if logged:
          now = time.perf_counter()
          steps_per_s = (step - last_log[1]) / max(now - last_log[0], 1e-9)
          last_log = (now, step)
          m = {k: float(v) for k, v in step_metrics.items()}
          if self.schedule is not None:
            m["lr"] = float(self.schedule(step - 1))
          m["steps_per_s"] = steps_per_s
          if self.batch_size:
            m["samples_per_s"] = steps_per_s * self.batch_size
          if self.flops_per_step and self.peak_flops:
            m["mfu"] = metrics_lib.mfu(self.flops_per_step, 1.0 / steps_per_s, self.peak_flops)
        if hooked:
          began = time.perf_counter()
          m.update(self.on_sync(step, params) or {})
          # The hook's time (evaluators, figures) is not training: kept out of the next interval's steps_per_s.
          last_log = (last_log[0] + time.perf_counter() - began, last_log[1])
        if m:
          writer.write(step, m)
          written = m
          if hooked or step == total or time.time() - last_line >= PROGRESS_SECONDS:
            last_line = time.time()
            shown = " ".join(f"{k}={m[k]:.4g}" for k in PROGRESS_KEYS if k in m)
            self.log(f"step {step}/{total} {shown}")
        save(step)  # returns at once unless a checkpoint is due
        if preemption.stop_requested(preempted["flag"]):  # at sync steps only: a collective across processes
          save(step, force=True)
          checkpointer.wait()
          self.log(f"preempted at step {step}: checkpoint saved in {checkpointer.directory}; run the same command "
                   f"to resume")
          return Result(step, params, opt_state, written, preempted=True)
        if self.stop_after is not None and step >= self.stop_after:
          checkpointer.wait()
          return Result(step, params, opt_state, written, stopped=True)
      save(step, force=True)
      checkpointer.wait()
      return Result(step, params, opt_state, written)
    finally:
      writer.close()
      if batch_log is not None:
        batch_log.close()
      checkpointer.close()
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)


def _str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)
