"""Pretraining resumes exactly: 2N steps equal N steps, a stop, and N resumed steps; SIGTERM saves and resumes;
a non-finite loss stops the run and leaves the last good checkpoint."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from stmem import checkpoint as ckpt_lib
from stmem import data
from stmem.preemption import NonFiniteLoss
from stmem.programs import pretrain

from tests.helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 3


def _config(**overrides):
  c = pretrain_config.get_config("tiny")
  c.batch_size, c.total_steps, c.warmup_steps = 8, 2 * N, 1
  c.data.num_synthetic = 24
  c.checkpoint.every, c.checkpoint.async_save = N, True
  c.log_every, c.log_batches = 1, True
  c.evals = type(c.evals)()  # no evaluators: tests/test_evaluators.py runs them
  # One device: 8 fake CPU devices on 2 cores have deadlocked in XLA:CPU collectives here (intermittently), and
  # sharded steps are tested in test_sharding.py; restoring across meshes in test_convert.py.
  c.mesh, c.num_devices = "data:-1,fsdp:1", 1
  for k, v in overrides.items():
    node, *rest = k.split(".")
    if rest:
      setattr(c[node], rest[0], v)
    else:
      setattr(c, k, v)
  return c


def _params(workdir, step):
  model, meta = ckpt_lib.load_model(pathlib.Path(workdir) / "checkpoints" / str(step))
  from flax import nnx
  return jax.tree.leaves(nnx.state(model, nnx.Param).to_pure_dict()), meta


def _batches(workdir):
  lines = (pathlib.Path(workdir) / "batches.0.jsonl").read_text().splitlines()
  return [tuple(json.loads(l)["record_id"]) for l in lines]


def test_resume_equals_uninterrupted(tmp_path, monkeypatch, capfd):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  pretrain.run(_config(), straight)
  first = pretrain.run(_config(), resumed, stop_after=N)          # stands in for a crash after step N
  assert first["step"] == N and not (resumed / "checkpoints" / str(2 * N)).exists()
  second = pretrain.run(_config(), resumed)
  assert second["start_step"] == N and second["step"] == 2 * N
  a, meta = _params(straight, 2 * N)
  b, _ = _params(resumed, 2 * N)
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  assert _batches(straight) == _batches(resumed)      # the same batches in the same order
  assert len(set(_batches(straight))) == 2 * N
  # the checkpoint carries the config and the preprocessing contract
  assert meta["contract"]["fs"] == 250.0 and meta["contract"]["window"] == 2250
  assert meta["config"]["batch_size"] == 8 and meta["model"]["width"] == 128
  # ... and which simulator made its records, in the checkpoint and in config.json
  assert meta["config"]["data"]["simulator"] == 2
  assert json.loads((straight / "config.json").read_text())["data"]["simulator"] == 2
  losses = [json.loads(l)["loss"] for l in (straight / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 2 * N and all(np.isfinite(losses))
  assert (straight / "reconstruction.png").stat().st_size > 10_000
  assert any((straight / "tensorboard").iterdir())

  # The same command on the finished run says so before building any data; a changed option takes the full path.
  def no_data(config):
    raise AssertionError("data built")
  monkeypatch.setattr(pretrain, "build_source", no_data)
  capfd.readouterr()
  again = pretrain.run(_config(), straight)
  assert (again["start_step"], again["step"], again["checkpoint"]) == (2 * N, 2 * N, str(straight / "checkpoints"
                                                                                          / str(2 * N)))
  assert f"already complete: step {2 * N} of {2 * N} under this config" in capfd.readouterr().err
  with pytest.raises(AssertionError, match="data built"):
    pretrain.run(_config(log_every=2), straight)


def test_a_run_records_its_simulator_version():
  """A config that names no simulator version records the default's; one that does keeps it; data that is not
  simulated records none."""
  c = _config()
  with c.unlocked():
    del c.data["simulator"]
  data.record_simulator(c)
  assert c.data.simulator == 2
  c = _config(**{"data.simulator": 1})
  data.record_simulator(c)
  assert c.data.simulator == 1
  c = _config(**{"data.source": "prepared", "data.data_dir": "/nowhere"})
  with c.unlocked():
    del c.data["simulator"]
  data.record_simulator(c)
  assert "simulator" not in c.data


def test_sigterm_saves_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "stmem.cli", "pretrain", "--config", str(ROOT / "configs" / "pretrain.py") + ":tiny",
         "--workdir", str(workdir), "--config.total_steps=500", "--config.log_every=1", "--config.batch_size=8",
         "--config.data.num_synthetic=24", "--config.checkpoint.every=1000", "--config.evals="]
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-2000:]
  assert json.loads((workdir / "hold.json").read_text())["pid"] == proc.pid  # the running command holds its workdir
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]  # preempted, saved: a scheduler requeues it (stmem.entry)
  assert "preempted at step" in err
  assert not (workdir / "hold.json").exists()  # given back: the same command resumes below
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 1 and 3 <= steps[0] < 500
  stopped = steps[0]
  # the same command (with a shorter schedule, to finish quickly) resumes from that checkpoint
  cmd[cmd.index("--config.total_steps=500")] = f"--config.total_steps={stopped + 2}"
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"resuming from step {stopped}" in done.stderr
  assert f"total_steps changed from 500 to {stopped + 2}, resuming at step {stopped}" in done.stderr
  assert json.loads(done.stdout)["step"] == stopped + 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  calls = {"n": 0}
  real = pretrain.data_lib.to_global

  def poisoned(batch, sharding):  # from the 5th step on, the batch holds NaN
    calls["n"] += 1
    if calls["n"] >= 5:
      batch = {**batch, "signal": np.full_like(batch["signal"], np.nan)}
    return real(batch, sharding)

  monkeypatch.setattr(pretrain.data_lib, "to_global", poisoned)
  workdir = tmp_path / "nan"
  config = _config(total_steps=8)
  config.checkpoint.every = 2
  with pytest.raises(NonFiniteLoss, match="last good checkpoint is step 4"):
    pretrain.run(config, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 4
  good, _ = _params(workdir, 4)
  assert all(np.isfinite(np.asarray(x)).all() for x in good)


def test_command_line_overrides_work_in_process(tmp_path, capsys):
  # `stmem demo --steps N` calls `stmem pretrain ... --config.total_steps=N` inside its own process: the overrides
  # must be read from the given command line, not from sys.argv.
  from stmem import cli
  workdir = tmp_path / "run"
  assert cli.main(["pretrain", "--config", str(ROOT / "configs" / "pretrain.py") + ":tiny", "--workdir", str(workdir),
                   "--config.total_steps=2", "--config.batch_size=8", "--config.data.num_synthetic=16",
                   "--config.mesh=data:-1,fsdp:1", "--config.num_devices=1", "--config.evals="]) == 0
  assert json.loads(capsys.readouterr().out)["step"] == 2
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_steps_between_log_steps_never_read_from_the_devices(tmp_path, monkeypatch):
  """The loop only dispatches between log/checkpoint steps. It runs those steps under jax's device-to-host transfer
  guard (config.transfer_guard), which on GPU and TPU turns a read into an error; on CPU, where arrays already live
  in host memory, the guard never fires, so here the guard's scope is instrumented: reading an array's value
  (float, bool, int, item, tolist, __array__, _value, jax.device_get) inside it fails."""
  import contextlib
  from jax._src.array import ArrayImpl
  guarded = {"depth": 0, "entered": 0}
  real_guard = jax.transfer_guard_device_to_host

  @contextlib.contextmanager
  def guard(level):
    with real_guard(level):
      guarded["depth"] += 1
      guarded["entered"] += 1
      try:
        yield
      finally:
        guarded["depth"] -= 1

  def refusing(real):
    def read(*args, **kwargs):
      if guarded["depth"]:
        raise RuntimeError("device-to-host read disallowed between log steps")
      return real(*args, **kwargs)
    return read

  for name in ("__array__", "__float__", "__bool__", "__int__", "__index__", "item", "tolist"):
    monkeypatch.setattr(ArrayImpl, name, refusing(getattr(ArrayImpl, name)))
  monkeypatch.setattr(ArrayImpl, "_value", property(refusing(ArrayImpl._value.fget)))
  monkeypatch.setattr(jax, "device_get", refusing(jax.device_get))
  monkeypatch.setattr(jax, "transfer_guard_device_to_host", guard)
  config = _config(total_steps=6, log_every=3, **{"checkpoint.every": 1000, "transfer_guard": "disallow",
                                                  "log_batches": False})
  summary = pretrain.run(config, tmp_path / "clean")
  assert summary["step"] == 6 and summary["loss"] > 0
  assert guarded["entered"] == 4  # steps 1, 2, 4 and 5; 3 and 6 log

  # A sync put back into every step (here: a value read back from the devices, as a per-step loss print would) is
  # caught.
  real = pretrain.data_lib.to_global

  def syncing(batch, sharding):
    out = real(batch, sharding)
    float(out["signal"].sum())
    return out

  monkeypatch.setattr(pretrain.data_lib, "to_global", syncing)
  with pytest.raises(RuntimeError, match="disallowed between log steps"):
    pretrain.run(config, tmp_path / "syncing")
