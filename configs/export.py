"""`stmem export`: an encoder as a plain tensor file, a JSON config and a Markdown model card, or as an ONNX or
StableHLO graph that runs without JAX.

  stmem export --config export --config.init_from=runs/base --config.out=exported/base
  stmem export --init_from runs/base --out exported/base --format npz     (top-level keys as plain options)
  stmem export --init_from runs/base --out exported/base-onnx --format onnx     (needs the `deploy` extra)

safetensors / hub / npz: OUT/model.safetensors (or OUT/model.npz), OUT/config.json and OUT/README.md, under the ST-MEM
authors' encoder-only tensor names in PyTorch layout; hub's card carries a model hub's metadata block and the run's
evaluator figures. Such a folder is a checkpoint to probe, embed, finetune and export, and `stmem convert` reads it.
onnx / stablehlo: OUT/model.onnx (or OUT/model.stablehlo) and OUT/config.json: the encoder's feature function
(signal, lead_ids, lead_mask -> pooled, per_lead, per_patch) with a dynamic batch; see docs/export.md.
"""
import ml_collections

PROGRAM = "export"  # the command this file configures
PRESETS = ("default",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "default"):
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  c.init_from = ""           # a stmem checkpoint: a workdir, its checkpoints/ folder, or a step folder
  c.out = ""                 # folder to write the model file, config.json and README.md into
  c.format = "safetensors"   # "safetensors", "hub" (safetensors with a hub's card), "npz", "onnx" or "stablehlo"
  return c
