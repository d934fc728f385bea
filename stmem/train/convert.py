"""`stmem convert`: import the reference ST-MEM weights into a stmem checkpoint.

  stmem convert --config convert --config.reference=st_mem_vit_base.pth --config.out=ckpt/st_mem_base
  stmem convert --reference st_mem_vit_base.pth --out ckpt/st_mem_base [--variant auto]   (the same, shorter)

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
import pathlib
import re
import sys

import numpy as np

from data_pipelines.contract import Contract
from stmem.models.config import VARIANTS, ModelConfig

HEAD_DIM = 64  # every published ST-MEM variant (small, base) uses 64-wide heads; the file does not record heads


class ConversionError(ValueError):
  """The reference file cannot become a stmem checkpoint; the message names every problem found."""


def read_reference(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reference names -> arrays from `.pth`/`.pt`, `.npz` or `.safetensors`; never executes code from the file."""
  from stmem import convert

  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file")
    from safetensors.numpy import load_file
    return load_file(str(path))
  return convert.load_reference_file(path)


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


def convert_state(state: dict[str, np.ndarray], *, variant: str = "auto", head_dim: int = HEAD_DIM) -> Converted:
  """A reference state dict -> stmem parameters; ConversionError lists unknown and missing names."""
  from flax import nnx

  from stmem import convert
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
  """Read, convert and save; returns the step folder written and the conversion."""
  from stmem import checkpoint

  reference = pathlib.Path(reference)
  result = convert_state(read_reference(reference), variant=variant, head_dim=head_dim)
  extra = {}
  if result.head:
    extra["reference_head"] = {"item": "head", "num_classes": int(result.head["kernel"].shape[1]),
                               "layout": "flax Linear: kernel (width, classes), bias (classes,)",
                               "source": "head.weight (transposed), head.bias"}
  meta = checkpoint.make_meta(result.cfg, reference_contract(result.cfg), encoder_only=result.encoder_only,
                              origin=f"reference:{reference.name}", config={"reference_file": reference.name},
                              extra=extra)
  meta["fingerprint"] = checkpoint.fingerprint(result.params)
  step_dir = checkpoint.save_params(out, result.params, meta, extra_items={"head": result.head} if result.head else None)
  return step_dir, result


def main(argv: list[str]) -> int:
  from stmem.train import configflags
  args, _ = configflags.parse(argv, "stmem convert", "convert", workdir=None)
  for key in ("reference", "out"):
    if not args[key]:
      raise configflags.ConfigError(f"--config.{key} (or --{key}) is required; see `stmem convert --help`")

  out = pathlib.Path(args.out)
  if out.exists() and any(out.iterdir()):
    print(f"stmem convert: {out} exists and is not empty; choose a new --out", file=sys.stderr)
    return 2
  try:
    step_dir, result = convert_file(args.reference, out, variant=args.variant, head_dim=args.head_dim)
  except (ConversionError, FileNotFoundError, ImportError) as e:
    print(f"stmem convert: {args.reference}: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # a corrupt or hostile file: say so without a traceback through torch's internals
    print(f"stmem convert: {args.reference}: refused ({type(e).__name__}: {e})", file=sys.stderr)
    if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
      # Checkpoints that also pickle Python objects (training arguments...) are refused as a whole: unpickling
      # them could run code. Someone who trusts the file can keep only the tensors, then convert that.
      print("  the file holds Python objects besides tensors; stmem never unpickles those. If you trust the file, "
            "keep only its tensors:\n    python -c \"import torch; f = 'IN.pth'; "
            "torch.save({'model': torch.load(f, weights_only=False)['model']}, 'weights_only.pth')\"\n"
            "  and convert weights_only.pth.", file=sys.stderr)
    return 1
  cfg = result.cfg
  kind = "encoder only" if result.encoder_only else "encoder + decoder (pretraining model)"
  print(f"stmem convert: {args.reference} -> {step_dir}")
  print(f"  {kind}: width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
        f"{cfg.num_patches} patches, {cfg.num_lead_ids} leads"
        + ("" if result.encoder_only else f"; decoder width {cfg.decoder_width}, depth {cfg.decoder_depth}, "
                                          f"heads {cfg.decoder_heads}"))
  if result.aliases:
    print(f"  skipped {len(result.aliases)} alias names (the reference lists its shared patch embedding twice)")
  if result.head:
    print(f"  fine-tuned head found ({result.head['kernel'].shape[1]} classes): saved as checkpoint item 'head' "
          f"(kernel {result.head['kernel'].shape}, bias {result.head['bias'].shape}); not part of the encoder")
  return 0
