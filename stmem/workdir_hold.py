"""One writer per workdir: the hold a training run keeps on its workdir, and the program a workdir belongs to.

A training program's `run(config, workdir)` is wrapped by `held(PROGRAM)` (`stmem pretrain`, `stmem finetune`, any
program whose checkpoints go into a workdir through `stmem.train_loop`). Before anything is written it:

- takes the workdir's hold, `WORKDIR/hold.json`: who holds it (host, process id, program, since when, in UTC) and a
  heartbeat. The file is created atomically (complete, under a temporary name, then hard-linked into place, which
  fails when the name exists), so of two runs started at the same instant exactly one wins. A second run on a workdir
  that a live run holds stops with one line naming the holder.
- recognises a hold left by a run that was killed (SIGKILL, a lost node) as stale, takes it over and says so in one
  line. The rule: a hold written on this host is stale when its process no longer runs (or its process id now names
  another process); a hold written on another host, whose processes cannot be asked, is stale when its heartbeat is
  older than `STALE_AFTER_S` (10 minutes; the holder rewrites it every `HEARTBEAT_S`, 60 s). Two runs that find the
  same stale hold agree through a second file, `hold.json.takeover`, created the same way: one of them takes it.
- checks that the workdir belongs to this program, `WORKDIR/program.json`, written by the first run: pretraining
  in a fine-tuning workdir, or fine-tuning in a pretraining one, is a usage error (their checkpoints, metrics and
  config would mix). Workdirs written before the marker existed are recognised by their contents.

The hold is released when `run` returns or raises: a finished run, a usage error, a SIGTERM that the training loop
turned into a checkpoint and a normal return, Ctrl-C. A run killed outright leaves it, to be taken over as above.

Several processes of one multi-process run share one hold: process 0 takes it (and heartbeats) and tells the
others whether it did; when it could not, every process stops with a usage error.

The hold's file operations go through a `Store` (create-exclusive, read, write, remove); `LocalStore` is the local
filesystem's. Another kind of workdir plugs its own in with `register_store("scheme", factory)` (an object store
creates exclusively with a precondition such as GCS's `ifGenerationMatch=0`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import json
import os
import pathlib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from data_pipelines.errors import UsageError

HOLD_FILE = "hold.json"
TAKEOVER_FILE = "hold.json.takeover"
PROGRAM_FILE = "program.json"
HEARTBEAT_S = 60.0        # the holder rewrites its heartbeat this often
STALE_AFTER_S = 600.0     # a hold from another host whose heartbeat is older than this is stale
TAKEOVER_STALE_S = 60.0   # a takeover file older than this was left by a run killed while taking over


class Store(Protocol):
  """The file operations of a hold, on names inside one workdir."""

  def create_exclusive(self, name: str, data: bytes) -> bool:
    """Create `name` holding `data`, atomically and complete; False (nothing written) when it exists."""

  def read(self, name: str) -> bytes | None:
    """The bytes of `name`, or None when there is no such file."""

  def write(self, name: str, data: bytes) -> None:
    """Replace `name` with `data` (atomically: a reader sees the old bytes or the new ones)."""

  def remove(self, name: str) -> None:
    """Remove `name`; nothing when it is absent."""

  def where(self, name: str) -> str:
    """How messages name the file."""


class LocalStore:
  """A workdir on a local (or shared POSIX) filesystem."""

  def __init__(self, folder: str | pathlib.Path):
    self.folder = pathlib.Path(folder).expanduser().absolute()

  def _temporary(self, name: str, data: bytes) -> pathlib.Path:
    self.folder.mkdir(parents=True, exist_ok=True)
    tmp = self.folder / f".{name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return tmp

  def create_exclusive(self, name: str, data: bytes) -> bool:
    tmp = self._temporary(name, data)
    try:
      os.link(tmp, self.folder / name)  # fails if the name exists: the file appears complete or not at all
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
        raise
      return self._create_without_links(name, data)  # a filesystem without hard links
    finally:
      tmp.unlink(missing_ok=True)

  def _create_without_links(self, name: str, data: bytes) -> bool:
    """O_CREAT|O_EXCL: as atomic, but a reader may see the file empty for an instant (`take` waits that out)."""
    try:
      fd = os.open(self.folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def read(self, name: str) -> bytes | None:
    try:
      return (self.folder / name).read_bytes()
    except FileNotFoundError:
      return None

  def write(self, name: str, data: bytes) -> None:
    os.replace(self._temporary(name, data), self.folder / name)

  def remove(self, name: str) -> None:
    (self.folder / name).unlink(missing_ok=True)

  def where(self, name: str) -> str:
    return str(self.folder / name)


_STORES: dict[str, Callable[[str], Store]] = {}


def register_store(scheme: str, factory: Callable[[str], Store]) -> None:
  """Workdirs written `SCHEME://...` get their hold's files through `factory(workdir)`."""
  _STORES[scheme] = factory


