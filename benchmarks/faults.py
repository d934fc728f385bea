"""Crash anywhere, resume exactly: `stmem pretrain`, `finetune` and `prepare` killed with SIGKILL at random instants.

  python -m benchmarks.faults --trials 30 [--programs pretrain,finetune,prepare] [--seed 0] [--steps 12 --every 3]

For each program, one uninterrupted run gives the reference (final parameters, or the prepared records) and the
calibration (how long a checkpoint's temporary folder lives, how long a dataset's staging folder lives). Each trial
then runs the same command in a fresh workdir, kills it with SIGKILL, re-runs it, and so on until a run exits 0;
only exit 0 counts as complete (any other code, e.g. a "preempted" one, means run again). Each re-run is itself
killed again with probability 1/2, at most `--max_kills` times in a trial; then the command runs undisturbed.

How kill instants are chosen (one phase drawn per kill, uniformly, then an instant inside it):
- `step`: after k steps of this run appear in metrics.jsonl (k uniform over the steps left), plus a delay uniform
  in [0, one step's time].
- `write`: when the n-th temporary checkpoint folder (`<step>.orbax-checkpoint-tmp-*`) of this run appears (n uniform
  over the saves left), plus a delay uniform in [0, 0.9 x the calibration's lifetime of such a folder]: the kill
  lands while orbax writes the step in the background.
- `finalise`: when that temporary folder is renamed to its step (orbax's commit), plus a delay uniform in
  [0, 20 ms]: the kill lands in the commit's last writes (`_CHECKPOINT_METADATA`, the deletion of an old step).
- `restore`: on a re-run over a checkpoint, as soon as the process has a file of the checkpoint folder open
  (polled in /proc/PID/fd every few ms), plus a delay uniform in [0, 50 ms]: the kill lands inside the first
  restore. (The first kill of a trial that drew `restore` is a `step` kill after the first checkpoint.)
- `prepare`: `write` is a delay uniform in [0, 0.9 x the calibration's staging lifetime] after the staging folder
  (`.NAME.building-*`) appears; `swap` kills as soon as the staging folder disappears or the old dataset is moved
  aside (`*.replaced-*`), the instants of `builder_base.swap_into_place`, or within 10 ms of the build being
  complete inside the staging folder (its `dataset_info.json` there), just before the swap. After every kill the
  dataset already at the output (an uninterrupted prepare's, made before the trial) is opened with
  `stmem.data.open_prepared` and every example of every split read and compared with the reference.
The phase a kill really hit is recorded from what was seen at that instant (a temporary folder present, the
"resuming from step" line printed or not) and counted in `kills_by_phase`.

Measured: `completed` (a run exited 0), `equal` (final parameters within `--atol`, 1e-6, of the uninterrupted run's:
`params` of the last checkpoint; for prepare every record equal), `max_steps_recomputed` (steps executed over all the
runs of a trial minus total_steps: each run's steps are its last step logged in metrics.jsonl minus the step it
resumed from, so a step done after the last log line of a killed run is not counted; fine-tuning logs at every
evaluation, `--every` steps), `left_behind` (staging folders, temporary files, `*.orbax-checkpoint-tmp-*` folders,
`*.unreadable` steps, locks or holds in the workdir after the final completed run).

Runs are forked from one process that has imported stmem once (`benchmarks.fork_server`): each run is its own
process, killed by SIGKILL like any other, without paying the import of JAX, orbax and tfds again (tens of seconds
on a loaded 2-core machine); the persistent JAX compilation cache (JAX_COMPILATION_CACHE_DIR, as the tests set it)
spares the compiles. Prints one JSON table.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import pathlib
import random
import re
import shutil
import signal
import sys
import tempfile
import time

from benchmarks.fork_server import ForkServer

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("step", "write", "finalise", "restore")
PREPARE_PHASES = ("write", "swap")
TMP_CHECKPOINT = ".orbax-checkpoint-tmp"
# What a run must not leave in its workdir once a run has completed.
LEFTOVER = re.compile(r"(\.orbax-checkpoint-tmp|\.stmem-staging-|\.building-|\.replaced-|\.unreadable$|\.tmp$|"
                      r"^tmp|\.lock$|^\.?hold|\.hold$|\.partial$)")
RUN_TIMEOUT_S = 900.0




def _running(pid: int) -> bool:
  """True until the process has exited (a zombie waiting for the fork server counts as exited)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return False


