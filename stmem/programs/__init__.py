"""The command-line programs of `stmem`, one module each, and the one way they are run.

Every program is a module with `main(argv) -> int`, registered in `COMMANDS` by its module path and imported only
when asked for, so that `stmem --help` stays fast. A program configured by a config file (all but plan, bench and
forward-check) also has `run(config, workdir) -> dict`, the program itself, and its `main` is `stmem.entry.main`
around it: parse the command line, join the processes, run, print the summary as JSON on stdout. What programs share
lives in the library modules beside this folder (the training loop `stmem.train_loop`, the mesh and parameter
placement `stmem.sharding`, the log `stmem.console`), never in another program; a program that runs others (demo,
study) runs them as commands (`run`).

Errors the user can fix (`data_pipelines.errors.UserError`, a missing path, a bad flag value) end as one or two lines
on stderr, `stmem COMMAND: error: ...`, and exit code 2 (usage) or 1 (data or file); the traceback only with
`--debug` (anywhere on the command line) or `STMEM_DEBUG=1`. Anything else is a bug and raises. Ctrl-C (and a
SIGTERM to `prepare`) ends a command with `stmem COMMAND: interrupted` and exit code 130; the training programs
first save the current step (`stmem.train_loop`), and a SIGTERM to them saves and exits 75 (`stmem.entry`).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

COMMANDS: dict[str, tuple[str, str]] = {
  "demo": ("stmem.programs.demo", "pretrain a tiny model on built-in synthetic ECGs, then probe it (no download)"),
  "download": ("data_pipelines.download", "fetch and verify a public ECG dataset (stmem download --list)"),
  "prepare": ("data_pipelines.prepare", "build a sharded ArrayRecord dataset from downloaded ECG files"),
  "overlap": ("data_pipelines.overlap", "report records shared between two prepared datasets"),
  "pretrain": ("stmem.programs.pretrain", "ST-MEM pretraining (--config configs/pretrain.py:PRESET --workdir DIR)"),
  "probe": ("stmem.programs.probe", "linear probe of a frozen encoder across lead sets"),
  "finetune": ("stmem.programs.finetune", "fine-tune an encoder with a classification head"),
  "embed": ("stmem.programs.embed", "export pooled / per-lead / per-patch embeddings"),
  "convert": ("stmem.programs.convert", "import reference ST-MEM weights (.pth / .npz) into a stmem checkpoint"),
  "export": ("stmem.programs.export", "export an encoder: safetensors with a model card, or an ONNX / StableHLO graph"),
  "plan": ("stmem.programs.plan", "compile a pretraining config ahead of time (TPU topology or local): memory, FLOPs, fit"),
  "bench": ("benchmarks.suite", "speed and memory benchmarks, printed as JSON"),
  "study": ("stmem.programs.study", "pretrain ST-MEM, MTAE and MLAE alike, then probe them beside random encoders"),
  "forward-check": ("stmem.programs.forward_check", "one forward/backward pass of a model variant on generated input"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: stmem COMMAND [options]   (stmem COMMAND --help for a command's options)", "", "commands:"]
  lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def debug_wanted(argv: list[str]) -> tuple[bool, list[str]]:
  """(--debug given or STMEM_DEBUG set, argv without --debug)."""
  rest = [a for a in argv if a != "--debug"]
  env = os.environ.get("STMEM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
  return env or len(rest) != len(argv), rest


def _flag_error(e: BaseException) -> str | None:
  """The message of a command-line flag error from absl or ml_collections (a usage error), else None."""
  try:
    from absl import flags
  except ImportError:  # pragma: no cover - absl comes with ml_collections
    return None
  if isinstance(e, flags.Error):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return None


def run(argv: list[str]) -> int:
  """`stmem COMMAND ARGS...` as a list: runs the command, returns its exit code."""
  debug, argv = debug_wanted(list(argv))
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"stmem: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module_name = COMMANDS[name][0]
  from stmem import platforms
  platforms.apply()  # before JAX is imported: off a TPU host, libtpu stays unloaded and quiet (stmem/platforms.py)
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      print(f"stmem {name}: not available in this version ({module_name} is missing)", file=sys.stderr)
      return 2
    raise
  previous = _catch_ctrl_c()
  try:
    return int(module.main(rest) or 0)
  except SystemExit as e:  # argparse has printed its usage line; a message given to SystemExit is a usage error
    if isinstance(e.code, str):
      print(f"stmem {name}: error: {e.code}", file=sys.stderr)
      return 2
    raise
  except KeyboardInterrupt:
    if debug:
      raise
    print(f"stmem {name}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - sorted into user errors (reported) and bugs (re-raised) below
    from data_pipelines import errors
    found = errors.user_message(e)
    flag = _flag_error(e) if found is None else None
    if debug or (found is None and flag is None):
      raise
    message, code = found if found is not None else (flag, errors.USAGE)
    print(f"stmem {name}: error: {message}", file=sys.stderr)
    return code
  finally:
    if previous is not None:
      signal.signal(signal.SIGINT, previous)


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
  from data_pipelines import errors
  raise errors.Interrupted(signal.Signals(signum).name)


def _catch_ctrl_c():
  """Ctrl-C raises `data_pipelines.errors.Interrupted` (reported as `interrupted`, exit code 130) while a command
  runs, in the main thread and where Python's own handler was in place; returns the handler to put back, or None."""
  import threading
  if threading.current_thread() is not threading.main_thread():
    return None
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    return None
  return signal.signal(signal.SIGINT, _interrupt)
