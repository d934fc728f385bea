"""Checkpoints: orbax CheckpointManager saving, per step, the parameters, the optimiser state, the data iterator
state and a JSON `meta` item (config, model config, preprocessing contract, fingerprint).

Items are separate so that downstream programs restore the parameters alone, into whatever mesh they run on, and
nothing in a checkpoint is ever unpickled: arrays go through tensorstore, everything else is JSON.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import pathlib
import re
import shutil
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines import errors
from data_pipelines.contract import Contract
from data_pipelines.errors import DataError, UsageError
from stmem import workdir as workdir_lib
from stmem.models.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"


def _abstract(tree, shardings=None):
  """ShapeDtypeStructs for a tree, with the target shardings (restore into any mesh).

  Without shardings every array goes to this process's first device: left unset, orbax would reuse the sharding
  recorded at save time and refuse a checkpoint written on another topology (8 devices saved, 1 restoring).
  """
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class NotACheckpoint(DataError, FileNotFoundError):
  """A path holding no stmem checkpoint: a DataError (one line, exit code 1), still the FileNotFoundError it was."""


def resolve(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """A workdir, its `checkpoints/` folder, or one step folder -> (checkpoints folder, step or None for latest).
  Local, or on a bucket (gs://, `stmem.workdir`)."""
  path = workdir_lib.resolve(path)
  if (path / CHECKPOINT_DIR).is_dir():
    return path / CHECKPOINT_DIR, None
  if path.name.isdigit() and (path / "meta").exists():
    return path.parent, int(path.name)
  if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
    return path, None
  weights = sorted(p.name for p in path.glob("*") if p.suffix in (".pth", ".pt", ".safetensors", ".npz", ".onnx",
                                                                      ".stablehlo")) if path.is_dir() else []
  hint = ""
  if any(w.endswith((".onnx", ".stablehlo")) for w in weights):
    hint = "; a graph export runs without stmem (onnxruntime, jax.export): export with --format hub to load it here"
  elif weights:
    hint = f"; for a weights file ({weights[0]}) run `stmem convert --reference {path / weights[0]} --out DIR`"
  raise NotACheckpoint(f"{path}: no stmem checkpoint here (expected a workdir, its {CHECKPOINT_DIR}/ folder, "
                          f"a step folder or an `stmem export --format hub` folder){hint}")


EXPORT_FORMAT = "stmem-export-1"
EXPORT_WEIGHTS = (".safetensors", ".npz")  # the exports stmem loads as checkpoints (graphs run without it)


def export_config(path: str | pathlib.Path) -> dict | None:
  """The `config.json` of a folder written by `stmem export` with a weights file stmem reads (safetensors or npz),
  or None for anything else. Such a folder is a checkpoint holding an encoder only: `stmem probe`, `embed`,
  `export` and `convert` take it as one."""
  path = workdir_lib.resolve(path)
  file = path / "config.json"
  if not path.is_dir() or not file.is_file():
    return None
  try:
    config = _json(file)
  except ValueError as e:
    raise DataError(f"{file}: not readable JSON ({e}); restore it from where the export came from") from None
  if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
    return None
  weights = config.get("weights")
  weights = weights.get("file", "") if isinstance(weights, dict) else ""
  if not isinstance(weights, str) or pathlib.Path(weights).suffix not in EXPORT_WEIGHTS:
    return None
  if pathlib.Path(weights).name != weights or not (path / weights).is_file():  # the file stays inside the folder
    raise DataError(f"{file} names the weights file {weights!r}, which is not in {path}")
  missing = [k for k in ("model", "contract", "fingerprint") if k not in config]
  if missing:
    raise DataError(f"{file}: an stmem export's config without {', '.join(missing)}")
  training = config.get("training")
  if training is not None and not (isinstance(training, dict) and isinstance(training.get("config") or {}, dict)):
    raise DataError(f"{file}: its `training` entry is not an object holding a config")
  _check_meta(_export_meta(path, config), file)
  return config


_MAX_JSON_BYTES = 64 << 20  # a meta or export config is kilobytes; a larger file is not one


def _json(file: pathlib.Path) -> Any:
  """The JSON value in `file`; ValueError (with the reason) when it is not UTF-8 JSON a reader should trust: also
  nesting too deep for the parser and integers beyond Python's digit limit, which json raises as other types."""
  stat = file.stat()  # a local path's os.stat_result, or an etils.epath.Path's StatResult on a bucket
  if getattr(stat, "st_size", getattr(stat, "length", 0)) > _MAX_JSON_BYTES:
    raise ValueError(f"more than {_MAX_JSON_BYTES} bytes")
  with file.open("rb") as f:
    raw = f.read()
  try:
    return json.loads(raw.decode("utf-8"))
  except RecursionError:
    raise ValueError("nested too deeply") from None


def _check_meta(meta: dict, file: pathlib.Path) -> None:
  """Refuse (DataError naming `file`) a meta whose model config, contract or step cannot be what it says: the model
  config must build a ModelConfig, the contract a Contract; found here rather than as a TypeError in a program."""
  if not isinstance(meta.get("model"), dict):
    raise DataError(f"{file}: its model config is not an object")
  try:
    ModelConfig(**meta["model"])
  except Exception as e:  # noqa: BLE001 - any failure to build the config from these values is the file's
    raise DataError(f"{file}: its model config is not one this stmem builds ({type(e).__name__}: "
                    f"{str(e)[:200]})") from None
  Contract.from_dict(meta.get("contract"), where=str(file))
  step = meta.get("step", 0)
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise DataError(f"{file}: its step {step!r} is not a whole number >= 0")


def _export_meta(path: pathlib.Path, config: dict) -> dict:
  training = config.get("training") or {}
  return {"model": config["model"], "contract": config["contract"], "encoder_only": True,
          "step": training.get("step") or 0, "config": training.get("config") or {},
          "origin": f"stmem export:{path.name}", "fingerprint": config["fingerprint"]}


def _load_export(path: pathlib.Path, config: dict, dtype: str | None):
  """The encoder of an export folder and its meta; the weights must give the fingerprint config.json records."""
  from flax import nnx

  from stmem import reference_weights
  from stmem.models import pretraining_model

  meta = _export_meta(path, config)
  weights = path / config["weights"]["file"]
  if weights.suffix == ".safetensors":
    from safetensors.numpy import load_file
    try:
      state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError) for bad files
      raise DataError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  else:
    state = reference_weights.load_reference_file(weights)
  errors.check_finite(state, str(weights))
  cfg = model_config_from_meta(meta)
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  encoder = pretraining_model(cfg, rngs=nnx.Rngs(0)).encoder
  conversion = reference_weights.from_reference({k: np.asarray(v, np.float32) for k, v in state.items()})
  try:
    reference_weights.apply(encoder, conversion)
  except ValueError as e:
    raise DataError(f"{weights}: does not fit the model config.json describes ({e})") from None
  got = fingerprint({"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param))})
  if got != config["fingerprint"]:
    raise DataError(f"{weights}: its weights have the fingerprint {got}, not the {config['fingerprint']} that "
                    f"config.json records: the file was changed or belongs to another export")
  return encoder, meta


def _check_json_item(step_dir: pathlib.Path, item: str) -> None:
  """Refuse (DataError naming the file) a JSON item of a step whose file is not JSON: orbax's own error names
  neither the step nor the file."""
  folder = step_dir / item
  files = [f for f in sorted(folder.glob("*")) if f.is_file() and f.name != "commit_success.txt"] \
    if folder.is_dir() else []
  if not files:
    raise DataError(f"checkpoint step {step_dir.name}: {folder} is missing or empty; resume from another step")
  for f in files:
    try:
      _json(f)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
      raise DataError(f"checkpoint step {step_dir.name}: {f} is not readable JSON ({e}); the step is corrupt: "
                      "use another step") from None


@contextlib.contextmanager
def quiet_abandoned_reads(settle_s: float = 3.0):
  """Around a restore: silence the echoes of its abandoned reads, and only those, then put the process's hooks back.

  When one array of a step cannot be read, orbax's event loop stops while its other reads are still in flight; as
  they finish, Python prints tracebacks after the one-line message that named the step: "Exception ignored" for
  each abandoned read (the same tensorstore error again, through sys.unraisablehook) and "Event loop is closed"
  from tensorstore's callback thread (through sys.excepthook). Seen in 2 of 8 concurrent runs, and once still after
  a 1 s wait on a busy 2-core machine. The echoes come after the error, so a failed restore waits `settle_s`
  (collecting garbage, which is when a never-read error is reported) before the hooks are put back; a restore that
  succeeds puts them back at once. A hook someone else installed meanwhile is left in place.
  """
  def echo(exc: BaseException | None) -> bool:
    text = str(exc)
    return "Event loop is closed" in text or "Encountered error while reading array" in text

  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def quiet_unraisable(u):
    if not echo(u.exc_value):
      unraisable(u)

  def quiet_excepthook(kind, value, tb):
    if not echo(value):
      excepthook(kind, value, tb)

  sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
  try:
    yield
  except Exception:
    deadline = time.monotonic() + settle_s
    while True:
      gc.collect()
      if time.monotonic() >= deadline:
        break
      time.sleep(0.05)
    raise
  finally:
    if sys.unraisablehook is quiet_unraisable:
      sys.unraisablehook = unraisable
    if sys.excepthook is quiet_excepthook:
      sys.excepthook = excepthook


def unreadable(step_dir: pathlib.Path, e: BaseException) -> DataError:
  """A DataError naming the step, the item folder and the array that orbax / tensorstore could not read."""
  text = str(e)
  folders = re.findall(r"'path': '(/[^']+)'", text)  # tensorstore spells out the item folder and the array path
  arrays = [a.rstrip("/") for a in re.findall(r"'path': '([^'/][^']*)'", text)]
  where = folders[-1].rstrip("/") if folders else str(step_dir)
  what = f"array {arrays[-1]}" if arrays else (text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__)
  return DataError(f"checkpoint step {step_dir.name}: cannot read {where} ({what}): its files are truncated, missing "
                   "or corrupt; use another step")


class _WriteEchoes:
  """The echoes of a save that found no room, silenced (one instance, `WRITE_ECHOES`).

  When a write of an asynchronous save fails (a full disk, a file-size limit), orbax logs the failure from each of
  its threads (absl, with tracebacks), asyncio logs every abandoned write as "Task exception was never retrieved", and
  tensorstore's callbacks print "Event loop is closed" tracebacks (sys.excepthook) for the writes still in flight:
  hundreds of lines, before and after the one-line message that `Checkpointer` raises when the save is awaited. Those
  records, and only those, are dropped: a filter on the absl and asyncio loggers while a Checkpointer is open, and,
  from the first such failure on, process hooks that drop those tracebacks. After a failure both stay until the
  process ends (the abandoned writes keep echoing as they are collected, up to interpreter exit); otherwise the last
  `release` removes the filter, and the process's hooks are never touched.
  """

  LOGGERS = ("absl", "asyncio")

  def __init__(self):
    self.users, self.failed, self.installed = 0, False, False
    self._lock = threading.Lock()

  @staticmethod
  def echo(exc: BaseException | None) -> bool:
    return (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)) or errors.no_space(exc) is not None

  def filter(self, record: logging.LogRecord) -> bool:
    """logging's Filter protocol: False drops the record."""
    exc = record.exc_info[1] if record.exc_info else None
    if errors.no_space(exc) is not None or errors.no_space(RuntimeError(record.getMessage())) is not None:
      self.fail()
      return False
    return not self.echo(exc)

  def fail(self) -> None:
    """A save found no room: from now on, drop its tracebacks printed through the process's hooks too."""
    with self._lock:
      if self.failed:
        return
      self.failed = True
      unraisable, excepthook = sys.unraisablehook, sys.excepthook
      sys.unraisablehook = lambda u: None if self.echo(u.exc_value) else unraisable(u)
      sys.excepthook = lambda kind, value, tb: None if self.echo(value) else excepthook(kind, value, tb)

  def acquire(self) -> None:
    with self._lock:
      self.users += 1
      if not self.installed:
        for name in self.LOGGERS:
          logging.getLogger(name).addFilter(self)
        self.installed = True

  def release(self) -> None:
    with self._lock:
      self.users = max(self.users - 1, 0)
      if self.users or self.failed or not self.installed:
        return
      for name in self.LOGGERS:
        logging.getLogger(name).removeFilter(self)
      self.installed = False


WRITE_ECHOES = _WriteEchoes()


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager: asynchronous saves every `every` steps, keep the last `keep`.

  A save that finds no room (a full disk, a quota, a file-size limit) raises a DataError naming the step, the folder
  and the newest step left intact, wherever the failure surfaces: in `save` itself, or, for an asynchronous save, in
  the next `save`, `wait` or `close`. Its partial folder is removed (orbax writes a step into a temporary folder and
  renames it when complete, so finished steps are never touched) and its echoes are silenced (`_WriteEchoes`).
  """

  def __init__(self, directory: str | pathlib.Path, *, every: int = 1000, keep: int = 3, async_save: bool = True):
    self.directory = workdir_lib.resolve(directory)  # orbax writes a gs:// one through tensorstore's gcs driver
    self.every = every
    self.async_save = async_save
    self.in_flight: int | None = None  # the step of an asynchronous save not yet awaited
    self.failure: DataError | None = None
    self.failed_step = -1
    WRITE_ECHOES.acquire()
    try:
      self.manager = ocp.CheckpointManager(
        self.directory,
        # The interval is decided here, not by orbax (which also saves the first step it sees).
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                             enable_async_checkpointing=async_save, create=True))
    except BaseException:
      WRITE_ECHOES.release()
      raise
    self.closed = False

  def _awaiting(self, step: int, fn):
    """fn() (a save, or the wait for one), a failure to find room turned into the DataError naming `step`."""
    if self.failure is not None:
      raise self.failure
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - tensorstore reports a full disk as a ValueError, epath as an OSError
      reason = errors.no_space(e)
      if reason is None:
        raise
      WRITE_ECHOES.fail()
      self.failure, self.failed_step = self._no_room(step, reason), step
      raise self.failure from e

  def _no_room(self, step: int, reason: str) -> DataError:
    try:  # the finished steps on disk (orbax names a step's folder by its number only once it is complete)
      intact = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) != step]
    except OSError:
      intact = []
    kept = (f"the checkpoint of step {max(intact)} is intact; free space and run again to resume from it" if intact
            else "no earlier checkpoint is there; free space and run again")
    return DataError(f"{reason} while writing checkpoint step {step} in {self.directory}; {kept}")

  def _remove_partial(self, step: int) -> None:
    """The temporary folder of a save that failed: never a finished step (orbax renames a step when complete)."""
    if jax.process_index() != 0:
      return
    for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      if isinstance(partial, pathlib.Path):
        shutil.rmtree(partial, ignore_errors=True)
      else:  # an etils.epath.Path on a bucket (orbax commits there by a marker file, so a partial step is rare)
        with contextlib.suppress(Exception):
          partial.rmtree()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, params, opt_state=None, data_state: dict | None = None, meta: dict,
           force: bool = False, extra_items: dict[str, Any] | None = None) -> bool:
    if not force and step % self.every:
      return False
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    # Further array trees (a converted fine-tuned head) as their own items: restoring `params` never needs them.
    for name, tree in (extra_items or {}).items():
      if name in ("params", "meta", "opt_state", "data_state"):
        raise ValueError(f"extra item name {name!r} is reserved")
      items[name] = ocp.args.StandardSave(tree)
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_state is not None:
      items["data_state"] = ocp.args.JsonSave(data_state)
    self.wait()  # the previous save's failure is reported as that step's (orbax would raise it here as this one's)
    saved = self._awaiting(step, lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=force))
    if saved and self.async_save:
      self.in_flight = step
    return saved

  def restore(self, step: int, *, params, opt_state=None, param_shardings=None, opt_shardings=None,
              data_state: bool = True, extra_items: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Restore into the structure (and shardings) of the given templates; returns a dict of the items.
    `extra_items`: {name: (template, shardings)} of further array items saved with the step (`save`)."""
    items = {"params": ocp.args.StandardRestore(_abstract(params, param_shardings)), "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state, opt_shardings))
    for name, (template, shardings) in (extra_items or {}).items():
      items[name] = ocp.args.StandardRestore(_abstract(template, shardings))
    step_dir = self.directory / str(step)
    names = ["meta"]
    if data_state and (step_dir / "data_state").exists():
      items["data_state"] = ocp.args.JsonRestore()
      names.append("data_state")
    for name in names:
      _check_json_item(step_dir, name)
    try:
      with quiet_abandoned_reads():
        return dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # noqa: BLE001 - tensorstore raises a bare Exception for truncated or missing files
      raise unreadable(step_dir, e) from e

  def restore_latest_readable(self, log=None, meta: dict | None = None,
                              **kwargs) -> tuple[int, dict[str, Any] | None]:
    """(step, items) of the newest checkpoint that reads back (`restore` arguments), or (0, None) when there is none.

    A step that does not read (DataError) is moved aside as `<step>.unreadable` (kept for inspection, never deleted;
    orbax ignores the name), reported through `log`, and the next older step is tried: a run resumes from the newest
    readable checkpoint instead of failing. When steps exist but none reads, that is an error (DataError): starting
    afresh over them would be a silent loss of the whole run.

    A step whose files read back but hold another model (its stored shapes differ from the templates': the config
    changed) is not unreadable: that is a UsageError naming the differing keys, and nothing is moved. `meta`, the
    meta this run would save (`make_meta`), lets it name config keys (model.variant tiny -> small) rather than
    parameter shapes.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
      # The parameters' shapes first (metadata only): another model is refused before any array read fails.
      differences = self.mismatch(step, meta, params=kwargs["params"])
      if not differences:
        try:
          return step, self.restore(step, **kwargs)
        except DataError as e:
          differences = self.mismatch(step, meta, **kwargs)
          error = e
      if differences:
        raise UsageError(f"{self.directory / str(step)} holds another model than this config's "
                         f"({'; '.join(differences)}); nothing was moved: resume with the config it was written "
                         f"with, or pass another --workdir")
      problems.append(str(error))
      if log is not None:
        log(f"skipping unreadable checkpoint: {error.message.split('; use another step')[0]}; moved aside as "
            f"{self.directory / f'{step}.unreadable'}, trying the step before")
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(self.directory / f"{step}.unreadable")
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"stmem checkpoint {step} moved aside")
      self.manager.reload()
    if problems:
      raise DataError(f"{self.directory}: no readable checkpoint among steps {steps} (first: {problems[0]}); move "
                      "the folder away to start afresh")
    return 0, None

  def mismatch(self, step: int, meta: dict | None = None, *, params, opt_state=None,
               extra_items: dict[str, tuple[Any, Any]] | None = None, **_) -> list[str]:
    """How a step's stored arrays differ from the templates' (`restore` arguments), as `key old -> new` lines (config
    keys when `meta` and the step's meta both carry a config, else the model's fields, else array shapes); [] when
    they agree or the step's metadata does not read (then it is unreadable, not another model)."""
    step_dir = self.directory / str(step)
    items = {"params": params, "opt_state": opt_state,
             **{name: template for name, (template, _) in (extra_items or {}).items()}}
    shapes = []
    try:
      for name, template in items.items():
        if template is None or not (step_dir / name).is_dir():
          continue
        stored = _shapes(ocp.StandardCheckpointHandler().metadata(step_dir / name).tree)
        wanted = _shapes(template)
        for key in sorted(set(stored) | set(wanted)):
          if stored.get(key) != wanted.get(key):
            shapes.append(f"{name}/{key} {_shape(stored.get(key))} -> {_shape(wanted.get(key))}")
    except Exception:  # noqa: BLE001 - metadata that does not read: the step is unreadable, not another model
      return []
    if not shapes:
      return []
    saved = _saved_meta(step_dir)
    if saved is not None and meta is not None:
      old, new = _flat(saved.get("config") or {}), _flat(meta.get("config") or {})
      keys = [k for k in sorted(set(old) | set(new)) if k.startswith("model.") and old.get(k) != new.get(k)]
      if keys:
        return [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys]
      old, new = saved.get("model") or {}, meta.get("model") or {}
      keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
      if keys:
        return [f"model {k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys]
    return shapes[:3] + ([f"{len(shapes) - 3} more arrays"] if len(shapes) > 3 else [])

  def wait(self):
    """Until the asynchronous save in flight is on disk (a DataError if it found no room)."""
    step, self.in_flight = self.in_flight, None
    if step is None:
      if self.failure is not None:
        raise self.failure
      self.manager.wait_until_finished()
    else:
      self._awaiting(step, self.manager.wait_until_finished)

  def close(self):
    """Wait for the save in flight and let go of the manager. After a save that found no room: quietly (that
    failure has been raised already; orbax raises it again here), and its partial folder is removed."""
    if self.closed:
      return
    self.closed = True
    try:
      if self.failure is None:
        self.wait()
        self.manager.close()
    finally:
      if self.failure is not None:
        try:
          self.manager.close()
        except Exception:  # noqa: BLE001 - the same failure again, reported already
          pass
        self._remove_partial(self.failed_step)
      WRITE_ECHOES.release()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a tree of arrays or array metadata (paths spelt alike for dicts, lists and named tuples)."""
  def key(entry) -> str:
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {"/".join(key(k) for k in path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _shape(shape) -> str:
  return "absent" if shape is None else "x".join(map(str, shape)) or "scalar"


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict, config: dict) -> list[str]:
  """The options in which a checkpoint's recorded config (`meta["config"]`) and `config` (both as JSON) differ, each
  as `key: saved -> now` by its dotted name; [] when they are the same."""
  a, b = _flat(saved), _flat(config)
  missing = "(unset)"
  return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(a.keys() | b.keys())
          if a.get(k, missing) != b.get(k, missing)]


def _saved_meta(step_dir: pathlib.Path) -> dict | None:
  """A step's JSON meta, or None when it does not read."""
  for f in sorted((step_dir / "meta").glob("*")):
    if f.is_file() and f.name != "commit_success.txt":
      try:
        meta = json.loads(f.read_text())
      except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
      return meta if isinstance(meta, dict) else None
  return None


def _step(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """A checkpoint folder and step: the step the path names, or the latest finished one."""
  directory, step = resolve(path)
  if step is None:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "meta").exists())
    if not steps:
      raise NotACheckpoint(f"{directory}: no finished checkpoint")
    step = steps[-1]
  return directory, step


def read_meta(path: str | pathlib.Path) -> tuple[dict, pathlib.Path, int]:
  """The JSON meta of a model checkpoint (latest step unless the path names one), its folder and step. An `stmem
  export` folder (`export_config`) reads as an encoder-only checkpoint at the step it was exported from."""
  exported = export_config(path)
  if exported is not None:
    folder = workdir_lib.resolve(path)
    meta = _export_meta(folder, exported)
    return meta, folder, int(meta["step"])
  directory, step = _step(path)
  meta_dir = directory / str(step) / "meta"
  _check_json_item(directory / str(step), "meta")
  for f in sorted(meta_dir.glob("*")):
    if f.is_file() and f.name != "commit_success.txt":
      meta = _json(f)
      if not isinstance(meta, dict) or "model" not in meta or "contract" not in meta:
        raise DataError(f"checkpoint step {step}: {f} is not an stmem checkpoint's meta (no model or contract)")
      _check_meta(meta, f)
      return meta, directory, step
  raise DataError(f"checkpoint step {step}: {meta_dir} holds no meta file")


FINGERPRINT_DEFINITION = ("the first 16 hex digits of a SHA-256 over the encoder's parameters only (no decoder, no "
                          "head), each as its path inside the encoder followed by its float32 bytes, in sorted path "
                          "order")


def fingerprint(params) -> str:
  """The one fingerprint of an encoder's weights (FINGERPRINT_DEFINITION), from the parameters of a whole model
  (a dict with an `encoder` entry) or of an encoder alone: the same weights give the same fingerprint whether they
  come from a pretraining checkpoint, an export or a conversion."""
  if isinstance(params, dict) and "encoder" in params:
    params = params["encoder"]
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf, dtype=np.float32)).tobytes())
  return h.hexdigest()[:16]


