"""How every `stmem` program is configured: `--config FILE_OR_NAME[:PRESET] [--config.KEY=VALUE ...] [--workdir DIR]`.

One style for pretrain, probe, finetune, embed, export, convert, demo and study: an ml_collections file under
`configs/` (`get_config(preset)`, a `PRESETS` tuple whose first entry is the default, `PROGRAM` naming the command it
configures, the command lines in its docstring, one trailing `# meaning` comment per key), every file with the same
keys for the same things (`tests/test_config_vocabulary.py`). What this module adds to ml_collections' `config_flags`:

- config files by name: `--config pretrain:tiny` is `configs/pretrain.py:tiny` of the installed package, so it works
  from any working directory; a path (`configs/x.py`, `~/my.py`, `$RUNS/x.py`) is used as given when it exists,
  and `configs/NAME.py` falls back to the package's copy when the working directory has none;
- `--help` (and `--helpfull`) generated from the config file: its docstring, its presets, and every key with its
  default (of the chosen preset) and the meaning written beside it in the file;
- `~` and environment variables expanded in `--workdir` and every path-like string key (see `is_path_key`);
- `--KEY=VALUE` (or `--KEY VALUE`, `--KEY` for a boolean) as a shorthand for `--config.KEY=VALUE` of a top-level key
  or a key of the `data` block, which keeps the short command lines of embed, export and convert working;
- a key that was renamed (`RENAMED`), given on the command line, is refused in one line naming its new name;
- a config file whose `PROGRAM` is another command is refused (`stmem finetune --config pretrain:tiny`);
- errors as `ConfigError` naming the option or file and what to do, never an absl traceback.

A private `flags.FlagValues()` per call, so that several programs (or tests) in one process do not collide on the
global absl flags.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import os
import pathlib
import re
import tokenize
from collections.abc import Iterator, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from data_pipelines.errors import UsageError

# The shipped config files: the `configs` package is found, not imported (the library never imports a config).
CONFIG_DIR = pathlib.Path(importlib.util.find_spec("configs").origin).resolve().parent
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")
# String keys holding a path: `~` and $VARS are expanded in them. By name, so that a config file needs no
# annotation: the last component is one of these, or ends with one of the suffixes.
_PATH_NAMES = ("init_from", "out", "records", "reference", "workdir")
_PATH_SUFFIXES = ("_dir", "_root", "_path", "_file", "_csv")


# Keys that were renamed: old name -> its replacements, in the order tried (the first that the config has is the one
# named). A name is relative to its block: `probe.data_root` in the study's config is `probe.data.records`.
RENAMED: dict[str, tuple[str, ...]] = {
  "steps": ("total_steps",),
  "checkpoint": ("init_from",),           # a checkpoint to load; `checkpoint.*` are the save settings
  "model": ("model.variant",),
  "variant": ("model.variant",),
  "synthetic_n": ("data.num_synthetic",),
  "synthetic": ("data.num_synthetic",),
  "num_records": ("data.num_synthetic",),
  "records": ("data.records", "data.num_synthetic"),  # demo's `records` was a count of simulated ECGs
  "data_root": ("data.records",),
  "data_dir": ("data.data_dir",),
  "split": ("data.split",),
  "lead_set": ("data.lead_set",),
  "lead_map": ("data.lead_map",),
  "base_lr": ("optim.base_lr",),
  "weight_decay": ("optim.weight_decay",),
  "b1": ("optim.b1",),
  "b2": ("optim.b2",),
  "clip_norm": ("optim.clip_norm",),
  "layer_decay": ("optim.layer_decay",),
  "keep": ("checkpoint.keep",),
  "async_save": ("checkpoint.async_save",),
  "last_blocks": ("blocks",),             # the probe's mean of the last k blocks: now any block specs (blocks=10-12)
}


class ConfigError(UsageError):
  """A command line or config file the program cannot use; the message names the option or file and the fix
  (exit code 2, printed in one line by `stmem.cli`)."""


def is_path_key(key: str) -> bool:
  last = key.rsplit(".", 1)[-1]
  return last in _PATH_NAMES or last.endswith(_PATH_SUFFIXES)


def expand(path: str) -> str:
  """`~` and `$VAR` / `${VAR}` expanded (an unset variable is refused: it would silently become a literal folder)."""
  out = os.path.expanduser(os.path.expandvars(str(path)))
  unset = re.findall(r"\$\{?([A-Za-z_]\w*)", out)
  if unset:
    raise ConfigError(f"{path!r}: environment variable {unset[0]} is not set")
  return out


# ------------------------------------------------------------------------------------------------ finding files


def available() -> list[str]:
  """Config names shipped in the package (`configs/NAME.py`)."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def resolve(spec: str) -> tuple[pathlib.Path, str | None]:
  """`NAME[:PRESET]` or `PATH[:PRESET]` -> (absolute config file, preset or None)."""
  file_part, _, preset = str(spec).partition(":")
  preset = preset or None
  path = pathlib.Path(expand(file_part))
  if path.is_file():
    return path.resolve(), preset
  if path.suffix != ".py" and len(path.parts) == 1 and (CONFIG_DIR / f"{file_part}.py").is_file():
    return CONFIG_DIR / f"{file_part}.py", preset
  if path.parts[:1] == ("configs",) and len(path.parts) == 2 and (CONFIG_DIR / path.name).is_file():
    return CONFIG_DIR / path.name, preset  # `configs/x.py` from outside the repository: the installed copy
  raise ConfigError(f"--config {spec}: no such config file; give a path, or one of the names "
                    f"{', '.join(available())} (e.g. --config {available()[0]}:PRESET)")