def _open_under(pid: int, folders: list[pathlib.Path]) -> bool:
  """Whether the process has a file under one of `folders` open."""
  prefixes = tuple(str(f) + os.sep for f in folders)
  try:
    fds = os.listdir(f"/proc/{pid}/fd")
  except OSError:
    return False
  for fd in fds:
    try:
      if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefixes):
        return True
    except OSError:
      continue
  return False


def _tmp_dirs(folders: list[pathlib.Path]) -> set[str]:
  found = set()
  for folder in folders:
    with contextlib.suppress(OSError):
      found |= {str(folder / n) for n in os.listdir(folder) if TMP_CHECKPOINT in n}
  return found


# ------------------------------------------------------------------------------------------------ kill triggers


class Trigger:
  """Decides, polled every few ms while a run goes on, when to kill it; `hit` names the phase it landed in."""
  phase = "none"

  def __init__(self, rng: random.Random):
    self.rng, self.fire_at, self.hit = rng, None, None

  def due(self, pid: int, now: float) -> bool:
    if self.fire_at is None:
      delay = self.armed(pid, now)
      if delay is None:
        return False
      self.fire_at = now + delay
    return now >= self.fire_at

  def armed(self, pid: int, now: float) -> float | None:  # a delay once the phase has begun, else None
    raise NotImplementedError


class StepTrigger(Trigger):
  phase = "step"

  def __init__(self, rng, metrics: pathlib.Path, after_lines: int, step_s: float):
    super().__init__(rng)
    self.metrics, self.after, self.step_s = metrics, after_lines, step_s
    self.base = _lines(metrics)

  def armed(self, pid, now):
    return self.rng.uniform(0, self.step_s) if _lines(self.metrics) - self.base >= self.after else None


class WriteTrigger(Trigger):
  """Kills `delay` after the n-th temporary checkpoint folder of the run appears (`finalise`: after it is renamed)."""

  def __init__(self, rng, folders: list[pathlib.Path], nth: int, lifetime_s: float, finalise: bool):
    super().__init__(rng)
    self.folders, self.nth, self.lifetime, self.finalise = folders, nth, lifetime_s, finalise
    self.phase = "finalise" if finalise else "write"
    self.seen: set[str] = _tmp_dirs(folders)
    self.count, self.watching = 0, None

  def armed(self, pid, now):
    present = _tmp_dirs(self.folders)
    if self.watching is not None:
      if self.watching not in present:  # renamed to its step: orbax's commit
        return self.rng.uniform(0, 0.02)
      return None
    for path in sorted(present - self.seen):
      self.seen.add(path)
      self.count += 1
      if self.count >= self.nth:
        if not self.finalise:
          return self.rng.uniform(0, 0.9 * self.lifetime)
        self.watching = path
    return None


class RestoreTrigger(Trigger):
  phase = "restore"

  def __init__(self, rng, folders: list[pathlib.Path]):
    super().__init__(rng)
    self.folders = folders

  def armed(self, pid, now):
    return self.rng.uniform(0, 0.05) if _open_under(pid, self.folders) else None


class FolderTrigger(Trigger):
  """prepare: `write` kills a delay after the staging folder appears; `swap` as soon as the swap begins."""

  def __init__(self, rng, data_dir: pathlib.Path, name: str, lifetime_s: float, swap: bool):
    super().__init__(rng)
    self.data_dir, self.name, self.lifetime, self.swap = data_dir, name, lifetime_s, swap
    self.phase = "swap" if swap else "write"
    self.staging = None

  def armed(self, pid, now):
    staging = [n for n in _listdir(self.data_dir) if n.startswith(f".{self.name}.building-")]
    if not self.swap:
      return self.rng.uniform(0, 0.9 * self.lifetime) if staging else None
    replaced = any(".replaced-" in n for n in _listdir(self.data_dir / self.name))
    if self.staging is None and staging:
      self.staging = staging[0]
    if replaced or (self.staging is not None and self.staging not in staging):
      return 0.0
    if self.staging is not None:  # the build is complete in the staging folder: the swap comes next
      built = self.data_dir / self.staging / self.name
      if any((built / v / "dataset_info.json").exists() for v in _listdir(built) if "incomplete" not in v):
        return self.rng.uniform(0, 0.01)
    return None


