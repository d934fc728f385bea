"""The model's own dataclass and the named variants. No files, no ml_collections here."""
from __future__ import annotations

import dataclasses

REMAT = ("none", "dots", "block")
ATTENTION = ("xla", "cudnn")


# The pretraining methods: ST-MEM and the paper's two masked-autoencoder baselines (`stmem.models.baselines`).
METHODS = ("stmem", "mtae", "mlae")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  width: int = 768              # encoder token width D
  depth: int = 12
  num_heads: int = 12           # head dim = width / num_heads (64 in every variant)
  mlp_ratio: int = 4
  patch_size: int = 75          # samples per patch (0.3 s at 250 Hz)
  num_patches: int = 30         # patches per lead (2250-sample window)
  num_lead_ids: int = 12        # size of the lead-embedding table, indexed by canonical lead id
  decoder_width: int = 256
  decoder_depth: int = 4
  decoder_heads: int = 4
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  dtype: str = "float32"        # computation dtype ("bfloat16" for mixed precision); parameters stay float32
  remat: str = "none"           # recompute blocks in the backward pass: "none", "dots" or "block" (layers.REMAT_POLICIES)
  attention: str = "xla"        # "xla" (any platform) or "cudnn" (cuDNN fused attention, NVIDIA GPUs, bf16 only)
  method: str = "stmem"         # "stmem" (lead x time patches), "mtae" (time tokens), "mlae" (lead tokens): see baselines
  scan_blocks: bool = True      # run each stack of blocks as one lax.scan; False unrolls it (layers.run_stack)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown model method {self.method!r}; choose from {list(METHODS)}")
    if self.remat not in REMAT:
      raise ValueError(f"remat must be one of {REMAT}, not {self.remat!r}")
    if self.attention not in ATTENTION:
      raise ValueError(f"attention must be one of {ATTENTION}, not {self.attention!r}")
    for name, (w, h) in {"encoder": (self.width, self.num_heads),
                         "decoder": (self.decoder_width, self.decoder_heads)}.items():
      if w % h:
        raise ValueError(f"{name} width {w} is not divisible by its {h} heads")

  @property
  def window(self) -> int:
    return self.patch_size * self.num_patches

  @property
  def num_keep(self) -> int:
    """Patches kept per lead under masking: exactly int(n * (1 - mask_ratio)), as the reference."""
    return int(self.num_patches * (1 - self.mask_ratio))

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


VARIANTS: dict[str, ModelConfig] = {
  # tiny is the reference fixture's configuration: parity tests and CI run it.
  "tiny": ModelConfig(width=128, depth=2, num_heads=2, decoder_width=128, decoder_depth=1, decoder_heads=2),
  "small": ModelConfig(width=384, depth=12, num_heads=6),
  "base": ModelConfig(width=768, depth=12, num_heads=12),
  "large": ModelConfig(width=1024, depth=24, num_heads=16),
}


def model_config(variant: str, **overrides) -> ModelConfig:
  if variant not in VARIANTS:
    from data_pipelines.errors import UsageError  # a name the user typed: reported in one line by `stmem`
    raise UsageError(f"unknown model variant {variant!r}; choose from {sorted(VARIANTS)}")
  return VARIANTS[variant].replace(**overrides)
