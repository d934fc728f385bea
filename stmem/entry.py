"""How every config-driven program is entered: its `main(argv)` is `entry.main(argv, run, program=...)`.

`main` parses the command line with `stmem.configflags`, joins the processes (`stmem.distributed.initialize`, a no-op
for one), calls the program's `run(config, workdir) -> dict` and prints that summary as JSON on stdout (process 0).
The training programs' two ways of stopping short get their exit codes here: a non-finite loss 3, a step that does
not fit the device memory 2. User errors raised anywhere else are reported by `stmem.programs.run`, the one way a
command is run.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

NON_FINITE_EXIT = 3
DOES_NOT_FIT_EXIT = 2


class CommandFailed(Exception):
  """A command that a program ran (`stmem.programs.run`) failed and has said why; its exit code is this program's."""

  def __init__(self, command: str, exit_code: int):
    super().__init__(f"`stmem {command}` failed (exit {exit_code})")
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
  return 0