def load_module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"stmem_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken config file: say which, and why
    raise ConfigError(f"--config {path}: cannot load it ({type(e).__name__}: {e})") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config {path}: not a config file (it has no get_config(preset) function)")
  return module


def program_of(module, path: pathlib.Path) -> str:
  """The command a config file configures: its `PROGRAM`, else the file's name (`configs/probe.py`: probe)."""
  return str(getattr(module, "PROGRAM", path.stem))


def program(argv: Sequence[str], default: str | None = None) -> str:
  """The command that the config file named on a command line (`--config NAME[:PRESET]`) configures."""
  spec, _ = _config_spec(list(argv), default)
  if spec is None:
    raise ConfigError("--config is required")
  path, _ = resolve(spec)
  return program_of(load_module(path), path)


def presets(module) -> tuple[str, ...]:
  return tuple(getattr(module, "PRESETS", ()))


def default_config(module, path: pathlib.Path, preset: str | None):
  names = presets(module)
  if preset is not None and names and preset not in names:
    raise ConfigError(f"--config {path.stem}:{preset}: unknown preset {preset!r}; {path.name} has {', '.join(names)}")
  try:
    return module.get_config(preset if preset is not None else (names[0] if names else None))
  except ValueError as e:
    raise ConfigError(f"--config {path}:{preset}: {e}") from e


# ------------------------------------------------------------------------------------------------ help text


