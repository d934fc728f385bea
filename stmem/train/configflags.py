"""`--config FILE:PRESET --config.x=... --workdir DIR` parsing for programs called from `stmem` (not absl's app.run).

A private `flags.FlagValues()` per call, so that several programs (or tests) in one process do not collide on the
global absl flags.
"""
from __future__ import annotations

from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags


def parse(argv: Sequence[str], prog: str, default_config: str | None, *, workdir_required: bool = True):
  """(config, workdir) from a command line without the program name; `default_config` None makes --config
  required."""
  argv = list(argv)
  fv = flags.FlagValues()
  # sys_argv: the overrides (--config.x=...) are registered from this command line, not from sys.argv.
  config_flags.DEFINE_config_file("config", default_config, "configuration file (FILE[:PRESET])", flag_values=fv,
                                  lock_config=True, sys_argv=[prog] + argv)
  flags.DEFINE_string("workdir", None, "where the report (and checkpoint) go", flag_values=fv)
  usage = (f"usage: {prog} --config {(default_config or 'FILE').split(':')[0]}:PRESET [--config.KEY=VALUE ...] "
           "--workdir DIR")
  if any(a in ("-h", "--help", "-help") for a in argv):
    print(usage)
    raise SystemExit(0)
  fv([prog] + argv)
  if fv.config is None:
    raise SystemExit(f"{prog}: --config is required\n{usage}")
  if workdir_required and not fv.workdir:
    raise SystemExit(f"{prog}: --workdir is required")
  return fv.config, fv.workdir
