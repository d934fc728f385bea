"""One writer per workdir (`stmem.workdir_hold`): a live holder refuses a second run, a killed run's hold is taken
over, two runs started at the same instant never both win, a workdir belongs to one program, and a checkpoint of
another model is a usage error that moves nothing.

The multi-process run's shared hold is checked in tests/test_multihost.py (it already runs one)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_pipelines.errors import UsageError
from stmem import workdir_hold

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
  """The process id of a process that was killed (SIGKILL) and reaped: it no longer runs."""
  p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  p.send_signal(signal.SIGKILL)
  p.wait(timeout=30)
  return p.pid


def _write_hold(workdir: pathlib.Path, **fields) -> workdir_hold.Holder:
  holder = workdir_hold.Holder.mine("pretrain")
  for k, v in fields.items():
    setattr(holder, k, v)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / workdir_hold.HOLD_FILE).write_bytes(holder.encode())
  return holder


def _config():
  from configs import pretrain as pretrain_config
  c = pretrain_config.get_config("tiny")
  c.evals = type(c.evals)()  # no evaluators
  return c


# ------------------------------------------------------------------------------------------------------ the hold


def test_a_live_holder_refuses_a_second_run_naming_itself(tmp_path):
  workdir = tmp_path / "run"
  hold = workdir_hold.take(workdir, "pretrain", log=print)
  try:
    env = {k: v for k, v in os.environ.items() if k != "STMEM_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "stmem.cli", "pretrain", "--config", "pretrain:tiny",
                        "--config.evals=", "--workdir", str(workdir)], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("stmem pretrain: error: workdir") and "is held by `stmem pretrain`" in message
    since = time.strftime("%Y-%m-%d", time.gmtime(hold.holder.since))
    for needle in (f"host {socket.gethostname()}", f"process {os.getpid()}", f"since {since}", "UTC"):
      assert needle in message, (needle, message)
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
    assert json.loads((workdir / workdir_hold.HOLD_FILE).read_text())["pid"] == os.getpid()  # still ours
  finally:
    hold.release()
  assert not (workdir / workdir_hold.HOLD_FILE).exists()


def test_a_killed_runs_hold_is_taken_over_and_said(tmp_path):
  dead = _dead_pid()
  _write_hold(tmp_path, pid=dead, started=None)
  lines = []
  hold = workdir_hold.take(tmp_path, "pretrain", log=lines.append)
  try:
    assert len(lines) == 1 and "taking over the stale hold" in lines[0], lines
    assert f"process {dead}" in lines[0] and "no longer runs" in lines[0]
    assert json.loads((tmp_path / workdir_hold.HOLD_FILE).read_text())["pid"] == os.getpid()
  finally:
    hold.release()


def test_a_hold_from_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path):
  now = time.time()
  _write_hold(tmp_path, host="elsewhere", pid=1, heartbeat=now - 60)
  with pytest.raises(UsageError, match="held by `stmem pretrain` \\(host elsewhere, process 1, since "):
    workdir_hold.take(tmp_path, "pretrain", log=print)
  _write_hold(tmp_path, host="elsewhere", pid=1, heartbeat=now - workdir_hold.STALE_AFTER_S - 60)
  lines = []
  workdir_hold.take(tmp_path, "pretrain", log=lines.append).release()
  assert len(lines) == 1 and "heartbeat is 11 minutes old" in lines[0], lines


def test_the_holder_rewrites_its_heartbeat(tmp_path):
  hold = workdir_hold.take(tmp_path, "pretrain", log=print, heartbeat_s=0.05)
  try:
    first = hold.holder.since
    deadline = time.monotonic() + 10
    while json.loads((tmp_path / workdir_hold.HOLD_FILE).read_text())["heartbeat"] <= first:
      assert time.monotonic() < deadline, "no heartbeat within 10 s"
      time.sleep(0.05)
  finally:
    hold.release()
  assert not (tmp_path / workdir_hold.HOLD_FILE).exists()


RACER = """
import json, os, pathlib, sys, time
sys.path.insert(0, sys.argv[1])
from data_pipelines.errors import UsageError
from stmem import workdir_hold
base, start, rounds = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
stale = json.loads(sys.argv[5])
for i in range(rounds):
  while time.time() < start + 0.1 * i:
    pass  # both processes leave this loop at the same instant
  try:
    workdir_hold.take(f"{base}/{i}", "pretrain", log=lambda line: None)  # kept: the other must find it
    print("won", flush=True)
  except UsageError as e:
    print("refused" if f"process {stale}" not in str(e) else "refused by the stale hold", flush=True)
# Stay alive until the other racer is done too: a winner that exited would leave a hold that is stale by rule, and
# the other, still deciding its last round, would rightly take it over.
pathlib.Path(base, f"done.{os.getpid()}").touch()
deadline = time.time() + 60
while len(list(pathlib.Path(base).glob("done.*"))) < 2 and time.time() < deadline:
  time.sleep(0.01)
