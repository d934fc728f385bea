"""The `stmem` command: hands the command line to `stmem.programs.run`, which runs the program it names.

No logic lives here; the programs, their registry and the way user errors are reported are in `stmem.programs`.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
  from stmem import programs
  return programs.run(list(sys.argv[1:] if argv is None else argv))


def run() -> None:
  """The console script. The CPU allocator setting (`stmem.hugepages`) is opt-in: STMEM_HUGEPAGES=1."""
  from stmem import hugepages
  hugepages.reexec_if_wanted()  # returns at once unless STMEM_HUGEPAGES=1
  sys.exit(main())


if __name__ == "__main__":
  run()
