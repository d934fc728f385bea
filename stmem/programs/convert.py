"""`stmem convert`: import the reference ST-MEM weights into a stmem checkpoint.

  stmem convert --config convert --config.reference=st_mem_vit_base.pth --config.out=ckpt/st_mem_base
  stmem convert --reference st_mem_vit_base.pth --out ckpt/st_mem_base [--config.model.variant=auto]   (shorter)

The input is a reference `.pth` (the encoder-only file, or the full pretraining checkpoint with its decoder), a `.npz`
holding the same names (a `param/` prefix is accepted), or a `.safetensors` file written by `stmem export`. Nothing in
the file is executed: `.pth` goes through `torch.load(weights_only=True)`, `.npz` is read without pickles and
safetensors holds raw tensors only.

The model configuration is read off the tensor shapes (width, depth, MLP ratio, patch size, positions, lead count and,
for the full model, the decoder); heads are width / 64, the head width of every published ST-MEM. The checkpoint
records the reference's preprocessing contract (250 Hz, 2250-sample windows of 75-sample patches, the 12 standard
leads, Butterworth 0.67-40 Hz order 5 per crop, one z-score per ECG). Names that the converter does not know, and
parameters that the file lacks, are refused with the list of them.

A fine-tuned classification head (`head.weight`, `head.bias`) is not part of the encoder: it is saved beside the
parameters as the checkpoint item `head` in Flax layout (`kernel` (D, C), `bias` (C,)), read with
`stmem.checkpoint.read_item(path, "head")`, and described under `reference_head` in the meta.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np

from data_pipelines import errors
from data_pipelines.contract import Contract
from data_pipelines.errors import DataError
from stmem.models.config import VARIANTS, ModelConfig

HEAD_DIM = 64  # every published ST-MEM variant (small, base) uses 64-wide heads; the file does not record heads


class ConversionError(DataError, ValueError):
  """The reference file cannot become a stmem checkpoint; the message names every problem found (exit code 1)."""


def read_reference(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reference names -> arrays from `.pth`/`.pt`, `.npz` or `.safetensors`; never executes code from the file."""
  from stmem import reference_weights as convert

  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file")
    from safetensors.numpy import load_file
    try:
      return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError) for bad files
      raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  return convert.load_reference_file(path)


def exported_description(path: str | pathlib.Path) -> dict | None:
  """The model config and contract that `stmem export` recorded for this weights file, or None (the authors' files).

  Read from the safetensors metadata (`stmem_contract`, `stmem_model`), else from the `config.json` written beside
  the weights. Why it matters: the contract of an exported encoder (e.g. filtering `offline`) is not the reference's,
  and converting it back under the reference's contract would silently change the preprocessing.
  """
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
      meta = f.metadata() or {}
    if "stmem_contract" in meta:
      return {"contract": json.loads(meta["stmem_contract"]), "model": json.loads(meta.get("stmem_model", "{}")),
              "fingerprint": meta.get("stmem_fingerprint")}
  beside = path.parent / "config.json"
  if beside.is_file():
    try:
      config = json.loads(beside.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f"{beside}: not readable JSON ({e}); it describes {path.name}: restore or delete it") from e
    if config.get("format") == "stmem-export-1" and config.get("weights", {}).get("file") == path.name:
      return {"contract": config["contract"], "model": config.get("model", {}),
              "fingerprint": config.get("fingerprint")}
  return None


