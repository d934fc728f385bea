"""`stmem convert`: the reference ST-MEM weights (.pth / .npz / .safetensors) as a stmem checkpoint.

  stmem convert --config convert --config.reference=st_mem_vit_base.pth --config.out=checkpoints/st_mem_base
  stmem convert --reference st_mem_vit_base.pth --out checkpoints/st_mem_base      (top-level keys as plain options)
  stmem convert --reference st_mem_vit_base.pth --out checkpoints/st_mem_base --config.model.variant=base

The model configuration is read off the tensor shapes; nothing in the file is executed (see stmem/programs/convert.py).
"""
import ml_collections

PROGRAM = "convert"  # the command this file configures
PRESETS = ("default",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "default"):
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  c.reference = ""      # reference weights: .pth / .pt, .npz or .safetensors
  c.out = ""            # checkpoint folder to write (must be new or empty); load it with --init_from OUT
  c.model = ml_collections.ConfigDict()
  c.model.variant = "auto"  # "auto" (read the shapes) or a variant name of stmem/models/config.py
  c.head_dim = 64       # attention head width used to count heads (64 in every published ST-MEM)
  return c
