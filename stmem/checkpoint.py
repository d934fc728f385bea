"""Checkpoints: orbax CheckpointManager saving, per step, the parameters, the optimiser state, the data iterator
state and a JSON `meta` item (config, model config, preprocessing contract, fingerprint).

Items are separate so that downstream programs restore the parameters alone, into whatever mesh they run on, and
nothing in a checkpoint is ever unpickled: arrays go through tensorstore, everything else is JSON.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines.contract import Contract
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


def resolve(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """A workdir, its `checkpoints/` folder, or one step folder -> (checkpoints folder, step or None for latest)."""
  path = pathlib.Path(path).expanduser().absolute()
  if (path / CHECKPOINT_DIR).is_dir():
    return path / CHECKPOINT_DIR, None
  if path.name.isdigit() and (path / "meta").exists():
    return path.parent, int(path.name)
  if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
    return path, None
  raise FileNotFoundError(f"{path}: no stmem checkpoint here (expected a workdir, its {CHECKPOINT_DIR}/ folder, "
                          f"or a step folder)")


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager: asynchronous saves every `every` steps, keep the last `keep`."""

  def __init__(self, directory: str | pathlib.Path, *, every: int = 1000, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    self.manager = ocp.CheckpointManager(
      self.directory,
      # The interval is decided here, not by orbax (which also saves the first step it sees).
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           enable_async_checkpointing=async_save, create=True))

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
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, *, params, opt_state=None, param_shardings=None, opt_shardings=None,
              data_state: bool = True) -> dict[str, Any]:
    """Restore into the structure (and shardings) of the given templates; returns a dict of the items."""
    items = {"params": ocp.args.StandardRestore(_abstract(params, param_shardings)), "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state, opt_shardings))
    if data_state and (self.directory / str(step) / "data_state").exists():
      items["data_state"] = ocp.args.JsonRestore()
    return dict(self.manager.restore(step, args=ocp.args.Composite(**items)))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def read_meta(path: str | pathlib.Path) -> tuple[dict, pathlib.Path, int]:
  """The JSON meta of a checkpoint (latest step unless the path names one), its folder and step."""
  directory, step = resolve(path)
  if step is None:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "meta").exists())
    if not steps:
      raise FileNotFoundError(f"{directory}: no finished checkpoint")
    step = steps[-1]
  meta_dir = directory / str(step) / "meta"
  files = sorted(meta_dir.glob("*")) if meta_dir.is_dir() else []
  for f in files:
    if f.is_file():
      try:
        return json.loads(f.read_text()), directory, step
      except (UnicodeDecodeError, json.JSONDecodeError):
        continue
  raise FileNotFoundError(f"{meta_dir}: no readable meta")


def fingerprint(params) -> str:
  """A short content hash of the parameters (order-stable), recorded with every export."""
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
  restored = mngr.restore(step, params=template, param_shardings=shardings, data_state=False)["params"]
  mngr.close()
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
  ckpt.save(step, params=params, meta=meta, force=True, extra_items=extra_items)
  ckpt.close()
  return pathlib.Path(directory).absolute() / str(step)


def read_item(path: str | pathlib.Path, name: str) -> dict:
  """One extra array item of a checkpoint (e.g. `head`), as numpy arrays; KeyError when the checkpoint has none."""
  _, directory, step = read_meta(path)
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
