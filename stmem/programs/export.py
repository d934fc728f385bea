"""`stmem export`: an encoder as a plain tensor file, a JSON config and a Markdown model card, or as a graph that
runs without JAX.

  stmem export --config export --config.init_from=WORKDIR_OR_CHECKPOINT --config.out=DIR [--config.format=npz]
  stmem export --init_from WORKDIR_OR_CHECKPOINT --out DIR [--format safetensors|npz|onnx|stablehlo]   (the same)

safetensors / npz write `DIR/model.safetensors` (or `DIR/model.npz`), `DIR/config.json` and `DIR/README.md`. Tensor
names are the ST-MEM authors' encoder-only names in PyTorch layout (`stmem.reference_weights.to_reference(...,
encoder_only=True)`), so the file loads into their code as a state dict and back into stmem with `stmem convert`.
hub writes the same three files as a model hub takes them (the card opens with the hub's metadata block and shows the
evaluators' figures of the run, when it logged any). `stmem probe`, `embed`, `export` and `convert` take any such
folder (safetensors or npz) as a checkpoint holding an encoder.

onnx / stablehlo write `DIR/model.onnx` (jax2onnx; the `deploy` extra) or `DIR/model.stablehlo` (`jax.export`,
serialized), and `DIR/config.json`: the encoder's feature function as `stmem embed` runs it, its weights inside,
with a dynamic batch (`stmem.deploy`: inputs, outputs and the metadata that travels with them).

Only the encoder is exported: the pretraining decoder and any fine-tuned head stay in the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from data_pipelines.errors import UsageError

FORMATS = {"safetensors": "model.safetensors", "hub": "model.safetensors", "npz": "model.npz"}
GRAPH_FORMATS = {"onnx": "model.onnx", "stablehlo": "model.stablehlo"}


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
  import jax
  from flax import nnx

  from stmem import checkpoint, model_card

  if fmt not in FORMATS and fmt not in GRAPH_FORMATS:
    raise UsageError(f"--format {fmt!r}: choose from {sorted(FORMATS) + sorted(GRAPH_FORMATS)}")
  out = pathlib.Path(out).expanduser()
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is a file; give a folder for the model file, config.json and README.md")
  encoder, meta = checkpoint.load_model(checkpoint_path, encoder_only=True)
  enc_params = {"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param))}
  fp = checkpoint.fingerprint(enc_params)

  _, directory, step = checkpoint.read_meta(checkpoint_path)
  # Folder names only: an export is shared, the machine's paths are not.
  source = {"checkpoint": directory.parent.name if directory.name == checkpoint.CHECKPOINT_DIR else directory.name,
            "step": step, "origin": meta.get("origin"), "encoder_only_checkpoint": meta.get("encoder_only", False)}
  out.mkdir(parents=True, exist_ok=True)
  if fmt in GRAPH_FORMATS:
    count = int(sum(np.size(v) for v in jax.tree.leaves(enc_params)))
    return _export_graph(fmt, encoder, meta, fp, count, source, out)
  names = encoder_reference_names(encoder)
  count = int(sum(v.size for v in names.values()))
  weights = out / FORMATS[fmt]
  if fmt in ("safetensors", "hub"):
    from safetensors.numpy import save_file
    # "format: pt" tells loaders the names and layouts are PyTorch's.
    # The contract and model config travel inside the file too, so that `stmem convert` of the file alone restores
    # them exactly (the contract decides the preprocessing; the reference's would be silently different).
    save_file(names, str(weights), metadata={"format": "pt", "producer": "stmem export", "stmem_fingerprint": fp,
                                             "stmem_contract": json.dumps(meta["contract"], sort_keys=True),
                                             "stmem_model": json.dumps(meta["model"], sort_keys=True)})
  else:
    np.savez(weights, **names)
  _follow_umask(weights)
  digest = _sha256(weights)

  config = {
    "format": "stmem-export-1",
    "weights": {"file": weights.name, "format": fmt, "sha256": digest,
                "names": "ST-MEM reference encoder-only state dict names, PyTorch layout (Linear weight is (out, in))"},
    "model": meta["model"],
    "contract": meta["contract"],
    "parameter_count": count,
    "fingerprint": fp,
    "source": source,
    "training": {"step": meta.get("step"), "config": meta.get("config", {})},
    "license": model_card.LICENSE_PLACEHOLDER,
  }
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
  card = model_card.render(meta, parameter_count=count, fingerprint=fp, weights_file=weights.name,
                           weights_sha256=digest, weights_format="safetensors" if fmt == "hub" else fmt,
                           evaluations=_evaluations(directory, step), hub=fmt == "hub")
  (out / "README.md").write_text(card)
  return config


def _follow_umask(path: pathlib.Path) -> None:
  """The weights file gets the permissions of every other file written (the umask's): the safetensors writer
  creates it through a temporary file, readable by its owner only, which a shared export must not be."""
  import os
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _evaluations(directory: pathlib.Path, step: int) -> dict[str, float]:
  """The evaluators' figures (`eval/...`) that pretraining logged at the exported step, or at the last step before
  it, from the run's metrics.jsonl ({} when the run logged none, or the checkpoint is not in a run's workdir)."""
  from stmem import metrics as metrics_lib
  file = directory.parent / metrics_lib.METRICS_FILE if directory.name == "checkpoints" else None
  if file is None or not file.is_file():
    return {}
  best: tuple[int, dict[str, float]] = (-1, {})
  for line in file.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a crash: the others still count
    at = int(row.get("step", -1))
    figures = {k: float(v) for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    if figures and best[0] <= at <= step:
      best = (at, {**(best[1] if at == best[0] else {}), **figures})
  return {"step": best[0], **best[1]} if best[1] else {}


def _export_graph(fmt: str, encoder, meta: dict, fp: str, count: int, source: dict, out: pathlib.Path) -> dict:
  """The encoder as a graph file (`stmem.deploy`) and config.json, which carries the graph's metadata (for ONNX it is
  also inside the file, as metadata_props)."""
  from stmem import checkpoint, deploy, model_card
  contract = checkpoint.contract_from_meta(meta)
  graph_meta = deploy.metadata(encoder, contract, meta, fp, source)
  path = deploy.write_graph(fmt, encoder, contract, out, graph_meta)
  _follow_umask(path)
  config = {
    "format": "stmem-export-1",
    "weights": {"file": path.name, "format": fmt, "sha256": _sha256(path),
                "names": "inside the graph (constants); inputs and outputs below"},
    "parameter_count": count,
    "training": {"step": meta.get("step"), "config": meta.get("config", {})},
    "license": model_card.LICENSE_PLACEHOLDER,
    **{k: v for k, v in graph_meta.items() if k not in ("format", "producer")},
  }
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
  return config


def run(config, workdir=None) -> dict:
  """`config` (configs/export.py): the export of `config.init_from` into `config.out`; returns a summary."""
  from stmem import console
  result = export(config.init_from, config.out, fmt=config.format)
  also = "config.json" if config.format in GRAPH_FORMATS else "config.json, README.md"
  console.Log("export")(f"{config.init_from} -> {config.out}/{result['weights']['file']} "
                        f"({result['parameter_count']:,} parameters, fingerprint {result['fingerprint']}), {also}")
  return {"out": str(config.out), "weights": result["weights"]["file"], "parameter_count": result["parameter_count"],
          "fingerprint": result["fingerprint"]}


def check(config) -> None:
  """The command line's usage errors, before the checkpoint is read: what is missing, and an output folder that
  cannot be (a file in its place or on its way, no permission)."""
  from data_pipelines import errors
  from stmem import configflags
  configflags.require(config, "stmem export", "init_from", "out")
  errors.require_output(config.out, "--out", folder=True)


def main(argv: list[str]) -> int:
  from stmem import entry
  return entry.main(argv, run, program="export", config="export", workdir=None, check=check)
