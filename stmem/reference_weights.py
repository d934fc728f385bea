"""Reference ST-MEM parameter names <-> stmem parameters.

The reference (PyTorch) names are the patterns of `_RULES` below; its Linear weights are (out, in), a Flax kernel
is (in, out). Reading a `.pth` uses `torch.load(..., weights_only=True)`, so no code in the file is ever executed; a
`.npz` is read with `allow_pickle=False`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

Path = tuple  # a parameter path in the model's nnx state, e.g. ('encoder', 'blocks', 'attn', 'qkv', 'kernel')

# (reference suffix pattern, stmem path, how to convert). A pattern with `{i}` (block i, lead embedding i) names one
# row of a stacked stmem array: the transformer blocks are stored stacked (block i is row i of every block
# parameter, see `stmem.models.layers.stacked`), and so is the lead-embedding table.
_LINEAR = [("weight", "kernel", "transpose"), ("bias", "bias", "same")]
_NORM = [("weight", "scale", "same"), ("bias", "bias", "same")]
_BLOCK_PARTS = [
  ("attn.norm", ("attn_norm",), _NORM),
  ("attn.fn.to_qkv", ("attn", "qkv"), _LINEAR),
  ("attn.fn.to_out.0", ("attn", "out"), _LINEAR),
  ("ff.norm", ("mlp_norm",), _NORM),
  ("ff.fn.net.0", ("mlp", "fc1"), _LINEAR),
  ("ff.fn.net.3", ("mlp", "fc2"), _LINEAR),
]


@dataclasses.dataclass(frozen=True)
class _Rule:
  pattern: re.Pattern   # full reference name ('E' + name for encoder names)
  ref: str              # the same name as a template, `{i}` for the row index
  path: Path            # stmem path
  how: str              # "transpose", "squeeze" or "same", applied to each row
  indexed: bool         # the name is one row of a stacked stmem array


def _rules() -> list[_Rule]:
  rules = []

  def add(ref: str, path: tuple, how: str):
    pattern = re.compile("^" + ref.replace(".", r"\.").replace("{i}", r"(\d+)") + "$")
    rules.append(_Rule(pattern, ref, path, how, "{i}" in ref))

  for ref_mod, path, parts in [("to_patch_embedding.1", ("patch_norm_in",), _NORM),
                               ("to_patch_embedding.2", ("patch_linear",), _LINEAR),
                               ("to_patch_embedding.3", ("patch_norm_out",), _NORM),
                               ("norm", ("norm",), _NORM)]:
    for r, p, how in parts:
      add(f"E{ref_mod}.{r}", ("encoder",) + path + (p,), how)
  add("Epos_embedding", ("encoder", "pos_embedding"), "squeeze")
  add("Esep_embedding", ("encoder", "sep_embedding"), "same")
  add("Elead_embeddings.{i}", ("encoder", "lead_embedding"), "same")
  for ref_mod, path, parts in _BLOCK_PARTS:
    for r, p, how in parts:
      add(f"Eblock{{i}}.{ref_mod}.{r}", ("encoder", "blocks") + path + (p,), how)
      add(f"decoder_blocks.{{i}}.{ref_mod}.{r}", ("decoder_blocks",) + path + (p,), how)
  for ref_mod, path, parts in [("to_decoder_embedding", ("to_decoder",), _LINEAR),
                               ("decoder_norm", ("decoder_norm",), _NORM),
                               ("decoder_head", ("decoder_head",), _LINEAR)]:
    for r, p, how in parts:
      add(f"{ref_mod}.{r}", path + (p,), how)
  add("mask_embedding", ("mask_token",), "squeeze")
  add("decoder_pos_embed", ("decoder_pos_embedding",), "squeeze")
  return rules


_RULES = _rules()
_BY_PATH = {rule.path: rule for rule in _RULES}


@dataclasses.dataclass
class Conversion:
  params: dict[Path, np.ndarray]        # stmem path -> array, paths rooted at the pretraining model (StMem)
  unknown: list[str]                    # reference names no rule knows
  aliases: list[str]                    # names skipped because they repeat another tensor (shared patch embedding)
  head: dict[str, np.ndarray]           # a fine-tuned classification head, kept aside
  encoder_only: bool
  rows: dict[Path, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)  # indexed names, by row

  def reference_name(self, path: Path, row: int | None = None) -> str:
    """The reference's name of a stmem path (of one row of a stacked one), as it appears in the file."""
    ref = _BY_PATH[tuple(path)].ref.replace("{i}", str(row))
    if ref.startswith("E"):
      return ref[1:] if self.encoder_only else "encoder." + ref[1:]
    return ref


