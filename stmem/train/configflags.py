"""`--config FILE:PRESET --config.x=... --workdir DIR` parsing for programs called from `stmem` (not absl's app.run).

A private `flags.FlagValues()` per call, so that several programs (or tests) in one process do not collide on the
global absl flags.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from data_pipelines.errors import UsageError


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
  _parse_flags(fv, prog, argv)
  if fv.config is None:
    raise SystemExit(f"{prog}: --config is required\n{usage}")
  if workdir_required and not fv.workdir:
    raise SystemExit(f"{prog}: --workdir is required")
  return fv.config, fv.workdir


def _parse_flags(fv: flags.FlagValues, prog: str, argv: list[str]) -> None:
  """fv(argv), with absl's and ml_collections' failures turned into UsageErrors that name the option or key.

  Why here: ml_collections reports an unknown key as a bare `AttributeError: "'key'"` and an unknown preset inside a
  multi-line IllegalFlagValueError; the user needs `--config.key` and the file named, in one line.
  """
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  file = (spec or "").split(":", 1)[0]
  if file.endswith(".py") and not os.path.isfile(file):
    raise UsageError(f"--config {spec}: no such file {file}")
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  try:
    fv([prog] + argv)
  except flags.UnrecognizedFlagError as e:
    raise UsageError(f"unknown option --{e.flagname}; {prog} --help lists the options") from e
  except flags.IllegalFlagValueError as e:
    text = str(e).strip()
    if "Error whilst parsing config file" in text:  # the config file itself raised: its last line says why
      why = re.sub(r"^\w+Error: ", "", text.splitlines()[-1].strip())
      raise UsageError(f"--config {spec}: {why}") from e
    raise UsageError(text.splitlines()[0].removeprefix("flag ")) from e
  except (AttributeError, KeyError) as e:  # an override of a key the config does not have
    key = str(e).strip("\"' ")
    named = [o for o in overrides if o.split(".")[-1] == key or f".{key}." in o + "."] or overrides
    raise UsageError(f"unknown config key {', '.join(named)} (not in {spec}); {prog} --help lists the keys") from e
  except flags.Error as e:
    raise UsageError(str(e).strip().splitlines()[0]) from e
