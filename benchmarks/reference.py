"""The ST-MEM authors' PyTorch models, imported at run time from a checkout the user fetched, built with the shapes
of an stmem model configuration: what the benchmarks that compare stmem with the reference time.

The reference implementation is not part of stmem (its code is CC BY-NC 4.0) and is never copied into it: clone it
yourself (`git clone https://github.com/bakqui/ST-MEM`) and pass the folder. It needs torch (`pip install
'stmem[torch]'`) and einops.
"""
from __future__ import annotations

import functools
import pathlib
import sys
from typing import Any

URL = "https://github.com/bakqui/ST-MEM"
HOW_TO_GET = (f"pass --reference_repo DIR, a checkout of the ST-MEM authors' code (git clone {URL}; CC BY-NC 4.0, "
              "not part of stmem), with torch (pip install 'stmem[torch]') and einops installed")
_MARKER = pathlib.Path("models") / "encoder" / "st_mem_vit.py"


def problem(repo: str | None) -> str | None:
  """Why `repo` cannot serve as the reference (a one-line message that says how to get one), or None."""
  if not repo:
    return f"no reference implementation given: {HOW_TO_GET}"
  if not (pathlib.Path(repo) / _MARKER).is_file():
    return f"{repo} holds no {_MARKER.as_posix()}; {HOW_TO_GET}"
  return None


def modules(repo: str) -> dict[str, Any]:
  """The reference's model classes {"ST_MEM_ViT", "ST_MEM"}; ImportError when torch or einops is missing."""
  path = str(pathlib.Path(repo).resolve())
  if path not in sys.path:
    sys.path.insert(0, path)
  from models.encoder.st_mem_vit import ST_MEM_ViT
  from models.st_mem import ST_MEM
  return {"ST_MEM_ViT": ST_MEM_ViT, "ST_MEM": ST_MEM}


def encoder(cfg, repo: str, leads: int = 12):
  """The reference's encoder (ST_MEM_ViT, no head) with the shapes of stmem's ModelConfig `cfg`."""
  return modules(repo)["ST_MEM_ViT"](
    seq_len=cfg.window, patch_size=cfg.patch_size, num_leads=leads, width=cfg.width, depth=cfg.depth,
    mlp_dim=cfg.mlp_ratio * cfg.width, heads=cfg.num_heads, dim_head=cfg.width // cfg.num_heads)


def pretraining_model(cfg, repo: str, leads: int = 12):
  """The reference's masked autoencoder (ST_MEM: encoder, lead-wise decoder, its masking and loss) with the shapes of
  `cfg` (LayerNorm eps 1e-6 as the reference's named variants; its decoder heads are 64 wide, as stmem's)."""
  import torch.nn as nn
  return modules(repo)["ST_MEM"](
    seq_len=cfg.window, patch_size=cfg.patch_size, num_leads=leads, embed_dim=cfg.width, depth=cfg.depth,
    num_heads=cfg.num_heads, decoder_embed_dim=cfg.decoder_width, decoder_depth=cfg.decoder_depth,
    decoder_num_heads=cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio,
    norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=cfg.norm_pix_loss)
