"""How every config-driven program is entered: its `main(argv)` is `entry.main(argv, run, program=...)`.

`main` parses the command line with `stmem.configflags`, joins the processes (`stmem.distributed.initialize`, a no-op
for one), calls the program's `run(config, workdir) -> dict` and prints that summary as JSON on stdout (process 0).
The training programs' ways of stopping short get their exit codes here. The exit codes of every program:

  0    done (the summary printed on stdout)
  1    a data or file error (`stmem.programs.run` reports it)
  2    a usage error, or a training step that does not fit the device memory
  3    a non-finite loss (pretrain, finetune): the last good checkpoint is kept, nothing diverged is saved
  75   preempted (pretrain, finetune): a SIGTERM stopped the run after it saved the current step; run the same
       command to resume. 75 is EX_TEMPFAIL of sysexits.h ("a temporary failure; the user is invited to retry"):
       not 0, so a scheduler can tell a preempted run from a finished one and requeue it (launch/README.md), and not
       128 + a signal, which means killed by that signal before anything was saved
  130  interrupted (Ctrl-C): the training programs save the current step first (a second Ctrl-C stops at once)

User errors raised anywhere else are reported by `stmem.programs.run`, the one way a command is run.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

NON_FINITE_EXIT = 3
DOES_NOT_FIT_EXIT = 2
PREEMPTED_EXIT = 75    # EX_TEMPFAIL: stopped by SIGTERM after saving; the same command resumes
INTERRUPTED_EXIT = 130  # Ctrl-C (128 + SIGINT), as `stmem.programs.run` reports an interrupted command


class CommandFailed(Exception):
  """A command that a program ran (`stmem.programs.run`) failed and has said why; its exit code is this program's."""

  def __init__(self, command: str, exit_code: int):
    stopped = {PREEMPTED_EXIT: "was preempted", INTERRUPTED_EXIT: "was interrupted"}.get(exit_code)
    super().__init__(f"`stmem {command}` {stopped} (exit {exit_code}): its progress is saved; run the same command "
                     f"to resume" if stopped else f"`stmem {command}` failed (exit {exit_code})")
    self.exit_code = exit_code


def main(argv: Sequence[str], run: Callable[[Any, str | None], dict | None], *, program: str,
         config: str | None = None, workdir: str | None = "required", workdir_default: str | None = None,
         check: Callable[[Any], None] | None = None, print_summary: bool = True) -> int:
  """Parse (`config`: the default `NAME[:PRESET]`, None to require --config; `workdir`: "required", "optional" or
  None), `check(config)` before any JAX work (refuse a bad command line early), initialise, run, print the summary
  (`print_summary=False`: a program whose own closing lines are its summary for a person, the demo)."""
  from stmem import configflags
  cfg, workdir_path = configflags.parse(argv, f"stmem {program}", config, workdir=workdir,
                                        workdir_default=workdir_default)
  if check is not None:
    check(cfg)
  from stmem import distributed
  distributed.initialize()  # a no-op for one process; must come before any JAX computation
  from stmem.memory_plan import DoesNotFit
  from stmem.preemption import NonFiniteLoss
  try:
    summary = run(cfg, workdir_path)
  except NonFiniteLoss as e:
    print(f"stmem {program}: {e}", file=sys.stderr)
    return NON_FINITE_EXIT
  except DoesNotFit as e:
    print(f"stmem {program}: {e}", file=sys.stderr)
    return DOES_NOT_FIT_EXIT
  except CommandFailed as e:
    print(f"stmem {program}: {e}", file=sys.stderr)
    return e.exit_code
  import jax
  if print_summary and summary is not None and jax.process_index() == 0:
    print(json.dumps(summary, indent=2, default=str), flush=True)
  return stopped_exit_code(summary)


def stopped_exit_code(summary: dict | None) -> int:
  """0, or the exit code of a training run stopped by a signal after saving (its summary says `preempted` and which
  signal the processes agreed on): 130 for Ctrl-C alone, 75 otherwise."""
  if not (summary and summary.get("preempted")):
    return 0
  return INTERRUPTED_EXIT if summary.get("signal") == "SIGINT" else PREEMPTED_EXIT