"""


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_of_two_processes_started_at_the_same_instant_exactly_one_wins(tmp_path, stale):
  rounds = 15
  dead = _dead_pid()
  if stale:  # both find a killed run's hold and take it over at the same instant
    for i in range(rounds):
      _write_hold(tmp_path / str(i), pid=dead, started=None)
  start = time.time() + 3.0  # both processes have started (and imported) by then
  procs = [subprocess.Popen([sys.executable, "-c", RACER, str(ROOT), str(tmp_path), str(start), str(rounds),
                             str(dead)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  assert time.time() > start + 0.1 * (rounds - 1)
  results = [out.split() for out, _ in outs]
  for i in range(rounds):
    assert sorted(r[i] for r in results) == ["refused", "won"], (i, results)
    holder = json.loads((tmp_path / str(i) / workdir_hold.HOLD_FILE).read_text())
    winner = results.index(next(r for r in results if r[i] == "won"))
    assert holder["pid"] == procs[winner].pid
    assert not (tmp_path / str(i) / workdir_hold.TAKEOVER_FILE).exists()


def test_the_hold_is_given_back_on_ctrl_c_and_on_errors(tmp_path):
  for error in (KeyboardInterrupt(), UsageError("bad")):
    with pytest.raises(type(error)):
      with workdir_hold.holding(tmp_path, "pretrain", log=print):
        assert (tmp_path / workdir_hold.HOLD_FILE).exists()
        raise error
    assert not (tmp_path / workdir_hold.HOLD_FILE).exists()


# ------------------------------------------------------------------------------------------------------ the program


def test_the_first_run_records_its_program(tmp_path):
  with workdir_hold.holding(tmp_path, "pretrain", log=print):
    pass
  assert json.loads((tmp_path / workdir_hold.PROGRAM_FILE).read_text())["program"] == "pretrain"
  with workdir_hold.holding(tmp_path, "pretrain", log=print):  # the same program again: its workdir
    pass


@pytest.mark.parametrize("marked", [True, False], ids=["program.json", "older workdir"])
def test_finetuning_in_a_pretraining_workdir_is_refused(tmp_path, marked):
  from configs import finetune as finetune_config
  from stmem.programs import finetune
  if marked:  # what `stmem pretrain` records in its workdir
    with workdir_hold.holding(tmp_path, "pretrain", log=print):
      pass
  else:       # a pretraining workdir written before program.json existed
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "config.json").write_text("{}")
  before = sorted(p.name for p in tmp_path.rglob("*"))
  with pytest.raises(UsageError, match=f"workdir {re.escape(str(tmp_path))} belongs to `stmem pretrain`: `stmem finetune`"):
    finetune.run(finetune_config.get_config("test"), tmp_path)
  assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, the hold given back


@pytest.mark.parametrize("marked", [True, False], ids=["program.json", "older workdir"])
def test_pretraining_in_a_finetuning_workdir_is_refused(tmp_path, marked):
  from stmem.programs import pretrain
  if marked:  # what `stmem finetune` records in its workdir
    with workdir_hold.holding(tmp_path, "finetune", log=print):
      pass
  else:       # a fine-tuning workdir written before program.json existed
    (tmp_path / "train_state").mkdir()
  with pytest.raises(UsageError, match=f"workdir {re.escape(str(tmp_path))} belongs to `stmem finetune`: `stmem pretrain`"):
    pretrain.run(_config(), tmp_path)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / workdir_hold.HOLD_FILE).exists()


# ------------------------------------------------------------------------------------------------------ the config


def test_a_checkpoint_of_another_model_is_a_usage_error_and_nothing_is_moved(tmp_path):
  """What pretraining does on resume (`train_loop.restore` with its templates and meta), with the tiny model's
  checkpoint and a config that says small: a usage error naming model.variant; the checkpoint stays as it is."""
  import jax
  from flax import nnx

  from data_pipelines.contract import Contract
  from stmem import checkpoint as ckpt_lib
  from stmem import train_loop
  from stmem.models import StMem, model_config

  def meta_of(variant):
    config = _config()
    config.model.variant = variant
    return ckpt_lib.make_meta(model_config(variant), Contract(), config=json.loads(config.to_json_best_effort()))

  tiny = nnx.state(StMem(model_config("tiny"), rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
  ckpts = tmp_path / "checkpoints"
  saver = ckpt_lib.Checkpointer(ckpts, every=1, keep=3, async_save=False)
  saver.save(1, params=tiny, meta=meta_of("tiny"), force=True)
  saver.close()
  before = sorted(p.relative_to(ckpts) for p in ckpts.rglob("*"))
  small = nnx.eval_shape(lambda: StMem(model_config("small"), rngs=nnx.Rngs(0)))
  small = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(small, nnx.Param).to_pure_dict())
  checkpointer = ckpt_lib.Checkpointer(ckpts, every=1, keep=3, async_save=False)
  lines = []
  try:
    with pytest.raises(UsageError, match="1 holds another model than this config's \\(model.variant tiny -> small\\); "
                                         "nothing was moved: resume with the config it was written with"):
      train_loop.restore(checkpointer, lines.append, meta=meta_of("small"), params=small)
  finally:
    checkpointer.close()
  assert sorted(p.relative_to(ckpts) for p in ckpts.rglob("*")) == before and not lines
  # without the configs to compare, the differing arrays are named
  checkpointer = ckpt_lib.Checkpointer(ckpts, every=1, keep=3, async_save=False)
  try:
    with pytest.raises(UsageError, match="params/decoder_blocks/"):
      checkpointer.restore_latest_readable(params=small)
  finally:
    checkpointer.close()
  assert sorted(p.relative_to(ckpts) for p in ckpts.rglob("*")) == before
