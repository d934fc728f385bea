"""A fork server for `stmem` runs: one process imports stmem (JAX, flax, orbax, tfds) once, then forks each run.

    with ForkServer() as forks:
      pid = forks.start(["pretrain", "--config", "configs/pretrain.py:tiny", "--workdir", "w"], log=pathlib.Path("w.log"))
      rc = forks.wait(pid)

Each run is its own process, with its own exit code and output files, killable by SIGKILL like any other, without
paying the imports again (seconds each, tens of seconds on a loaded 2-core machine): the fault-injection benchmark
forks hundreds of runs from it, and tests that run the `stmem` command many times fork theirs. The server imports
JAX but never starts a backend, so a child starts its own as a fresh process would.

    python -m benchmarks.fork_server     # the server itself: JSON requests on stdin, one answer per line on stdout
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _serve() -> None:
  """Import stmem once, then answer requests: `run` forks a child, `wait` reaps one, `poll` asks without waiting."""
  out = sys.stdout
  sys.stdout = sys.stderr  # anything the imports print stays off the answer channel
  from stmem import platforms
  platforms.apply()
  import tensorflow_datasets  # noqa: F401 - imported here so that no child pays for it

  import configs.finetune  # noqa: F401
  import configs.pretrain  # noqa: F401
  import data_pipelines.generic.generic_dataset_builder  # noqa: F401
  import data_pipelines.prepare  # noqa: F401
  import stmem.programs  # noqa: F401
  import stmem.programs.finetune  # noqa: F401
  import stmem.programs.pretrain  # noqa: F401
  import stmem.plots  # noqa: F401 - matplotlib, for the figures runs draw
  from stmem import metrics
  metrics.summary_writer_class()  # tensorboardX, imported as the training programs import it

  def answer(obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()

  answer({"ready": True})
  for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "run":
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(request)
      answer({"pid": pid})
    elif request["op"] == "wait":
      _, status = os.waitpid(request["pid"], 0)
      answer({"rc": os.waitstatus_to_exitcode(status)})
    elif request["op"] == "poll":
      done, status = os.waitpid(request["pid"], os.WNOHANG)
      answer({"rc": None if done == 0 else os.waitstatus_to_exitcode(status)})
    else:
      return


def _child(request: dict) -> None:
  """Become `stmem ARGV` in the request's folder, output into its log files, and exit with the program's code."""
  rc = 1
  try:
    os.chdir(request["cwd"])
    for target, path in ((1, request["log"]), (2, request.get("err"))):
      if path is None:  # stderr into the log too, through stdout's own file description (one offset for both)
        os.dup2(1, 2)
        continue
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
      os.dup2(fd, target)
      os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout, sys.stdin = sys.__stdout__, open(os.devnull)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["stmem", *request["argv"]]
    from stmem import programs
    rc = programs.run(request["argv"])
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else 1
  except BaseException:  # noqa: BLE001 - the child reports everything and exits
    import traceback
    traceback.print_exc()
    rc = 1
  finally:
    with contextlib.suppress(Exception):
      sys.stdout.flush()
      sys.stderr.flush()
    os._exit(rc if isinstance(rc, int) else 1)


def child_env(cache_dir: str | None = None) -> dict[str, str]:
  """The environment of every run: this checkout's code first, one CPU device, a persistent compilation cache."""
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env["JAX_PLATFORMS"] = env.get("STMEM_FAULTS_PLATFORMS", "cpu")
  kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=1", *kept])  # the caller's other flags kept
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir or env.get("JAX_COMPILATION_CACHE_DIR") or str(
    pathlib.Path.home() / ".cache" / "stmem-tests" / "jax")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return env


class ForkServer:
  """A process that has imported stmem; `start` forks a run of `stmem ARGV` from it and returns the run's pid.
  Safe to share between threads (one request at a time; `poll` lets several threads wait for their runs)."""

  def __init__(self, env: dict[str, str] | None = None):
    self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fork_server"], cwd=ROOT,
                                 env=env or child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self._lock = threading.Lock()
    if not self._read().get("ready"):
      raise RuntimeError("the fork server did not start")

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the fork server ended (exit code {self.proc.wait()})")
    return json.loads(line)

  def _ask(self, request: dict) -> dict:
    with self._lock:
      self.proc.stdin.write(json.dumps(request) + "\n")
      self.proc.stdin.flush()
      return self._read()

  def start(self, argv: list[str], log: pathlib.Path, cwd: pathlib.Path = ROOT, *,
            err: pathlib.Path | None = None) -> int:
    """Fork `stmem ARGV` in `cwd`, its stdout into `log` and its stderr into `err` (else `log` too); the child's
    pid."""
    return self._ask({"op": "run", "argv": [str(a) for a in argv], "log": str(log), "cwd": str(cwd),
                      "err": str(err) if err else None})["pid"]

  def wait(self, pid: int) -> int:
    """Block (the server too) until run `pid` exits; its exit code."""
    return self._ask({"op": "wait", "pid": pid})["rc"]

  def poll(self, pid: int) -> int | None:
    """Run `pid`'s exit code, or None while it runs."""
    return self._ask({"op": "poll", "pid": pid})["rc"]

  def close(self) -> None:
    if self.proc.poll() is None:
      with contextlib.suppress(BrokenPipeError):
        self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()

  def __enter__(self) -> ForkServer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


if __name__ == "__main__":
  _serve()
