"""Multi-process pretraining on one machine: two CPU processes joined through a coordinator on 127.0.0.1.

- their losses equal a single-process run fed the same global batches (the concatenation of the two processes'
  shards, which is what `jax.make_array_from_process_local_data` builds), with parameters sharded across both;
- only process 0 writes metrics, TensorBoard events, config.json and figures; each process logs its own batches;
- a SIGTERM sent to one process stops both at the same step with a checkpoint (both exit 75: preempted);
- the checkpoint the two processes wrote together restores, and resumes training, in one process;
- when one process is killed, the survivor exits non-zero within a bounded time instead of hanging.

All runs share the flags that shape the compiled step, so process 0 of later runs finds it in the persistent cache
(process 1 compiles every time: JAX writes that cache from process 0 only, and on CPU the processes' keys differ).
Every subprocess runs under a deadline and is killed on failure: the module can never hang.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from stmem import checkpoint as ckpt_lib
from stmem import distributed
from tests.helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4            # steps compared with the single-process run
# total_steps is long so that the runs end by signal (its value is part of the compiled schedule: keep it shared)
OVERRIDES = {"batch_size": 8, "total_steps": 1000, "warmup_steps": 1, "data.num_synthetic": 24, "log_every": 1,
             "checkpoint.every": STEPS, "checkpoint.keep": 1000, "figure_every": STEPS, "log_batches": True,
             "mesh": "data:1,fsdp:2", "fsdp_min_size": 1024}   # parameters sharded over both processes' devices
HEARTBEAT_S = 10


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir: pathlib.Path, logs: pathlib.Path) -> list[subprocess.Popen]:
  """Two processes, one CPU device each, running launch/pretrain.py; output to files (a full pipe would block).

  One device a process: every collective then crosses processes (gloo), which is the path under test; several fake
  devices in one process add in-process collectives that, with parameters sharded, can deadlock on a 2-core machine
  under load (XLA CPU rendezvous timeouts), which would only make this test flaky."""
  port = _free_port()
  logs.mkdir(parents=True, exist_ok=True)
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + ["--config.evals="]  # tests/test_evaluators.py
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
           "STMEM_COORDINATOR": f"127.0.0.1:{port}", "STMEM_NUM_PROCESSES": "2", "STMEM_PROCESS_ID": str(i),
           "STMEM_INIT_TIMEOUT": "120", "STMEM_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S), "STMEM_SHUTDOWN_TIMEOUT": "60"}
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config",
           f"{ROOT / 'configs' / 'pretrain.py'}:tiny", "--workdir", str(workdir), *flags]
    with (logs / f"out.{i}").open("w") as out, (logs / f"err.{i}").open("w") as err:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))
  return procs


def _tail(logs: pathlib.Path, i: int) -> str:
  return (logs / f"err.{i}").read_text()[-3000:]


def _kill_all(procs: list[subprocess.Popen]):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait(timeout=30)


def _wait_for(condition, procs: list[subprocess.Popen], logs: pathlib.Path, timeout: float, what: str):
  """Poll until `condition()`; fail (the caller kills the processes) on a deadline or an early exit."""
  deadline = time.monotonic() + timeout
  while not condition():
    if any(p.poll() is not None for p in procs):
      pytest.fail(f"a process ended while waiting for {what}: {[p.poll() for p in procs]}\n{_tail(logs, 0)}\n"
                  f"--- process 1:\n{_tail(logs, 1)}")
    if time.monotonic() > deadline:
      pytest.fail(f"no {what} within {timeout} s\n{_tail(logs, 0)}")
    time.sleep(0.1)


def _summary(stdout: str) -> dict | None:
  """The JSON summary launch/pretrain.py prints last (gloo prints lines on stdout before it)."""
  start = stdout.find("{\n")
  return None if start == -1 else json.loads(stdout[start:])


def _lines(path: pathlib.Path) -> int:
  return len(path.read_text().splitlines()) if path.exists() else 0


# A single-process run, in its own process on one CPU device (no collectives at all, see _launch), stopped after a
# number of steps. With "two_shards" its input pipeline yields process 0's batch followed by process 1's, i.e. the
# global batch the two processes assemble together.
SINGLE = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from configs import pretrain as pretrain_config
from stmem.programs import pretrain

class ConcatenatedShards:
  def __init__(self, iterators):
    self.iterators = iterators
  def __iter__(self):
    return self
  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  def get_state(self):
    return self.iterators[0].get_state()   # the same position on every process

real = pretrain.data_lib.make_iterator
def two_shards(source, contract, *, batch_size, **kwargs):
  return ConcatenatedShards([real(source, contract, batch_size=batch_size // 2, process_index=p, process_count=2,
                                  **kwargs) for p in range(2)])
if sys.argv[5] == "two_shards":
  pretrain.data_lib.make_iterator = two_shards
c = pretrain_config.get_config("tiny")
c.evals = type(c.evals)()
for key, value in json.loads(sys.argv[3]).items():
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  setattr(node, leaf, value)
print(json.dumps(pretrain.run(c, sys.argv[2], stop_after=int(sys.argv[4]))))
"""
SINGLE_OVERRIDES = {**OVERRIDES, "mesh": "data:-1,fsdp:1", "figure_every": 0}