def _listdir(path: pathlib.Path) -> list[str]:
  try:
    return os.listdir(path)
  except OSError:
    return []


def _lines(path: pathlib.Path) -> int:
  try:
    with open(path, "rb") as f:
      return sum(1 for line in f if line.endswith(b"\n"))
  except FileNotFoundError:
    return 0


# ------------------------------------------------------------------------------------------------ one run


def run_once(forks: ForkServer, argv: list[str], log: pathlib.Path, trigger: Trigger | None = None,
             watch: list[pathlib.Path] | None = None, timeout_s: float = RUN_TIMEOUT_S) -> dict:
  """Run `stmem ARGV` once, killing it with SIGKILL when `trigger` says so. Returns {rc, killed, phase, seconds,
  tmp_lifetimes} (`tmp_lifetimes`: how long each temporary checkpoint folder under `watch` lived)."""
  pid = forks.start(argv, log)
  began = time.monotonic()
  killed, phase = False, None
  born: dict[str, float] = {}
  lifetimes: list[float] = []
  try:
    while _running(pid):
      now = time.monotonic()
      if watch:
        present = _tmp_dirs(watch)
        for p in present - born.keys():
          born[p] = now
        for p in list(born):
          if p not in present:
            lifetimes.append(now - born.pop(p))
      if trigger is not None and not killed and trigger.due(pid, now):
        phase = _observed_phase(trigger, log, watch)
        os.kill(pid, signal.SIGKILL)
        killed = True
      if now - began > timeout_s:
        os.kill(pid, signal.SIGKILL)
        raise TimeoutError(f"stmem {' '.join(argv[:1])} ran over {timeout_s:.0f} s; see {log}")
      time.sleep(0.003)
  finally:
    rc = forks.wait(pid)
  killed = killed and rc == -signal.SIGKILL  # a run that had just ended by itself was not killed
  return {"rc": rc, "killed": killed, "phase": phase, "seconds": time.monotonic() - began, "tmp_lifetimes": lifetimes}


def _observed_phase(trigger: Trigger, log: pathlib.Path, watch: list[pathlib.Path] | None) -> str:
  """The phase the kill lands in, as seen at that instant."""
  if trigger.phase in ("write", "swap", "finalise"):
    if trigger.phase == "write" and watch is not None and not _tmp_dirs(watch):
      return "step"  # the write had finished before the delay ran out
    return trigger.phase
  text = log.read_text(errors="replace") if log.exists() else ""
  if trigger.phase == "restore":
    return "step" if "resuming from step" in text else "restore"
  if watch and _tmp_dirs(watch):
    return "write"
  return "step"


# ------------------------------------------------------------------------------------------------ training programs


class Training:
  """What differs between pretraining and fine-tuning: the command, where its checkpoints go, what is compared."""

  def __init__(self, program: str, root: pathlib.Path, steps: int, every: int, forks: ForkServer,
               base: pathlib.Path | None = None):
    self.program, self.root, self.steps, self.every = program, root, steps, every
    self.base = base
    if program == "finetune" and base is None:  # a tiny pretrained checkpoint to start from, made once
      self.base = root / "base"
      if not (self.base / "checkpoints").is_dir():
        r = run_once(forks, self._pretrain_argv(self.base, 2, 2), root / "base.log")
        if r["rc"] != 0:
          raise RuntimeError(f"the base checkpoint could not be made; see {root / 'base.log'}")

  def _pretrain_argv(self, workdir, steps, every) -> list[str]:
    return ["pretrain", "--config", f"{ROOT / 'configs' / 'pretrain.py'}:tiny", "--workdir", workdir,
            f"--config.total_steps={steps}", "--config.warmup_steps=1", "--config.log_every=1",
            "--config.batch_size=8", "--config.data.num_synthetic=24", f"--config.checkpoint.every={every}",
            "--config.checkpoint.keep=2", "--config.checkpoint.async_save=true", "--config.evals=",
            "--config.mesh=data:-1,fsdp:1", "--config.num_devices=1"]

  def argv(self, workdir: pathlib.Path) -> list[str]:
    if self.program == "pretrain":
      return self._pretrain_argv(workdir, self.steps, self.every)
    return ["finetune", "--config", f"{ROOT / 'configs' / 'finetune.py'}:test", f"--config.init_from={self.base}",
            "--workdir", workdir, f"--config.total_steps={self.steps}", f"--config.eval_every={self.every}",
            "--config.warmup_steps=1", "--config.num_devices=1", "--config.bootstrap=10",
            "--config.checkpoint.keep=2", "--config.checkpoint.async_save=true"]

  def checkpoint_dirs(self, workdir: pathlib.Path) -> list[pathlib.Path]:
    return [workdir / "checkpoints"] + ([workdir / "train_state"] if self.program == "finetune" else [])

  def state_dir(self, workdir: pathlib.Path) -> pathlib.Path:
    return workdir / ("train_state" if self.program == "finetune" else "checkpoints")

  def params(self, workdir: pathlib.Path) -> dict:
    from stmem import checkpoint as ckpt_lib
    return _flat(ckpt_lib.read_item(self.state_dir(workdir) / str(self.steps), "params"))