def store_for(workdir: str | pathlib.Path) -> Store:
  text = str(workdir)
  scheme = text.split("://", 1)[0] if "://" in text else ""
  if scheme:
    if scheme not in _STORES:
      raise UsageError(f"--workdir {text}: a {scheme}:// workdir is not supported here")
    return _STORES[scheme](text)
  return LocalStore(text)


# ------------------------------------------------------------------------------------------------------ the holder

HOST = socket.gethostname()


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _start_ticks(pid: int) -> int | None:
  """When a process started (clock ticks since boot, Linux), to tell a process id reused by another process."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
  return int(fields[19]) if len(fields) > 19 else None


def _running(pid: int, started: int | None) -> bool:
  """Whether process `pid` on this host is the one that wrote a hold (alive, not a zombie, not a reused id)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: alive
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text()
    if state[state.rfind(")") + 2:].startswith("Z"):  # killed, not yet reaped by its parent
      return False
  except OSError:
    pass
  return started is None or _start_ticks(pid) in (None, started)


@dataclasses.dataclass
class Holder:
  """What the hold file says."""
  program: str
  host: str
  pid: int
  since: float       # seconds since the epoch
  heartbeat: float
  token: str         # tells this hold from any other, even of the same process
  started: int | None = None   # the process's start time on its host (`_start_ticks`)
  processes: int = 1           # processes of the run (process 0 holds for all)

  @classmethod
  def mine(cls, program: str, processes: int = 1) -> Holder:
    now = time.time()
    return cls(program, HOST, os.getpid(), now, now, uuid.uuid4().hex, _start_ticks(os.getpid()), processes)

  def encode(self) -> bytes:
    return json.dumps({**dataclasses.asdict(self), "since_utc": _utc(self.since),
                       "heartbeat_utc": _utc(self.heartbeat)}, indent=2).encode()

  @classmethod
  def decode(cls, data: bytes | None) -> Holder | None:
    try:
      d = json.loads(data)
      return cls(str(d["program"]), str(d["host"]), int(d["pid"]), float(d["since"]), float(d["heartbeat"]),
                 str(d["token"]), None if d.get("started") is None else int(d["started"]),
                 int(d.get("processes", 1)))
    except (TypeError, ValueError, KeyError, UnicodeDecodeError):
      return None

  def describe(self) -> str:
    run = f"a {self.processes}-process run, " if self.processes > 1 else ""
    return f"`stmem {self.program}` ({run}host {self.host}, process {self.pid}, since {_utc(self.since)})"

  def stale(self, after: float = STALE_AFTER_S) -> str | None:
    """Why this hold is stale, or None while its run may be alive (see the module docstring for the rule)."""
    if self.host == HOST:
      return None if _running(self.pid, self.started) else f"process {self.pid} on {self.host} no longer runs"
    age = time.time() - self.heartbeat
    if age > after:
      return f"its heartbeat is {age / 60:.0f} minutes old (a hold from another host is stale after {after / 60:.0f})"
    return None


class Hold:
  """A hold this process has taken; `release()` gives it back. A thread rewrites its heartbeat."""

  def __init__(self, store: Store, holder: Holder, *, heartbeat_s: float = HEARTBEAT_S):
    self.store, self.holder = store, holder
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="stmem-hold-heartbeat", daemon=True)
    self._thread.start()

  def _ours(self) -> bool:
    current = Holder.decode(self.store.read(HOLD_FILE))
    return current is not None and current.token == self.holder.token

  def _beat(self, every: float) -> None:
    while not self._stop.wait(every):
      try:
        if not self._ours():  # taken over (judged stale from another host): not ours to rewrite
          return
        self.holder.heartbeat = time.time()
        self.store.write(HOLD_FILE, self.holder.encode())
      except OSError:
        pass  # a missed heartbeat is retried at the next one

  def release(self) -> None:
    self._stop.set()
    self._thread.join(timeout=10)
    if self._ours():
      self.store.remove(HOLD_FILE)


