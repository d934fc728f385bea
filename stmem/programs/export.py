"""`stmem export`: an encoder as a plain tensor file, a JSON config and a Markdown model card.

  stmem export --config export --config.init_from=WORKDIR_OR_CHECKPOINT --config.out=DIR [--config.format=npz]
  stmem export --init_from WORKDIR_OR_CHECKPOINT --out DIR [--format safetensors|npz]   (the same, shorter)

writes `DIR/model.safetensors` (or `DIR/model.npz`), `DIR/config.json` and `DIR/README.md`. Tensor names are the ST-MEM
authors' encoder-only names in PyTorch layout (`stmem.reference_weights.to_reference(..., encoder_only=True)`), so the file
loads into their code as a state dict and back into stmem with `stmem convert`. Only the encoder is exported: the
pretraining decoder and any fine-tuned head stay in the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from data_pipelines.errors import UsageError

FORMATS = {"safetensors": "model.safetensors", "npz": "model.npz"}


def encoder_reference_names(encoder) -> dict[str, np.ndarray]:
  """An nnx Encoder's parameters under the reference's encoder-only names (contiguous float32, PyTorch layout)."""
  from flax import nnx

  from stmem import reference_weights as convert

  flat = {("encoder",) + tuple(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(encoder, nnx.Param))}
  names = convert.to_reference(flat, encoder_only=True)
  # The mapping must be lossless: reading the names back gives every parameter unchanged.
  back = convert.from_reference(names)
  lost = sorted(".".join(map(str, p)) for p in flat if p not in back.params)
  if lost or back.unknown or not back.encoder_only:
    raise RuntimeError(f"export names do not round-trip: lost {lost}, unknown {back.unknown}")
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in names.items()}


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def export(checkpoint_path: str | pathlib.Path, out: str | pathlib.Path, *, fmt: str = "safetensors") -> dict:
  """Write the export; returns the config written to `config.json`."""
  from flax import nnx

  from stmem import checkpoint, model_card

  if fmt not in FORMATS:
    raise UsageError(f"--format {fmt!r}: choose from {sorted(FORMATS)}")
  out = pathlib.Path(out).expanduser()
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is a file; give a folder for the model file, config.json and README.md")
  encoder, meta = checkpoint.load_model(checkpoint_path, encoder_only=True)
  names = encoder_reference_names(encoder)
  enc_params = {"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param))}
  fp = checkpoint.fingerprint(enc_params)
  count = int(sum(v.size for v in names.values()))

  out.mkdir(parents=True, exist_ok=True)
  weights = out / FORMATS[fmt]
  if fmt == "safetensors":
    from safetensors.numpy import save_file
    # "format: pt" tells loaders the names and layouts are PyTorch's.
    # The contract and model config travel inside the file too, so that `stmem convert` of the file alone restores
    # them exactly (the contract decides the preprocessing; the reference's would be silently different).
    save_file(names, str(weights), metadata={"format": "pt", "producer": "stmem export", "stmem_fingerprint": fp,
                                             "stmem_contract": json.dumps(meta["contract"], sort_keys=True),
                                             "stmem_model": json.dumps(meta["model"], sort_keys=True)})
  else:
    np.savez(weights, **names)
  digest = _sha256(weights)

  _, directory, step = checkpoint.read_meta(checkpoint_path)
  config = {
    "format": "stmem-export-1",
    "weights": {"file": weights.name, "format": fmt, "sha256": digest,
                "names": "ST-MEM reference encoder-only state dict names, PyTorch layout (Linear weight is (out, in))"},
    "model": meta["model"],
    "contract": meta["contract"],
    "parameter_count": count,
    "fingerprint": fp,
    # Folder names only: an export is shared, the machine's paths are not.
    "source": {"checkpoint": directory.parent.name if directory.name == checkpoint.CHECKPOINT_DIR else directory.name,
               "step": step, "origin": meta.get("origin"), "encoder_only_checkpoint": meta.get("encoder_only", False)},
    "training": {"step": meta.get("step"), "config": meta.get("config", {})},
    "license": model_card.LICENSE_PLACEHOLDER,
  }
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
  card = model_card.render(meta, parameter_count=count, fingerprint=fp, weights_file=weights.name,
                           weights_sha256=digest, weights_format=fmt)
  (out / "README.md").write_text(card)
  return config


def main(argv: list[str]) -> int:
  from stmem import configflags
  config, _ = configflags.parse(argv, "stmem export", "export", workdir=None)
  configflags.require(config, "stmem export", "init_from", "out")
  result = export(config.init_from, config.out, fmt=config.format)
  print(f"stmem export: {config.init_from} -> {config.out}/{result['weights']['file']} "
        f"({result['parameter_count']:,} parameters, fingerprint {result['fingerprint']}), config.json, README.md")
  return 0
