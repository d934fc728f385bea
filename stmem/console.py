"""The human-readable lines every program writes: `stmem PROGRAM: message` on stderr, from process 0 only.

stdout is left to what a program gives back to a machine (its JSON summary, `stmem plan`'s table); everything said to
the person running it goes through one `Log`, so that lines look alike in every program and several processes do not
repeat them. `Log.text` writes a block (a report in Markdown) as it is.
"""
from __future__ import annotations

import sys


class Log:
  """`log("message")` writes `stmem PROGRAM: message` on stderr (process 0 only, unless `every_process`)."""

  def __init__(self, program: str, *, every_process: bool = False):
    self.program, self.every_process = program, every_process
    self._main: bool | None = None

  @property
  def enabled(self) -> bool:
    if self.every_process:
      return True
    if self._main is None:
      # Asked at the first line, not at construction: a program makes its Log before it joins the processes.
      if "jax" in sys.modules:
        import jax
        self._main = jax.process_index() == 0
      else:
        return True  # no JAX yet, hence one process
    return self._main

  def __call__(self, message: str) -> None:
    if self.enabled:
      print(f"stmem {self.program}: {message}", file=sys.stderr, flush=True)

  def text(self, block: str) -> None:
    if self.enabled:
      print(block.rstrip("\n"), file=sys.stderr, flush=True)