def take(workdir: str | pathlib.Path, program: str, *, log: Callable[[str], None] = print,
         store: Store | None = None, processes: int = 1, heartbeat_s: float = HEARTBEAT_S) -> Hold:
  """Take the workdir's hold for `program`, or raise UsageError naming the live holder; a stale hold is taken over
  (said through `log`)."""
  store = store if store is not None else store_for(workdir)
  mine = Holder.mine(program, processes)
  unreadable_since = None
  for _ in range(200):
    if store.create_exclusive(HOLD_FILE, mine.encode()):
      return Hold(store, mine, heartbeat_s=heartbeat_s)
    data = store.read(HOLD_FILE)
    if data is None:  # released meanwhile: try again
      continue
    holder = Holder.decode(data)
    if holder is None:  # being written (a filesystem without hard links), or damaged
      unreadable_since = unreadable_since or time.monotonic()
      if time.monotonic() - unreadable_since > 2.0:
        raise UsageError(f"{store.where(HOLD_FILE)} is not a readable hold: if no run uses workdir {workdir}, "
                         f"remove that file and start again")
      time.sleep(0.05)
      continue
    reason = holder.stale()
    if reason is None:
      raise UsageError(f"workdir {workdir} is held by {holder.describe()}: wait for that run to end or stop it, or "
                       f"pass another --workdir")
    if _take_over(store, data, mine):
      log(f"taking over the stale hold on {workdir} of {holder.describe()}: {reason}")
      return Hold(store, mine, heartbeat_s=heartbeat_s)
    time.sleep(0.05)  # another run is taking it over at this moment: look again
  raise UsageError(f"workdir {workdir}: could not take its hold ({store.where(HOLD_FILE)} kept changing); is another "
                   f"run starting on it?")


def _take_over(store: Store, seen: bytes, mine: Holder) -> bool:
  """Replace the stale hold `seen` by `mine`, unless another run replaced it first: the one that creates the
  takeover file compares, removes and creates; the others try again."""
  if not store.create_exclusive(TAKEOVER_FILE, mine.encode()):
    other = Holder.decode(store.read(TAKEOVER_FILE))
    if other is not None and other.stale(after=TAKEOVER_STALE_S):  # its taker was killed while taking over
      store.remove(TAKEOVER_FILE)
    return False
  try:
    if store.read(HOLD_FILE) != seen:
      return False
    store.remove(HOLD_FILE)
    return store.create_exclusive(HOLD_FILE, mine.encode())
  finally:
    store.remove(TAKEOVER_FILE)


# ------------------------------------------------------------------------------------------------------ the program

def _legacy_program(store: Store) -> str | None:
  """The program of a local workdir written before `program.json` existed, from what it holds."""
  if not isinstance(store, LocalStore):
    return None
  if (store.folder / "train_state").is_dir():
    return "finetune"
  if (store.folder / "config.json").is_file() or (store.folder / "checkpoints").is_dir():
    return "pretrain"
  return None


def claim(workdir: str | pathlib.Path, program: str, *, store: Store | None = None) -> None:
  """The workdir belongs to `program` (recorded in `program.json` by its first run); another program's workdir is a
  usage error naming it."""
  store = store if store is not None else store_for(workdir)
  data = store.read(PROGRAM_FILE)
  owner = None
  if data is not None:
    try:
      owner = str(json.loads(data)["program"])
    except (TypeError, ValueError, KeyError, UnicodeDecodeError):
      raise UsageError(f"{store.where(PROGRAM_FILE)} is not readable: it names the program that owns workdir "
                       f"{workdir}; restore it or pass another --workdir") from None
  else:
    owner = _legacy_program(store)
  if owner is not None and owner != program:
    raise UsageError(f"workdir {workdir} belongs to `stmem {owner}`: `stmem {program}` would mix its checkpoints and "
                     f"metrics with it; pass another --workdir")
  if data is None:
    store.create_exclusive(PROGRAM_FILE, json.dumps({"program": program, "since_utc": _utc(time.time())}).encode())


# ------------------------------------------------------------------------------------------------------ for programs

@contextlib.contextmanager
def holding(workdir: str | pathlib.Path, program: str, *, log: Callable[[str], None] | None = None):
  """Hold the workdir for `program` while the block runs (every process of a run enters it; process 0 holds)."""
  import jax
  if log is None:
    from stmem import console
    log = console.Log(program)
  workdir = str(workdir) if "://" in str(workdir) else pathlib.Path(workdir).expanduser().absolute()
  hold, error = None, None
  if jax.process_index() == 0:
    try:
      hold = take(workdir, program, log=log, processes=jax.process_count())
      claim(workdir, program)
    except Exception as e:  # noqa: BLE001 - raised below, after the other processes have heard of it
      error = e
      if hold is not None:
        hold.release()
        hold = None
  if jax.process_count() > 1:  # the others learn whether process 0 could hold the workdir
    import numpy as np
    from jax.experimental import multihost_utils
    held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not held and error is None:
      error = UsageError(f"workdir {workdir}: process 0 could not take its hold (its message says why)")
  if error is not None:
    raise error
  try:
    yield hold
  finally:
    if hold is not None:
      hold.release()


def held(program: str):
  """Decorate a program's `run(config, workdir, **kwargs)` to hold its workdir while it runs (`holding`)."""
  def wrap(run):
    @functools.wraps(run)
    def held_run(config, workdir, *args, **kwargs):
      with holding(workdir, program):
        return run(config, workdir, *args, **kwargs)
    return held_run
  return wrap