def model_config_from_meta(meta: dict) -> ModelConfig:
  return ModelConfig(**meta["model"])


def contract_from_meta(meta: dict) -> Contract:
  return Contract.from_dict(meta["contract"])


def load_model(path: str | pathlib.Path, *, encoder_only: bool = False, shardings=None, dtype: str | None = None):
  """Restore a model from any stmem checkpoint (pretraining, converted reference, fine-tuned).

  Returns (model, meta): `model` is the pretraining model of the checkpoint's method (`StMem`, or `MaskedAutoencoder`
  for MTAE / MLAE, from the `method` in its model config), or its encoder when `encoder_only`. Only the parameters
  are read.
  `shardings`, a tree like the parameters' pure dict, places them on any mesh (default: the first device).
  A checkpoint that holds only an encoder (a converted encoder-only reference file) restores with encoder_only=True.
  """
  from flax import nnx

  from stmem.models import pretraining_model

  exported = export_config(path)
  if exported is not None:
    if not encoder_only:
      raise ValueError(f"{path}: an stmem export holds an encoder only; load it with encoder_only=True")
    encoder, meta = _load_export(workdir_lib.resolve(path), exported, dtype)
    if shardings is not None:
      state = nnx.state(encoder, nnx.Param)
      placed = jax.device_put(nnx.to_pure_dict(state), shardings.get("encoder", shardings)
                              if isinstance(shardings, dict) else shardings)
      nnx.replace_by_pure_dict(state, placed)
      nnx.update(encoder, state)
    return encoder, meta
  meta, directory, step = read_meta(path)
  cfg = model_config_from_meta(meta)
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  abstract_model = nnx.eval_shape(lambda: pretraining_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, param_state = nnx.split(abstract_model, nnx.Param)
  template = nnx.to_pure_dict(param_state)
  saved_encoder_only = meta.get("encoder_only", False)
  if saved_encoder_only:
    if not encoder_only:
      raise ValueError(f"{directory}/{step}: this checkpoint holds an encoder only; load it with encoder_only=True")
    template = {"encoder": template["encoder"]}
    if isinstance(shardings, dict) and "encoder" in shardings:  # shardings for the whole model: keep the encoder's
      shardings = {"encoder": shardings["encoder"]}
  mngr = Checkpointer(directory, async_save=False)
  try:
    restored = mngr.restore(step, params=template, param_shardings=shardings, data_state=False)["params"]
  except DataError:
    try:  # closing may re-raise the same read failure: the DataError that names the step is the one to report
      mngr.close()
    except Exception:  # noqa: BLE001
      pass
    raise
  mngr.close()
  # Weights holding NaN or inf make every feature NaN: refused here, naming the parameters, not found downstream.
  errors.check_finite({jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]},
                      f"checkpoint {directory}/{step}", is_finite=lambda a: bool(jnp.isfinite(a).all()))
  if saved_encoder_only:  # the decoder is filled with zeros; only the encoder is returned
    full = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(param_state))
    full["encoder"] = restored["encoder"]
  else:
    full = restored
  nnx.replace_by_pure_dict(param_state, full)
  model = nnx.merge(graphdef, param_state)
  return (model.encoder if encoder_only else model), meta