def _block_indices(names, pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def infer_config(state: dict[str, np.ndarray], *, head_dim: int = HEAD_DIM) -> tuple[ModelConfig, bool]:
  """(model config, encoder_only) read off the shapes of a reference state dict."""
  state = {k.removeprefix("param/"): v for k, v in state.items()}
  encoder_only = not any(k.startswith("encoder.") for k in state)
  e = "" if encoder_only else "encoder."
  needed = [f"{e}sep_embedding", f"{e}pos_embedding", f"{e}to_patch_embedding.1.weight", f"{e}block0.ff.fn.net.0.weight"]
  if not encoder_only:
    needed += ["decoder_pos_embed", "decoder_blocks.0.ff.fn.net.0.weight"]
  missing = [n for n in needed if n not in state]
  if missing:
    raise ConversionError(f"not an ST-MEM reference state dict: missing {missing}")

  width = int(np.shape(state[f"{e}sep_embedding"])[-1])
  depth = len(_block_indices(state, rf"^{re.escape(e)}block(\d+)\."))
  hidden = int(np.shape(state[f"{e}block0.ff.fn.net.0.weight"])[0])
  problems = []
  if width % head_dim:
    problems.append(f"width {width} is not a multiple of the head width {head_dim}")
  if hidden % width:
    problems.append(f"MLP width {hidden} is not a multiple of the model width {width}")
  fields = dict(
    width=width, depth=depth, num_heads=max(1, width // head_dim), mlp_ratio=max(1, hidden // width),
    patch_size=int(np.shape(state[f"{e}to_patch_embedding.1.weight"])[0]),
    num_patches=int(np.shape(state[f"{e}pos_embedding"])[-2]) - 2,
    num_lead_ids=len(_block_indices(state, rf"^{re.escape(e)}lead_embeddings\.(\d+)$")),
  )
  if not encoder_only:
    dwidth = int(np.shape(state["decoder_pos_embed"])[-1])
    dhidden = int(np.shape(state["decoder_blocks.0.ff.fn.net.0.weight"])[0])
    if dwidth % head_dim:
      problems.append(f"decoder width {dwidth} is not a multiple of the head width {head_dim}")
    # stmem has one MLP ratio for encoder and decoder, as the reference.
    if dhidden != fields["mlp_ratio"] * dwidth:
      problems.append(f"decoder MLP width {dhidden} is not {fields['mlp_ratio']} x its width {dwidth}")
    fields.update(decoder_width=dwidth, decoder_heads=max(1, dwidth // head_dim),
                  decoder_depth=len(_block_indices(state, r"^decoder_blocks\.(\d+)\.")))
  if problems:
    raise ConversionError("unsupported reference shapes:\n  " + "\n  ".join(problems))
  return ModelConfig(**fields), encoder_only


def resolve_variant(inferred: ModelConfig, variant: str, encoder_only: bool) -> ModelConfig:
  """`auto`: the inferred config. A named variant: that config, refused when the file's shapes disagree with it."""
  if variant == "auto":
    return inferred
  if variant not in VARIANTS:
    raise ConversionError(f"unknown variant {variant!r}; choose auto or one of {sorted(VARIANTS)}")
  named = VARIANTS[variant]
  compared = ["width", "depth", "mlp_ratio", "patch_size", "num_patches", "num_lead_ids"]
  if not encoder_only:
    compared += ["decoder_width", "decoder_depth"]
  diffs = [f"{f}: file {getattr(inferred, f)}, variant {getattr(named, f)}" for f in compared
           if getattr(inferred, f) != getattr(named, f)]
  if diffs:
    raise ConversionError(f"the file is not the {variant!r} variant:\n  " + "\n  ".join(diffs))
  return named  # for an encoder-only file the decoder fields are the variant's, never used


def reference_contract(cfg: ModelConfig) -> Contract:
  """The reference's preprocessing, with the window and lead count the weights were shaped for."""
  base = Contract()
  window = cfg.patch_size * cfg.num_patches
  return dataclasses.replace(base, window=window, patch_size=cfg.patch_size,
                             record_samples=max(base.record_samples, window),
                             leads=base.leads[:cfg.num_lead_ids] if cfg.num_lead_ids <= len(base.leads) else base.leads)


@dataclasses.dataclass
class Converted:
  params: dict                    # pure dict, rooted at StMem ({"encoder": ...} alone for an encoder-only file)
  cfg: ModelConfig
  encoder_only: bool
  head: dict[str, np.ndarray]     # Flax layout: kernel (D, C), bias (C,); empty when the file has no head
  aliases: list[str]
  fingerprint: str = ""           # the encoder's (`stmem.checkpoint.fingerprint`), once saved


def convert_state(state: dict[str, np.ndarray], *, variant: str = "auto", head_dim: int = HEAD_DIM) -> Converted:
  """A reference state dict -> stmem parameters; ConversionError lists unknown and missing names."""
  from flax import nnx

  from stmem import reference_weights as convert
  from stmem.models import StMem

  inferred, encoder_only = infer_config(state, head_dim=head_dim)
  cfg = resolve_variant(inferred, variant, encoder_only)
  conv = convert.from_reference(state)
  # Published weights may be stored in half precision; stmem keeps float32 parameters.
  as_f32 = lambda v: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v  # noqa: E731
  conv.params = {p: as_f32(v) for p, v in conv.params.items()}
  conv.rows = {p: {i: as_f32(v) for i, v in rows.items()} for p, rows in conv.rows.items()}
  model = StMem(cfg, rngs=nnx.Rngs(0))
  try:
    convert.apply(model.encoder if encoder_only else model, conv)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  head = {}
  if conv.head:
    unexpected = sorted(set(conv.head) - {"weight", "bias"})
    if unexpected or "weight" not in conv.head:
      raise ConversionError(f"unknown reference names: {['head.' + n for n in unexpected] or ['head.weight missing']}")
    head["kernel"] = np.asarray(conv.head["weight"], np.float32).T
    head["bias"] = np.asarray(conv.head.get("bias", np.zeros(head["kernel"].shape[1])), np.float32)
  state_ = nnx.to_pure_dict(nnx.state(model.encoder if encoder_only else model, nnx.Param))
  params = {"encoder": state_} if encoder_only else state_
  return Converted(params=params, cfg=cfg, encoder_only=encoder_only, head=head, aliases=conv.aliases)


def convert_file(reference: str | pathlib.Path, out: str | pathlib.Path, *, variant: str = "auto",
                 head_dim: int = HEAD_DIM) -> tuple[pathlib.Path, Converted]:
  """Read, convert and save; returns the step folder written and the conversion.

  A file written by `stmem export` keeps its contract and model configuration (checked against the shapes); the
  authors' files get the reference contract. Weights holding NaN or inf are refused, naming the parameters.
  """
  from stmem import checkpoint

  reference = pathlib.Path(reference).expanduser()
  exported_folder = checkpoint.export_config(reference)
  if exported_folder is not None:  # an `stmem export` folder: its weights file, read with the config beside it
    reference = reference / exported_folder["weights"]["file"]
  state = read_reference(reference)
  errors.check_finite(state, str(reference))
  exported = exported_description(reference)
  result = convert_state(state, variant=variant, head_dim=head_dim)
  contract = reference_contract(result.cfg)
  origin = f"reference:{reference.name}"
  if exported is not None:
    contract = Contract.from_dict(exported["contract"])
    result.cfg = _exported_config(exported["model"], result.cfg, reference)
    origin = f"stmem export:{reference.name}"
  extra = {}
  if result.head:
    extra["reference_head"] = {"item": "head", "num_classes": int(result.head["kernel"].shape[1]),
                               "layout": "flax Linear: kernel (width, classes), bias (classes,)",
                               "source": "head.weight (transposed), head.bias"}
  meta = checkpoint.make_meta(result.cfg, contract, encoder_only=result.encoder_only,
                              origin=origin, config={"reference_file": reference.name},
                              extra=extra)
  meta["fingerprint"] = result.fingerprint = checkpoint.fingerprint(result.params)
  if exported is not None and exported.get("fingerprint") not in (None, result.fingerprint):
    raise DataError(f"{reference}: its weights have the fingerprint {result.fingerprint}, not the "
                    f"{exported['fingerprint']} its export recorded: the file was changed or belongs to another export")
  step_dir = checkpoint.save_params(out, result.params, meta, extra_items={"head": result.head} if result.head else None)
  return step_dir, result


def _exported_config(model: dict, inferred: ModelConfig, where: pathlib.Path) -> ModelConfig:
  """The model config an export recorded, refused (ConversionError) where it disagrees with the tensor shapes."""
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  cfg = dataclasses.replace(inferred, **{k: v for k, v in model.items() if k in known})
  compared = ["width", "depth", "num_heads", "mlp_ratio", "patch_size", "num_patches", "num_lead_ids"]
  diffs = [f"{f}: tensors {getattr(inferred, f)}, recorded {getattr(cfg, f)}" for f in compared
           if f != "num_heads" and getattr(inferred, f) != getattr(cfg, f)]
  if diffs:
    raise ConversionError(f"{where}: the recorded model config does not match the tensors: " + "; ".join(diffs))
  return cfg


def check(args) -> None:
  from stmem import configflags
  configflags.require(args, "stmem convert", "reference", "out")
  out = pathlib.Path(args.out).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise errors.UsageError(f"--out {out} exists and is not an empty folder; choose a new --out")
  errors.require_output(out, "--out", folder=True)


def run(args, workdir=None) -> dict:
  """`args` (configs/convert.py): the reference file `args.reference` as a checkpoint in `args.out`."""
  from stmem import console
  log = console.Log("convert")
  out = pathlib.Path(args.out).expanduser()
  step_dir, result = convert_file(args.reference, out, variant=args.model.variant, head_dim=args.head_dim)
  cfg = result.cfg
  kind = "encoder only" if result.encoder_only else "encoder + decoder (pretraining model)"
  log(f"{args.reference} -> {step_dir} (fingerprint {result.fingerprint})")
  log(f"{kind}: width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
      f"{cfg.num_patches} patches, {cfg.num_lead_ids} leads"
      + ("" if result.encoder_only else f"; decoder width {cfg.decoder_width}, depth {cfg.decoder_depth}, "
                                        f"heads {cfg.decoder_heads}"))
  if result.aliases:
    log(f"skipped {len(result.aliases)} alias names (the reference lists its shared patch embedding twice)")
  if result.head:
    log(f"fine-tuned head found ({result.head['kernel'].shape[1]} classes): saved as checkpoint item 'head' "
        f"(kernel {result.head['kernel'].shape}, bias {result.head['bias'].shape}); not part of the encoder")
  return {"checkpoint": str(step_dir), "fingerprint": result.fingerprint, "encoder_only": result.encoder_only,
          "model": dataclasses.asdict(cfg),
          "head_classes": int(result.head["kernel"].shape[1]) if result.head else 0}


def main(argv: list[str]) -> int:
  from stmem import entry
  return entry.main(argv, run, program="convert", config="convert", workdir=None, check=check)
