"""Errors a user can cause or fix, and how the `stmem` command reports them.

Raise `UsageError` for a wrong option or value (exit code 2) and `DataError` for a bad, missing or mismatched file
(exit code 1). The message is what the user reads, whole: what is wrong, which file or option, what to do. The
`stmem` command (`stmem/cli.py`) prints it as `stmem COMMAND: error: MESSAGE` without a traceback (the traceback
only with `--debug` or `STMEM_DEBUG=1`); anything else still raises, because it is a bug to fix, not a user error.

Here, on the data side, because `data_pipelines` must not import `stmem`; `stmem` imports it from here.
"""
from __future__ import annotations

import errno
import os
import re
from typing import Any

USAGE = 2  # a wrong option, value, preset or key: fix the command line
DATA = 1   # a bad, missing, mismatched or corrupt file: fix or choose the file


class UserError(Exception):
  """A failure the user can fix. `message` names the file or option and says what to do; `exit_code` is 1 or 2."""

  exit_code = DATA

  def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None):
    self.message, self.hint = str(message), hint
    if exit_code is not None:
      self.exit_code = exit_code
    super().__init__(self.message + (f"\n  {hint}" if hint else ""))


class UsageError(UserError, ValueError):
  """A wrong option, value, preset or configuration key (exit code 2). Also a ValueError: code that validates a
  value can raise it where callers already expect a ValueError."""
  exit_code = USAGE


class DataError(UserError):
  """A bad, missing, mismatched or corrupt file or folder (exit code 1)."""
  exit_code = DATA


class Interrupted(KeyboardInterrupt):
  """What stmem's own signal handlers raise for Ctrl-C and SIGTERM (`stmem COMMAND: interrupted`, exit code 130).

  A subclass, never KeyboardInterrupt itself: CPython marks a bare KeyboardInterrupt that passes through a string
  `exec` or `eval` (a dataclass or namedtuple being defined, e.g. during a lazy import) as unhandled even when it is
  caught later, and `python -m ...` then kills itself with SIGINT at exit, so the exit code 130 the command returned
  becomes "killed by SIGINT". The check is by exact type: a subclass is never marked.
  """


# Operating-system errors about a named path are the user's to fix (a typo, a file where a folder should be, no
# permission): reported as data errors. Other OSErrors (a full disk mid-write...) are too, but keep their text.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def user_message(e: BaseException) -> tuple[str, int] | None:
  """(one- or two-line message, exit code) for an error the user can fix; None for a programming error."""
  if isinstance(e, UserError):
    return str(e), e.exit_code
  if isinstance(e, OSError) and no_space(e) is not None:  # a write the program did not name (a log, a figure...)
    where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
    return f"{no_space(e)}{where}; free space and run again", DATA
  if isinstance(e, _PATH_ERRORS):
    if getattr(e, "filename", None) is not None:
      what = {FileNotFoundError: "does not exist", NotADirectoryError: "is not a folder (a file is in the way)",
              IsADirectoryError: "is a folder, a file was expected", PermissionError: "permission denied",
              FileExistsError: "already exists"}.get(type(e), e.strerror)
      return f"{e.filename}: {what}", DATA
    return str(e), DATA
  return None


def require_dir(path: str | os.PathLike[str], option: str, *, must_exist: bool = True) -> str:
  """`path` (with `~` expanded) as a folder the command can use, or a UserError naming `option`.

  must_exist=False accepts a folder that is not there yet (an output) but refuses a file in its place.
  """
  p = os.path.expanduser(os.fspath(path))
  if os.path.exists(p) and not os.path.isdir(p):
    raise UsageError(f"{option} {p} is a file; give a folder")
  if must_exist and not os.path.isdir(p):
    raise UsageError(f"{option} {p} does not exist; give an existing folder")
  return p


def require_output(path: str | os.PathLike[str], option: str, *, folder: bool = False, exit_code: int = USAGE) -> str:
  """`path` (with `~` expanded) as a place a command can write its output, checked before any work; else a
  UsageError naming `option` and the path, in one line.

  `folder=True`: the output is a folder (created if missing, a file in its place refused); otherwise `path` is a
  file or a file prefix (`OUT` of OUT.npz and OUT.parquet) whose parent folder is created if missing. Either way every
  existing folder on the way must be a folder, not a file, and the nearest existing one writable. A URL
  (`gs://...`) is not checked. `exit_code`: the refusal's (a usage error by default).
  """
  if "://" in os.fspath(path):
    return os.fspath(path)
  p = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if folder and os.path.exists(p) and not os.path.isdir(p):
    raise UsageError(f"{option} {p}: a file is in the way; give a folder", exit_code=exit_code)
  parent = p if folder else os.path.dirname(p)
  existing = parent
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f"{option} {p}: {existing} is a file, not a folder; give a path under a folder",
                     exit_code=exit_code)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"{option} {p}: cannot write in {existing} (permission denied); give a writable place",
                     exit_code=exit_code)
  return p


def check_finite(arrays: dict[str, Any], where: str, *, is_finite=None) -> None:
  """Refuse weights holding NaN or inf, naming the first parameters that do (DataError).

  `is_finite(array) -> bool` defaults to numpy's; pass a JAX one for arrays spread over several processes.
  """
  import numpy as np
  if is_finite is None:
    is_finite = lambda a: bool(np.isfinite(np.asarray(a)).all())  # noqa: E731
  bad = [name for name, a in arrays.items() if np.issubdtype(a.dtype, np.floating) and not is_finite(a)]
  if bad:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise DataError(f"{where}: non-finite weights (NaN or inf) in {shown}; these weights are unusable, "
                    "use another file or checkpoint step")


# A write that found the disk full, the quota used up or the file-size limit (`ulimit -f`) reached: by its errno, or by
# the text of the libraries that report it as a message (tensorstore under orbax, ArrayRecord under tfds, pyarrow).
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large (the file-size limit, ulimit -f)"}
_NO_SPACE_TEXT = re.compile(r"no space left on device|disk quota exceeded|file too large|"
                            r"os_error_code='?(\d+)|\[errno (\d+)\]", re.IGNORECASE)


def no_space(e: BaseException | None) -> str | None:
  """What ran out ("no space left on device", "disk quota exceeded", "file too large (...)") when `e`, or an
  exception it was raised from, is a write that found no room; None for any other error."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return _NO_SPACE[e.errno]
    for m in _NO_SPACE_TEXT.finditer(str(e)):
      code = m.group(1) or m.group(2)
      if code is None:
        return next(v for v in _NO_SPACE.values() if v.split(" (")[0] == m.group(0).lower())
      if int(code) in _NO_SPACE:
        return _NO_SPACE[int(code)]
    e = e.__cause__ or e.__context__
  return None