def _flat(tree, prefix="") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  return {prefix: tree}


def max_abs_diff(a: dict, b: dict) -> float:
  import numpy as np
  if a.keys() != b.keys():
    return float("inf")
  return max((float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) if np.size(a[k])
              else 0.0) for k in a) if a else 0.0


def steps_done(metrics_before: int, metrics: pathlib.Path, log: pathlib.Path) -> int:
  """Steps one run executed: its last logged step minus the step it resumed from."""
  text = log.read_text(errors="replace") if log.exists() else ""
  m = re.search(r"resuming from step (\d+)", text)
  start = int(m.group(1)) if m else 0
  steps = []
  if metrics.exists():
    for line in metrics.read_text().splitlines()[metrics_before:]:
      with contextlib.suppress(ValueError, KeyError, TypeError):
        steps.append(int(json.loads(line)["step"]))
  return max(max(steps, default=start) - start, 0)


def left_behind(folder: pathlib.Path) -> list[str]:
  """Staging folders, temporary files and folders, unreadable steps, locks and holds anywhere under `folder`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames + filenames:
      if LEFTOVER.search(name):
        found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    dirnames[:] = [d for d in dirnames if not LEFTOVER.search(d)]
  return sorted(found)


def calibrate(forks: ForkServer, training: Training) -> dict:
  """The uninterrupted run: the reference parameters and the timeline the kill instants are drawn from."""
  workdir = training.root / "reference"
  shutil.rmtree(workdir, ignore_errors=True)
  log = training.root / "reference.log"
  r = run_once(forks, training.argv(workdir), log, watch=training.checkpoint_dirs(workdir))
  if r["rc"] != 0:
    raise RuntimeError(f"the uninterrupted {training.program} run failed (exit {r['rc']}); see {log}")
  per_step = [json.loads(line).get("steps_per_s") for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rates = sorted(x for x in per_step if x)
  step_s = training.every / rates[len(rates) // 2] if training.program == "finetune" and rates else \
    (1.0 / rates[len(rates) // 2] if rates else 1.0)
  lifetimes = sorted(r["tmp_lifetimes"]) or [0.2]
  return {"params": training.params(workdir), "step_s": step_s, "tmp_lifetime_s": lifetimes[len(lifetimes) // 2],
          "seconds": r["seconds"], "left_behind": left_behind(workdir)}


def _trigger(rng, phase, training: Training, workdir: pathlib.Path, cal: dict, restore_ok: bool) -> Trigger:
  dirs = training.checkpoint_dirs(workdir)
  # every `every` steps and at the end; fine-tuning then saves its selected model too
  saves = -(-training.steps // training.every) + (training.program == "finetune")
  metrics = workdir / "metrics.jsonl"
  logged = training.steps if training.program == "pretrain" else training.steps // training.every
  if phase == "restore" and restore_ok:
    return RestoreTrigger(rng, dirs)
  if phase == "restore":  # nothing to restore yet: a step kill after the first checkpoint, so the re-run restores
    first = 1 if training.program == "finetune" else training.every
    return StepTrigger(rng, metrics, rng.randint(first, max(first, logged - 1)), cal["step_s"])
  if phase == "step":
    return StepTrigger(rng, metrics, rng.randint(1, max(1, logged - 1)), cal["step_s"])
  return WriteTrigger(rng, dirs, rng.randint(1, saves), cal["tmp_lifetime_s"], finalise=phase == "finalise")


def training_trial(forks: ForkServer, training: Training, cal: dict, index: int, rng: random.Random,
                   max_kills: int, atol: float) -> dict:
  workdir = training.root / f"trial{index:03d}"
  shutil.rmtree(workdir, ignore_errors=True)
  metrics = workdir / "metrics.jsonl"
  kills, executed, rcs, attempt, completed = [], 0, [], 0, False
  phase = rng.choice(PHASES)
  while attempt < max_kills + 4:
    restore_ok = any(p.name.isdigit() for p in _iterdir(training.state_dir(workdir)))
    trigger = None
    if phase is not None:
      trigger = _trigger(rng, phase, training, workdir, cal, restore_ok)
    log = training.root / f"trial{index:03d}.{attempt}.log"
    before = _lines(metrics)
    r = run_once(forks, training.argv(workdir), log, trigger, watch=training.checkpoint_dirs(workdir))
    executed += steps_done(before, metrics, log)
    rcs.append(r["rc"])
    attempt += 1
    if r["killed"]:
      kills.append(r["phase"])
    elif r["rc"] == 0:
      completed = True
      break
    # the next run: killed again with probability 1/2 while kills are left (a pending restore kill always)
    if phase == "restore" and not restore_ok and r["killed"]:
      continue
    phase = rng.choice(PHASES) if len(kills) < max_kills and rng.random() < 0.5 else None
  result = {"trial": index, "completed": completed, "exit_codes": rcs, "kills": kills,
            "steps_recomputed": executed - training.steps, "equal": False, "max_abs_diff": None,
            "left_behind": left_behind(workdir)}
  if completed:
    try:
      diff = max_abs_diff(training.params(workdir), cal["params"])
    except Exception as e:  # noqa: BLE001 - a final checkpoint that does not read is a failed trial, reported
      diff, result["error"] = float("inf"), f"{type(e).__name__}: {e}"
    result.update(equal=diff <= atol, max_abs_diff=diff)
  return result


def _iterdir(path: pathlib.Path):
  try:
    return list(path.iterdir())
  except OSError:
    return []


# ------------------------------------------------------------------------------------------------ prepare


def write_generic_input(folder: pathlib.Path, records: int = 24, seed: int = 0) -> pathlib.Path:
  """A tiny folder of raw ECGs for `stmem prepare generic`: `records` 10 s 12-lead records at 500 Hz with labels."""
  import numpy as np
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  t = np.arange(5000) / 500.0
  ecgs = (np.sin(2 * np.pi * rng.uniform(0.8, 2.0, (records, 1, 1)) * t[None, :, None])
          * rng.uniform(0.5, 2, (records, 1, 12)) + 0.05 * rng.standard_normal((records, 5000, 12)))
  np.save(folder / "ecgs.npy", ecgs.astype(np.float32))
  with open(folder / "meta.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["record_id", "patient_id", "age", "sex", "af"])
    for i in range(records):
      w.writerow([f"r{i}", f"p{i // 2}", 40 + i, "M" if i % 2 else "F", i % 2])
  return folder


class Preparing:
  program = "prepare"

  def __init__(self, root: pathlib.Path, records: int):
    self.root = root
    self.manual = write_generic_input(root / "raw", records)

  def argv(self, data_dir: pathlib.Path) -> list[str]:
    return ["prepare", "generic", "--manual_dir", self.manual, "--data_dir", data_dir, "--quiet", "--overwrite",
            "--array", "ecgs.npy", "--metadata_csv", "meta.csv", "--source_fs", "500", "--leads", "12",
            "--layout", "NTL", "--splits", "train=0.6,validation=0.2,test=0.2"]


def read_prepared(data_dir: pathlib.Path) -> dict[str, list[dict]]:
  """Every example of every split of the prepared dataset at `data_dir`, read with `stmem.data.open_prepared`."""
  import tensorflow_datasets as tfds

  from data_pipelines import builder_base
  from stmem import data
  folder = builder_base.prepared_dir(data_dir)
  splits = sorted(tfds.builder_from_directory(os.fspath(folder)).info.splits)
  out = {}
  for split in splits:
    prepared = data.open_prepared(data_dir, split)
    out[split] = [prepared.source[i] for i in range(len(prepared.source))]
  return out


def same_records(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> bool:
  import numpy as np
  if a.keys() != b.keys():
    return False
  for split in a:
    if len(a[split]) != len(b[split]):
      return False
    for x, y in zip(a[split], b[split]):
      if x.keys() != y.keys() or not all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x):
        return False
  return True


def prepare_calibrate(forks: ForkServer, preparing: Preparing) -> dict:
  out = preparing.root / "reference"
  shutil.rmtree(out, ignore_errors=True)
  log = preparing.root / "reference.log"
  pid = forks.start(preparing.argv(out), log)
  began, staged, lifetime = time.monotonic(), None, None
  while _running(pid):
    now = time.monotonic()
    building = any(n.startswith(".generic.building-") for n in _listdir(out))
    if building and staged is None:
      staged = now
    if staged is not None and not building and lifetime is None:
      lifetime = now - staged
    time.sleep(0.003)
  rc = forks.wait(pid)
  if rc != 0:
    raise RuntimeError(f"the uninterrupted prepare failed (exit {rc}); see {log}")
  return {"records": read_prepared(out), "staging_lifetime_s": lifetime or (time.monotonic() - began) / 2,
          "seconds": time.monotonic() - began, "reference": out}


def prepare_trial(forks: ForkServer, preparing: Preparing, cal: dict, index: int, rng: random.Random,
                  max_kills: int) -> dict:
  data_dir = preparing.root / f"trial{index:03d}"
  shutil.rmtree(data_dir, ignore_errors=True)
  shutil.copytree(cal["reference"], data_dir)  # the previous dataset at the output
  kills, rcs, readable, attempt, completed, errors = [], [], [], 0, False, []
  phase = rng.choice(PREPARE_PHASES)
  while attempt < max_kills + 4:
    trigger = FolderTrigger(rng, data_dir, "generic", cal["staging_lifetime_s"], swap=phase == "swap") \
      if phase is not None else None
    log = preparing.root / f"trial{index:03d}.{attempt}.log"
    r = run_once(forks, preparing.argv(data_dir), log, trigger)
    rcs.append(r["rc"])
    attempt += 1
    if r["killed"]:
      kills.append(r["phase"])
      try:  # the dataset at the output stays readable after every kill
        readable.append(same_records(read_prepared(data_dir), cal["records"]))
      except Exception as e:  # noqa: BLE001 - an unreadable dataset is what this measures
        readable.append(False)
        errors.append(f"after a {r['phase']} kill: {type(e).__name__}: {e}")
    elif r["rc"] == 0:
      completed = True
      break
    phase = rng.choice(PREPARE_PHASES) if len(kills) < max_kills and rng.random() < 0.5 else None
  result = {"trial": index, "completed": completed, "exit_codes": rcs, "kills": kills,
            "previous_readable": all(readable), "equal": False, "left_behind": left_behind(data_dir)}
  if errors:
    result["errors"] = errors
  if completed:
    try:
      result["equal"] = same_records(read_prepared(data_dir), cal["records"])
    except Exception as e:  # noqa: BLE001
      result["error"] = f"{type(e).__name__}: {e}"
  return result


# ------------------------------------------------------------------------------------------------ the table


def summarise(program: str, trials: list[dict], extra: dict | None = None) -> dict:
  by_phase: dict[str, int] = {}
  for t in trials:
    for p in t["kills"]:
      by_phase[p] = by_phase.get(p, 0) + 1
  row = {"program": program, "trials": len(trials), "completed": sum(t["completed"] for t in trials),
         "equal": sum(t["equal"] for t in trials), "kills": sum(len(t["kills"]) for t in trials),
         "kills_by_phase": dict(sorted(by_phase.items()))}
  if program == "prepare":
    row["previous_readable"] = sum(t["previous_readable"] for t in trials)
  else:
    row["max_steps_recomputed"] = max((t["steps_recomputed"] for t in trials if t["completed"]), default=None)
    row["max_abs_diff"] = max((t["max_abs_diff"] for t in trials if t["max_abs_diff"] is not None), default=None)
  row["left_behind"] = sorted({f for t in trials for f in t["left_behind"]})
  failed = [t for t in trials if not (t["completed"] and t["equal"] and not t["left_behind"]
                                      and t.get("previous_readable", True))]
  row["failed_trials"] = failed
  row.update(extra or {})
  return row


def run_program(program: str, trials: int, root: pathlib.Path, forks: ForkServer, *, seed: int = 0, steps: int = 12,
                every: int = 3, max_kills: int = 2, atol: float = 1e-6, records: int = 24,
                base: pathlib.Path | None = None, progress=None) -> dict:
  """`trials` trials of one program under `root`; returns its row of the table. `base`: the pretrained checkpoint
  fine-tuning starts from (default: a 2-step pretraining made under `root`)."""
  root.mkdir(parents=True, exist_ok=True)
  rng = random.Random(f"{seed}:{program}")
  began = time.monotonic()
  results = []
  if program == "prepare":
    preparing = Preparing(root, records)
    cal = prepare_calibrate(forks, preparing)
    for i in range(trials):
      results.append(prepare_trial(forks, preparing, cal, i, rng, max_kills))
      if progress:
        progress(program, results)
    extra = {"uninterrupted_s": round(cal["seconds"], 1), "staging_lifetime_s": round(cal["staging_lifetime_s"], 3)}
  else:
    training = Training(program, root, steps, every, forks, base=base)
    cal = calibrate(forks, training)
    for i in range(trials):
      results.append(training_trial(forks, training, cal, i, rng, max_kills, atol))
      if progress:
        progress(program, results)
    extra = {"total_steps": steps, "checkpoint_every": every, "uninterrupted_s": round(cal["seconds"], 1),
             "tmp_checkpoint_lifetime_s": round(cal["tmp_lifetime_s"], 3),
             "reference_left_behind": cal["left_behind"]}
  return summarise(program, results, {**extra, "wall_s": round(time.monotonic() - began, 1)})


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n")[0])
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--programs", default="pretrain,finetune,prepare")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=12, help="total_steps of each training run")
  p.add_argument("--every", type=int, default=3, help="checkpoint (pretrain) / evaluation (finetune) interval")
  p.add_argument("--max_kills", type=int, default=3, help="kills per trial at most")
  p.add_argument("--atol", type=float, default=1e-6)
  p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder, removed)")
  p.add_argument("--keep", action="store_true", help="keep the runs' folders")
  p.add_argument("--partial", default=None, help="a file to write the table so far to after every trial")
  args = p.parse_args(argv)
  programs = [x for x in args.programs.split(",") if x]
  unknown = [x for x in programs if x not in ("pretrain", "finetune", "prepare")]
  if unknown:
    p.error(f"unknown program(s) {unknown}")
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="stmem-faults-"))
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on the items read_item leaves unread
  load = os.getloadavg()

  def progress(program, results):
    t = results[-1]
    print(f"{program} trial {t['trial']}: completed={t['completed']} equal={t['equal']} kills={t['kills']} "
          f"exit codes {t['exit_codes']} left behind {t['left_behind']}", file=sys.stderr, flush=True)
    if args.partial:  # the table so far, rewritten after every trial (a long run stopped early still reports)
      pathlib.Path(args.partial).write_text(json.dumps({"rows": rows + [summarise(program, results)]}, indent=2))

  rows = []
  try:
    with ForkServer() as forks:
      for program in programs:
        base = root / "pretrain" / "reference" if "pretrain" in programs[:programs.index(program)] else None
        rows.append(run_program(program, args.trials, root / program, forks, seed=args.seed, steps=args.steps,
                                every=args.every, max_kills=args.max_kills, atol=args.atol, base=base,
                                progress=progress))
  finally:
    if not args.keep and args.workdir is None:
      shutil.rmtree(root, ignore_errors=True)
  print(json.dumps({"load_average_start": [round(x, 2) for x in load],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()], "rows": rows}, indent=2))
  return 0 if all(r["completed"] == r["equal"] == r["trials"] and not r["left_behind"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