def key_comments(path: pathlib.Path) -> dict[str, str]:
  """`c.KEY = value  # meaning` -> {KEY: meaning}, read from the file's source (the first assignment of each key;
  a comment on the line above counts when the line itself has none)."""
  source = path.read_text()
  comments = {tok.start[0]: tok.string.lstrip("#").strip()
              for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
  lines = source.splitlines()
  out: dict[str, str] = {}
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    key = _dotted(node.targets[0])
    if key is None or key in out:
      continue
    text = comments.get(node.end_lineno) or comments.get(node.lineno)
    above = node.lineno - 1
    if text is None and above in comments and lines[above - 1].lstrip().startswith("#"):
      text = comments[above]
    if text:
      out[key] = text
  return out


def _dotted(target) -> str | None:
  """`c.a.b` -> 'a.b' (assignments to the config object `c`)."""
  parts = []
  while isinstance(target, ast.Attribute):
    parts.append(target.attr)
    target = target.value
  if isinstance(target, ast.Name) and target.id == "c" and parts:
    return ".".join(reversed(parts))
  return None


def flat_items(config, prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in config.items():
    if hasattr(value, "items") and hasattr(value, "lock"):
      yield from flat_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def help_text(prog: str, path: pathlib.Path, module, preset: str | None, workdir: str | None) -> str:
  config = default_config(module, path, preset)
  names = presets(module)
  chosen = preset or (names[0] if names else None)
  name = path.stem if path.parent == CONFIG_DIR else str(path)
  wd = {"required": " --workdir DIR", "optional": " [--workdir DIR]"}.get(workdir or "", "")
  lines = [f"usage: {prog} [--config {name}[:PRESET]] [--config.KEY=VALUE ...]{wd}", ""]
  lines += [(module.__doc__ or "").strip(), ""]
  lines.append(f"config file: {path}   (another: --config FILE.py[:PRESET]; shipped: {', '.join(available())})")
  if names:
    lines.append(f"presets: {', '.join(n + (' (default)' if i == 0 else '') for i, n in enumerate(names))}")
  lines += ["", f"config keys, with the defaults of preset {chosen!r}; set with --config.KEY=VALUE (a top-level or "
                f"data key also as --KEY=VALUE); ~ and $VARS are expanded in paths:"]
  meanings = key_comments(path)
  items = list(flat_items(config))
  width = min(max((len(f"{k} = {v!r}") for k, v in items), default=0), 48)
  for key, value in items:
    shown = f"{key} = {value!r}"
    meaning = meanings.get(key, "")
    lines.append(f"  {shown:<{width}}  {meaning}".rstrip() if len(shown) <= width else
                 f"  {shown}\n  {'':<{width}}  {meaning}".rstrip())
  if workdir:
    lines += ["", "  --workdir DIR" + ("" if workdir == "required" else " (optional)") +
              "   where the program writes its outputs (~ and $VARS expanded)"]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ parsing


def _config_spec(argv: list[str], default: str | None) -> tuple[str | None, list[str]]:
  """The --config value and the command line without it."""
  rest, spec, i = [], default, 0
  while i < len(argv):
    a = argv[i]
    if a in ("--config", "-config"):
      if i + 1 >= len(argv):
        raise ConfigError("--config needs a value: --config NAME[:PRESET] or --config FILE.py[:PRESET]")
      spec, i = argv[i + 1], i + 2
      continue
    if a.startswith(("--config=", "-config=")):
      spec = a.split("=", 1)[1]
    else:
      rest.append(a)
    i += 1
  return spec, rest


def _leaves(config) -> set[str]:
  return {key for key, _ in flat_items(config)}


def _is_block(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not (hasattr(node, "items") and part in node):
      return False
    node = node[part]
  return hasattr(node, "items") and hasattr(node, "lock")


def renamed(dotted: str, config) -> str | None:
  """The new name of a renamed key (`RENAMED`) that the config has, for a key it lacks; else None."""
  if dotted in _leaves(config):
    return None
  *parents, last = dotted.split(".")
  prefix = "".join(f"{p}." for p in parents)
  return next((prefix + new for new in RENAMED.get(last, ()) if prefix + new in _leaves(config)), None)


def _shorthand(dotted: str) -> str:
  """How a key is written as a plain option: `--KEY` for top-level and data keys, else `--config.KEY`."""
  if "." not in dotted:
    return f"--{dotted}"
  block, _, key = dotted.partition(".")
  return f"--{key}" if block == "data" and "." not in key else f"--config.{dotted}"


def _check_renamed(argv: list[str], config, prog: str) -> None:
  """Refuse `--config.OLD=...` of a renamed key in one line naming the new key, and a value given to a block."""
  for a in argv:
    if not a.startswith(("--config.", "-config.")):
      continue
    dotted = a.split("=", 1)[0].split("config.", 1)[1]
    new = renamed(dotted, config)
    if new is not None:
      raise ConfigError(f"--config.{dotted} is now --config.{new} (see `{prog} --help`)")
    if _is_block(config, dotted):
      keys = [k for k, _ in flat_items(config) if k.startswith(dotted + ".")]
      raise ConfigError(f"--config.{dotted} is a block of keys ({', '.join(keys)}): set one of them, e.g. "
                        f"--config.{keys[0]}=...")


def _shorthands(argv: list[str], config) -> list[str]:
  """`--KEY=VALUE`, `--KEY VALUE`, `--KEY` (booleans) of top-level keys and keys of the `data` block ->
  `--config.KEY=VALUE` / `--config.data.KEY=VALUE`; a renamed key is refused naming the new one."""
  data = config["data"] if "data" in config and hasattr(config["data"], "lock") else {}
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    name, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
    key = name.replace("-", "_")
    dotted = (key if key in config and not hasattr(config[key], "lock") else
              f"data.{key}" if key in data and not hasattr(data[key], "lock") else None)
    if name and key not in ("config", "workdir") and not key.startswith("config.") and dotted is not None:
      default = config[key] if "." not in dotted else data[key]
      if not eq:
        if isinstance(default, bool):
          value = "True"
        elif i + 1 < len(argv):
          i += 1
          value = argv[i]
        else:
          raise ConfigError(f"--{name} needs a value (e.g. --{name}={default!r})")
      out.append(f"--config.{dotted}={value}")
    elif name.startswith("no") and name[2:].lstrip("_") in config and isinstance(config[name[2:].lstrip("_")], bool):
      out.append(f"--config.{name[2:].lstrip('_')}=False")  # absl's --noKEY for booleans
    elif name and key not in ("config", "workdir") and not key.startswith("config.") \
        and renamed(key, config) is not None:
      new = renamed(key, config)
      also = f" (--config.{new})" if _shorthand(new) != f"--config.{new}" else ""
      raise ConfigError(f"--{name} is now {_shorthand(new)}{also}")
    else:
      out.append(a)
    i += 1
  return out


def parse(argv: Sequence[str], prog: str, default: str | None, *, workdir: str | None = "required",
          workdir_default: str | None = None, programs: Sequence[str] | None = None):
  """(config, workdir) from a command line without the program name.

  `default`: the config used without --config (`NAME[:PRESET]`), None to require one. `workdir`: "required",
  "optional" (then `workdir_default` applies) or None (the program takes no --workdir). `programs`: the commands
  whose config files this program takes (default: the command of `prog`, `stmem NAME`); a file that declares
  another `PROGRAM` is refused. Paths come back expanded.
  """
  argv = list(argv)
  spec, rest = _config_spec(argv, default)
  wants_help = any(a in HELP_FLAGS for a in argv)
  if spec is None:
    if wants_help:
      raise SystemExit(print(f"usage: {prog} --config NAME[:PRESET] [--config.KEY=VALUE ...] --workdir DIR\n"
                             f"  NAME: one of {', '.join(available())}, or a config file; "
                             f"`{prog} --config NAME --help` lists its presets and keys") or 0)
    raise ConfigError(f"--config is required (one of {', '.join(available())}, e.g. --config "
                      f"{prog.split()[-1] if prog.split()[-1] in available() else available()[0]}:PRESET)")
  path, preset = resolve(spec)
  module = load_module(path)
  if programs is None and prog.startswith("stmem "):
    programs = (prog.split()[1],)
  if programs and hasattr(module, "PROGRAM") and module.PROGRAM not in programs:
    raise ConfigError(f"--config {spec}: {path.name} configures `stmem {module.PROGRAM}`, not `{prog}`; give a "
                      f"config of {' or '.join(programs)} (e.g. --config {programs[0]})")
  if wants_help:
    print(help_text(prog, path, module, preset, workdir))
    raise SystemExit(0)
  defaults = default_config(module, path, preset)
  rest = _shorthands(rest, defaults)
  rest, emptied = _emptied_blocks(rest, defaults)
  _check_renamed(rest, defaults, prog)
  fv = flags.FlagValues()
  full = f"{path}:{preset}" if preset is not None else str(path)
  if workdir is not None:
    flags.DEFINE_string("workdir", workdir_default, "where the program writes its outputs", flag_values=fv)
  try:
    # sys_argv: the overrides (--config.x=...) are registered from this command line, not from sys.argv.
    config_flags.DEFINE_config_file("config", full, "configuration file (FILE[:PRESET])", flag_values=fv,
                                    lock_config=True, sys_argv=[prog] + rest)
    unparsed = fv([prog] + rest, known_only=False)
  except flags.Error as e:  # an unknown option, a value of the wrong type
    raise ConfigError(f"{_absl_message(e)} (see `{prog} --config {path.stem} --help` for the keys)") from e
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # an override of a key the config lacks
    raise ConfigError(f"{_override_message(e, rest)} (see `{prog} --config {path.stem} --help` for the keys)") from e
  if len(unparsed) > 1:
    raise ConfigError(f"unexpected arguments {unparsed[1:]}")
  config = fv.config
  for key in emptied:
    _set(config, key, type(_get(config, key))())
  for key, value in flat_items(config):
    if isinstance(value, str) and value and is_path_key(key):
      _set(config, key, expand(value))
  wd = fv.workdir if workdir is not None else None
  if workdir == "required" and not wd:
    raise ConfigError("--workdir is required (the folder where its outputs go)")
  if wd:
    # A file in the way, or a folder nobody may write in: said now, not after the work (exit code 1, the file error
    # it was when only the making of the folder found it).
    from data_pipelines import errors
    errors.require_output(expand(wd), "--workdir", folder=True, exit_code=errors.DATA)
  return config, (expand(wd) if wd else wd)


def require(config, prog: str, *keys: str) -> None:
  """Refuse a run without the keys a program cannot do without (paths with no sensible default)."""
  missing = [k for k in keys if not _get(config, k)]
  if missing:
    named = " and ".join(f"--config.{k} (or {_shorthand(k)})" for k in missing)
    raise ConfigError(f"{named} {'is' if len(missing) == 1 else 'are'} required; see `{prog} --help`")


def require_positive(config, prog: str, *keys: str, zero_ok: Sequence[str] = ()) -> None:
  """Refuse counts that must be whole numbers of at least 1 (steps, batch sizes, intervals; at least 0 for the keys
  in `zero_ok`): `--config.total_steps=0` would run nothing and name a checkpoint that was never written."""
  for k in (k for k in keys if _has(config, k)):  # a config file of one's own may leave a key out
    v, least = _get(config, k), 0 if k in zero_ok else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
      raise ConfigError(f"--config.{k}={v}: give a whole number of at least {least}; see `{prog} --help`")


def require_items(config, prog: str, *keys: str) -> None:
  """Refuse an empty comma-separated list (`--config.lead_sets=`): the program would run nothing and report it."""
  for k in (k for k in keys if _has(config, k)):
    if not [t for t in str(_get(config, k) or "").split(",") if t.strip()]:
      raise ConfigError(f"--config.{k} is empty: give at least one (comma-separated); see `{prog} --help`")


# Blocks that a command line may empty (`--config.evals=`: no evaluator; `--config.evals.probe=`: not that one).
EMPTIABLE = ("evals",)


def _emptied_blocks(argv: list[str], config) -> tuple[list[str], list[str]]:
  """`--config.BLOCK=` (or `=none`) of an `EMPTIABLE` block, or of a block inside one, empties it: returns the
  command line without those options and the blocks to empty."""
  rest, emptied = [], []
  for a in argv:
    name, eq, value = a.partition("=")
    key = name.removeprefix("--config.") if name.startswith("--config.") else ""
    if (key.split(".")[0] in EMPTIABLE and eq and value.strip().lower() in ("", "none")
        and _is_block(config, key)):
      emptied.append(key)
    else:
      rest.append(a)
  return rest, emptied


def _get(config, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def _has(config, dotted: str) -> bool:
  try:
    _get(config, dotted)
  except (KeyError, AttributeError, TypeError):
    return False
  return True


def _set(config, dotted: str, value: Any) -> None:
  *parents, last = dotted.split(".")
  for p in parents:
    config = config[p]
  config[last] = value


def _override_message(e: Exception, argv: list[str]) -> str:
  """ml_collections names only the missing attribute: name the option that asked for it."""
  found = re.search(r"'(\w+)", str(e))  # ml_collections: AttributeError("'key'\nDid you mean ...")
  missing = found.group(1) if found else str(e).strip("\"'")
  for a in argv:
    if a.startswith("--config.") and missing and missing in a.split("=", 1)[0].split("."):
      return f"unknown config key {a.split('=', 1)[0]}"
  return f"{type(e).__name__}: {e}"


def _absl_message(e: Exception) -> str:
  """absl's messages start with the flag and repeat the whole value: keep the first line."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  text = re.sub(r"^Unknown command line flag '([^']+)'", r"unknown option --\1", text)
  return text.removeprefix("flag ")