def from_reference(state: dict[str, np.ndarray]) -> Conversion:
  """Map a reference state dict (full pretraining model, or encoder-only names without `encoder.`) to stmem paths."""
  state = {k.removeprefix("param/"): np.asarray(v) for k, v in state.items()}
  encoder_only = not any(k.startswith("encoder.") for k in state)
  params: dict[Path, np.ndarray] = {}
  rows: dict[Path, dict[int, np.ndarray]] = {}
  unknown, aliases, head = [], [], {}
  for name, value in sorted(state.items()):
    if encoder_only:
      key = "E" + name
    elif name.startswith("encoder."):
      key = "E" + name.removeprefix("encoder.")
    else:
      key = name
    if key.startswith("Ehead."):
      head[name.split("head.", 1)[1]] = value
      continue
    if not encoder_only and name.startswith("to_patch_embedding."):
      twin = state.get("encoder." + name)
      if twin is not None and np.array_equal(twin, value):
        aliases.append(name)
        continue
    for rule in _RULES:
      m = rule.pattern.match(key)
      if not m:
        continue
      if rule.indexed:
        rows.setdefault(rule.path, {})[int(m.group(1))] = _to_stmem(value, rule.how)
      else:
        params[rule.path] = _to_stmem(value, rule.how)
      break
    else:
      unknown.append(name)
  # Stacked where the rows are 0..n-1 of one shape; `apply` names the rows that are missing or extra for a model.
  for path, by_index in rows.items():
    if sorted(by_index) == list(range(len(by_index))) and len({v.shape for v in by_index.values()}) == 1:
      params[path] = np.stack([by_index[i] for i in range(len(by_index))])
  return Conversion(params=params, unknown=unknown, aliases=aliases, head=head, encoder_only=encoder_only,
                    rows=rows)


def to_reference(params: dict[Path, np.ndarray], encoder_only: bool = False) -> dict[str, np.ndarray]:
  """The inverse mapping: stmem paths (rooted at StMem) -> reference names, for export to the authors' code."""
  out = {}
  for path, value in params.items():
    rule = _BY_PATH.get(tuple(path))
    if rule is None:
      continue
    value = np.asarray(value)
    if rule.indexed:
      for i, row in enumerate(value):
        out[rule.ref.replace("{i}", str(i))] = _to_reference(row, rule.how)
    else:
      out[rule.ref] = _to_reference(value, rule.how)
  names = {}
  for k, v in out.items():
    if k.startswith("E"):
      names[k[1:] if encoder_only else "encoder." + k[1:]] = v
    elif not encoder_only:
      names[k] = v
  if not encoder_only:  # the reference lists its shared patch embedding twice
    names.update({k.removeprefix("encoder."): v for k, v in names.items() if k.startswith("encoder.to_patch_embedding.")})
  return names


def _to_stmem(value: np.ndarray, how: str) -> np.ndarray:
  if how == "transpose":
    return value.T
  if how == "squeeze":  # (1, 32, D) tables and the (1, 1, D) mask token lose their leading singleton axes
    return value.reshape(tuple(s for s in value.shape[:-1] if s != 1) + value.shape[-1:])
  return value


def _to_reference(value: np.ndarray, how: str) -> np.ndarray:
  if how == "transpose":
    return value.T
  if how == "squeeze":
    return value.reshape((1,) * (3 - value.ndim) + value.shape)
  return value