def _single(workdir: pathlib.Path, stop_after: int, pipeline: str) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("STMEM_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  return subprocess.Popen([sys.executable, "-c", SINGLE, str(ROOT), str(workdir), json.dumps(SINGLE_OVERRIDES),
                           str(stop_after), pipeline], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The two-process run (stopped by a SIGTERM to process 1 after STEPS steps) and, beside it, a single-process
  run of STEPS steps fed the same global batches."""
  base = tmp_path_factory.mktemp("multihost")
  workdir, logs = base / "two", base / "logs"
  procs = _launch(workdir, logs)
  reference = [_single(base / "one", STEPS, "two_shards")]
  try:
    _, err = reference[0].communicate(timeout=150)
    assert reference[0].returncode == 0, err[-3000:]
    _wait_for(lambda: _lines(workdir / "metrics.jsonl") >= STEPS and (workdir / "checkpoints" / str(STEPS)).is_dir()
              and (workdir / f"reconstruction_{STEPS:06d}.png").exists(), procs, logs, 150, f"{STEPS} steps")
    hold = json.loads((workdir / "hold.json").read_text())  # the run's one hold, while it runs
    procs[1].send_signal(signal.SIGTERM)          # one process is preempted: both must stop and save
    deadline = time.monotonic() + 60
    codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
  finally:
    _kill_all(procs + reference)
  assert codes == [75, 75], f"exit codes {codes}\n--- process 0:\n{_tail(logs, 0)}\n--- process 1:\n{_tail(logs, 1)}"
  return {"two": workdir, "one": base / "one", "logs": logs, "base": base, "hold": hold,
          "pids": [p.pid for p in procs]}


def _metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(path: pathlib.Path):
  from flax import nnx
  model, meta = ckpt_lib.load_model(path)
  return jax.tree.leaves(nnx.state(model, nnx.Param).to_pure_dict()), meta


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_two_processes_match_one_process_on_the_same_global_batches(runs):
  two, one = _metrics(runs["two"]), _metrics(runs["one"])
  assert len(one) == STEPS and [m["step"] for m in two[:STEPS]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([m["loss"] for m in two[:STEPS]], [m["loss"] for m in one], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose([m["grad_norm"] for m in two[:STEPS]], [m["grad_norm"] for m in one], rtol=1e-4)
  # each process read only its shard: per step, disjoint records, together the single run's global batch
  per_process = [[json.loads(l)["record_id"] for l in (runs["two"] / f"batches.{i}.jsonl").read_text().splitlines()]
                 for i in range(2)]
  single = [json.loads(l)["record_id"] for l in (runs["one"] / "batches.0.jsonl").read_text().splitlines()]
  assert len(per_process[0]) == len(per_process[1]) >= STEPS
  for step, (a, b) in enumerate(zip(*per_process)):
    assert len(a) == len(b) == 4 and not set(a) & set(b)
    if step < STEPS:
      assert a + b == single[step]


def test_only_process_zero_writes_logs_and_figures(runs):
  two = runs["two"]
  steps = [m["step"] for m in _metrics(two)]
  assert steps == list(range(1, len(steps) + 1))                     # once per step, not once per process
  assert len(list((two / "tensorboard").iterdir())) == 1
  assert json.loads((two / "config.json").read_text())["batch_size"] == 8
  assert (two / f"reconstruction_{STEPS:06d}.png").stat().st_size > 10_000
  assert sorted(p.name for p in two.glob("batches.*.jsonl")) == ["batches.0.jsonl", "batches.1.jsonl"]
  out0, out1 = ((runs["logs"] / f"out.{i}").read_text() for i in range(2))
  assert _summary(out0)["preempted"] and _summary(out1) is None      # the summary comes from process 0 only
  assert "process 1 of 2 (explicit), 1 local of 2 devices" in (runs["logs"] / "err.1").read_text()


def test_process_zero_holds_the_workdir_for_the_run(runs):
  """Both processes ran on one workdir: process 0 held it for the run (stmem.workdir_hold) and gave it back."""
  assert runs["hold"]["pid"] == runs["pids"][0] and runs["hold"]["processes"] == 2
  assert not (runs["two"] / "hold.json").exists()
  assert json.loads((runs["two"] / "program.json").read_text())["program"] == "pretrain"


def test_sigterm_to_one_process_stops_both_with_a_checkpoint(runs):
  summary = _summary((runs["logs"] / "out.0").read_text())
  stopped = summary["step"]
  assert stopped >= STEPS and _steps(runs["two"])[-1] == stopped
  assert f"preempted at step {stopped}" in (runs["logs"] / "err.0").read_text()
  for i in range(2):   # both processes ran the same number of steps
    assert _lines(runs["two"] / f"batches.{i}.jsonl") == stopped


def test_checkpoint_of_two_processes_restores_and_resumes_in_one(runs):
  two, _ = _params(runs["two"] / "checkpoints" / str(STEPS))
  one, meta = _params(runs["one"] / "checkpoints" / str(STEPS))
  for x, y in zip(two, one):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  assert meta["config"]["batch_size"] == 8
  # resume the collective checkpoint in a single process (one device: another mesh) and train on
  resumed = runs["base"] / "resumed"
  shutil.copytree(runs["two"], resumed)
  last = _steps(resumed)[-1]
  proc = _single(resumed, last + 2, "plain")
  try:
    out, err = proc.communicate(timeout=150)
  finally:
    _kill_all([proc])
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out)
  assert summary["start_step"] == last and summary["step"] == last + 2
  assert np.isfinite(summary["loss"])


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_killed_process_stops_the_other(tmp_path, victim):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  procs = _launch(workdir, logs)
  try:
    _wait_for(lambda: _lines(workdir / "metrics.jsonl") >= 2, procs, logs, 150, "training steps")
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    try:
      code = survivor.wait(timeout=90)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {1 - victim} still running 90 s after process {victim} was killed\n"
                  f"{_tail(logs, 1 - victim)}")
    elapsed = time.monotonic() - killed
  finally:
    _kill_all(procs)
  assert code != 0, _tail(logs, 1 - victim)
  assert elapsed < 90
  print(f"process {1 - victim} exited with {code} {elapsed:.1f} s after process {victim} was killed")


def test_detect_launchers():
  assert distributed.detect({}).method == "single"
  explicit = distributed.detect({"STMEM_COORDINATOR": "127.0.0.1:1234", "STMEM_NUM_PROCESSES": "2",
                                 "STMEM_PROCESS_ID": "1"})
  assert (explicit.method, explicit.num_processes, explicit.process_id) == ("explicit", 2, 1)
  assert explicit.bind_address == "127.0.0.1:1234"          # a local run never listens on other interfaces
  assert distributed.detect({"STMEM_COORDINATOR": "10.0.0.1:1234", "STMEM_NUM_PROCESSES": "2",
                             "STMEM_PROCESS_ID": "0"}).bind_address is None
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}
  assert distributed.detect(slurm).method == "slurm"
  assert distributed.detect({**slurm, "SLURM_NTASKS": "1"}).method == "single"   # one task: nothing to join
  assert distributed.detect({**slurm, "STMEM_DISTRIBUTED": "0"}).method == "single"
  assert distributed.detect({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4",
                             "OMPI_COMM_WORLD_RANK": "3"}).method == "ompi"
  assert distributed.detect({"STMEM_DISTRIBUTED": "1"}).method == "auto"
  assert distributed.detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}).method == "auto"
  with pytest.raises(ValueError, match="STMEM_NUM_PROCESSES"):
    distributed.detect({"STMEM_COORDINATOR": "127.0.0.1:1234"})
  with pytest.raises(ValueError, match="host:port"):
    distributed.detect({"STMEM_COORDINATOR": "127.0.0.1", "STMEM_NUM_PROCESSES": "2", "STMEM_PROCESS_ID": "0"})
  assert distributed.initialize({}).method == "single"       # one process: a no-op
