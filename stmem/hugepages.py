"""Back the process's large allocations with transparent huge pages, on Linux with glibc.

Why: XLA on CPU allocates every executable's temporary buffers afresh on each run (about 2 GB per base pretraining
step at batch 8) and glibc serves such sizes with new `mmap`s, so each step touched about two million fresh 4 KiB
pages, and the kernel's page-fault and page-zeroing work took about 14 % of the step's CPU time. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask for transparent huge pages: 18 times fewer faults, and a
base float32 step on the 2-core x86 CPU went from 3.8-4.1 s to 3.3-3.4 s (benchmarks/README.md).

Opt-in, because it is a CPU allocator choice and the library stays backend-neutral: with STMEM_HUGEPAGES=1 the
`stmem` command re-executes itself with the tunable set (a tunable is read once, when the process starts) before it
imports anything heavy; without it the process is left as it was started. The same effect without re-executing:
start the process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment (what a launch script does).
"""
from __future__ import annotations

import os
import pathlib
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, ...]:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
  except (AttributeError, ValueError, OSError):
    return ()
  return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else ()


def _thp_mode() -> str:
  """The kernel's transparent-huge-page mode: 'always', 'madvise', 'never' or '' when unknown."""
  try:
    text = _THP.read_text()
  except OSError:
    return ""
  return text[text.index("[") + 1:text.index("]")] if "[" in text else ""


def wanted(environ: dict[str, str] | None = None) -> bool:
  """Whether the user asked for it (STMEM_HUGEPAGES=1) and re-executing with the tunable would change anything."""
  env = os.environ if environ is None else environ
  return (sys.platform.startswith("linux") and env.get("STMEM_HUGEPAGES", "0") == "1"
          and TUNABLE not in env.get("GLIBC_TUNABLES", "") and _glibc_version() >= (2, 35)
          and _thp_mode() == "madvise")  # 'always' already gives huge pages; 'never' cannot


def environment(environ: dict[str, str] | None = None) -> dict[str, str]:
  """A copy of the environment with the tunable added to any tunables already set."""
  env = dict(os.environ if environ is None else environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1") if t)
  return env


def reexec_if_wanted() -> None:
  """Replace this process by the same command line with the tunable set (same PID, so launchers and signals are
  unaffected). Returns only when nothing needs doing; call it first thing, before JAX is imported."""
  if not wanted():
    return
  argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv)[1:])
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, environment())