def load_reference_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Read a reference checkpoint: `.pth`/`.pt` (needs PyTorch; weights only) or `.npz` (no pickles).

  A file that cannot be read, or that holds pickled Python objects besides tensors, is refused with a DataError
  naming it and saying why; the refusal never suggests loading the file with the safety off, since that would run
  whatever code the file carries.
  """
  import pickle
  import zipfile

  from data_pipelines.errors import DataError, UsageError

  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file")
  if path.is_dir():
    raise UsageError(f"{path} is a folder; give the weights file (.pth, .pt, .npz or .safetensors)")
  if path.suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k.startswith("param/") or "/" not in k}
    except ValueError as e:
      if "allow_pickle" not in str(e):
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
      raise DataError(f"{path}: refused: the .npz holds pickled Python objects, which stmem never loads "
                      "(unpickling can run code from the file); use a file of plain arrays") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
  if path.suffix in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError as e:
      raise DataError(f"{path}: reading a PyTorch checkpoint needs the optional extra: pip install 'stmem[torch]'") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except pickle.UnpicklingError as e:
      raise DataError(f"{path}: refused: besides tensors the file pickles Python objects, and unpickling them could "
                      "run code from the file, so stmem reads tensors only; use a tensors-only file (.safetensors, "
                      ".npz, or a state dict saved alone) from its publisher") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
      raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else 'truncated'})") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
      raise DataError(f"{path}: expected a state dict or {{'model': state_dict}}, found {type(obj).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
  raise UsageError(f"{path}: unsupported weights file type {path.suffix!r} (expected .pth, .pt, .npz or "
                   ".safetensors)")


def apply(model, conversion: Conversion, *, strict: bool = True) -> list[Path]:
  """Write converted parameters into an nnx model (StMem, or an Encoder: then only `encoder.*` paths are used).

  Raises ValueError listing unknown reference names, missing stmem parameters and shape mismatches.
  Returns the stmem paths that the reference did not provide (empty when strict passes).
  """
  from flax import nnx
  from stmem.models.encoder import Encoder

  is_encoder = isinstance(model, Encoder)
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  root = ("encoder",) if is_encoder else ()

  def rooted(path: Path) -> Path:
    return root + tuple(path)

  params = {p: v for p, v in conversion.params.items() if p not in conversion.rows}
  rows = conversion.rows
  if is_encoder:
    params = {p[1:]: v for p, v in params.items() if p[0] == "encoder"}
    rows = {p[1:]: v for p, v in rows.items() if p[0] == "encoder"}
  problems, missing, extra = [], [], []
  missing_paths: list[Path] = []  # rooted stmem paths, to tell a decoder missing from an encoder-only file
  if conversion.unknown:
    problems.append(f"unknown reference names: {conversion.unknown}")
  # Indexed names (block i, lead embedding i) fill the rows of a stacked parameter: name each missing or extra row.
  for path, by_index in rows.items():
    if path not in flat:
      extra += [conversion.reference_name(rooted(path), i) for i in sorted(by_index)]
      continue
    n = int(flat[path].shape[0])
    extra += [conversion.reference_name(rooted(path), i) for i in sorted(by_index) if i >= n]
    absent = [i for i in range(n) if i not in by_index]
    if absent:
      missing += [conversion.reference_name(rooted(path), i) for i in absent]
      missing_paths.append(rooted(path))
      continue
    shapes = {tuple(by_index[i].shape) for i in range(n)}
    if len(shapes) > 1:
      problems.append(f"{conversion.reference_name(rooted(path), 0)}...: rows of different shapes {sorted(shapes)}")
      continue
    params[path] = np.stack([by_index[i] for i in range(n)])
  for path in flat:
    if path not in params and path not in rows:
      missing.append(".".join(map(str, rooted(path))))
      missing_paths.append(rooted(path))
  decoder_only_missing = conversion.encoder_only and not is_encoder and all(p[0] != "encoder" for p in missing_paths)
  if missing and strict and not decoder_only_missing:
    problems.append("stmem parameters the reference does not provide: " + ", ".join(missing))
  extra += [".".join(map(str, rooted(p))) for p in params if p not in flat]
  if extra:
    problems.append("converted names with no stmem parameter: " + ", ".join(extra))
  for path, value in params.items():
    if path in flat and tuple(flat[path].shape) != tuple(value.shape):
      problems.append(f"{'.'.join(map(str, rooted(path)))}: reference shape {value.shape}, "
                      f"stmem shape {tuple(flat[path].shape)}")
  if problems:
    raise ValueError("cannot load the reference parameters:\n  " + "\n  ".join(problems))
  new_state = nnx.from_flat_state({p: (params[p] if p in params else v) for p, v in flat.items()})
  nnx.update(model, new_state)
  return missing