def make_meta(model_cfg: ModelConfig, contract: Contract, *, config: dict | None = None, step: int = 0,
              encoder_only: bool = False, origin: str = "stmem pretrain", extra: dict | None = None) -> dict:
  """The JSON `meta` item every stmem checkpoint carries: what the model is and what its inputs mean."""
  import dataclasses
  meta = {"format": "stmem-checkpoint-1", "model": dataclasses.asdict(model_cfg), "contract": contract.to_dict(),
          "config": config or {}, "step": int(step), "encoder_only": bool(encoder_only), "origin": origin}
  meta.update(extra or {})
  return meta


def save_params(directory: str | pathlib.Path, params, meta: dict, step: int = 0,
                extra_items: dict[str, Any] | None = None) -> pathlib.Path:
  """Write a parameters-only checkpoint (converted or exported encoders, fine-tuned models) synchronously."""
  ckpt = Checkpointer(directory, every=1, keep=1000, async_save=False)
  try:
    ckpt.save(step, params=params, meta=meta, force=True, extra_items=extra_items)
  finally:
    ckpt.close()
  return ckpt.directory / str(step)


def read_item(path: str | pathlib.Path, name: str) -> dict:
  """One extra array item of a checkpoint (e.g. `head`, or a training state's `best`), as numpy arrays; KeyError when
  the checkpoint has none. Any checkpoint of this project's Checkpointer: its meta need not describe a model."""
  directory, step = _step(path)
  if not (directory / str(step) / name).is_dir():
    raise KeyError(f"{directory}/{step}: no item {name!r}")
  mngr = ocp.CheckpointManager(directory, item_handlers={name: ocp.StandardCheckpointHandler()})
  try:
    shapes = mngr.item_metadata(step)[name].tree
    template = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), shapes,
                            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    restored = mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(_abstract(template))}))
  finally:
    mngr.close()
  return jax.tree.map(np.asarray, dict(restored)[name])
