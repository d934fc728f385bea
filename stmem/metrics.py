"""Metrics out of a training loop: JSON lines and TensorBoard event files (tensorboardX, no TensorFlow), written by
process 0 only (the progress line is `stmem.train_loop`'s). Also MFU: the devices' peak FLOP/s and the analytic FLOP
count of a step."""
from __future__ import annotations

import json
import pathlib

import jax

# Dense peak FLOP/s per chip by `device_kind` prefix, (float32, bfloat16), from the vendors' data sheets (dense, no
# sparsity; SXM parts for NVIDIA). TPUs multiply float32 on the MXU in bf16 passes, so their f32 figure is the bf16
# peak (what XLA's default precision gets). The longest matching prefix wins ("TPU v5 lite" before "TPU v5").
# Unknown devices (CPUs) get no MFU.
PEAK_FLOPS = {
  "NVIDIA H100": (67e12, 989e12), "NVIDIA H200": (67e12, 989e12), "NVIDIA B200": (80e12, 2250e12),
  "NVIDIA A100": (19.5e12, 312e12),
  "TPU v4": (275e12, 275e12),
  "TPU v5 lite": (197e12, 197e12), "TPU v5e": (197e12, 197e12),    # v5e reports itself as "TPU v5 lite"
  "TPU v5p": (459e12, 459e12), "TPU v5": (459e12, 459e12),         # v5p reports itself as "TPU v5"
  "TPU v6 lite": (918e12, 918e12), "TPU v6e": (918e12, 918e12),    # v6e (Trillium) reports "TPU v6 lite"
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one chip of `device_kind` in the compute dtype, None when unknown."""
  matches = [name for name in PEAK_FLOPS if device_kind.startswith(name)]
  if not matches:
    return None
  f32, bf16 = PEAK_FLOPS[max(matches, key=len)]
  return bf16 if dtype in ("bfloat16", "float16") else f32


def device_peak_flops(dtype: str, devices=None) -> float | None:
  """Peak FLOP/s of all `devices` together (default: every device of the run), None on unknown devices."""
  devices = list(jax.devices() if devices is None else devices)
  peak = peak_flops(devices[0].device_kind, dtype)
  return None if peak is None else peak * len(devices)


def mfu(flops_per_step: float, step_seconds: float, peak: float) -> float:
  """Model FLOPs utilisation: analytic FLOPs per step / step time / the devices' summed peak FLOP/s."""
  return flops_per_step / step_seconds / peak


# -- analytic FLOP counts (matmuls only, 2 FLOPs per multiply-add: benchmarks/README.md) ------------------------------
# Counted from the config, not from XLA: XLA's cost analysis counts a scanned block once (the transformer blocks run
# as a scan), and asking it costs a second compile. Rematerialised recomputation is not counted (model FLOPs).

def block_flops_per_token(width: int, mlp_ratio: int, seq_len: int) -> float:
  """One pre-LN transformer block, per token: q/k/v 6D^2, output 2D^2, MLP 4rD^2, scores and weighted sum 4SD."""
  return 2.0 * width * 3 * width + 2.0 * width * width + 2 * 2.0 * width * mlp_ratio * width + 4.0 * seq_len * width


def pretrain_forward_flops(cfg, leads: int = 12) -> float:
  """Forward FLOPs of one ECG in pretraining: patch embedding of every patch, the encoder over the kept tokens of
  all leads as one sequence, the decoder over each lead's N + 2 tokens, and the reconstruction head."""
  n, p, d, dd = cfg.num_patches, cfg.patch_size, cfg.width, cfg.decoder_width
  enc_tokens = leads * (cfg.num_keep + 2)
  dec_seq = n + 2
  return (leads * n * 2.0 * p * d
          + enc_tokens * cfg.depth * block_flops_per_token(d, cfg.mlp_ratio, enc_tokens)
          + enc_tokens * 2.0 * d * dd
          + leads * dec_seq * cfg.decoder_depth * block_flops_per_token(dd, cfg.mlp_ratio, dec_seq)
          + leads * dec_seq * 2.0 * dd * p)


def embed_forward_flops(cfg, leads: int = 12) -> float:
  """Forward FLOPs of one unmasked ECG through the encoder: every patch token of every lead plus 2 SEPs per lead."""
  tokens = leads * (cfg.num_patches + 2)
  return (leads * cfg.num_patches * 2.0 * cfg.patch_size * cfg.width
          + tokens * cfg.depth * block_flops_per_token(cfg.width, cfg.mlp_ratio, tokens))


def pretrain_step_flops(cfg, batch: int, leads: int = 12) -> float:
  """Forward + backward: the backward pass costs two forwards (gradients of activations and of weights)."""
  return 3.0 * batch * pretrain_forward_flops(cfg, leads)


def finetune_step_flops(cfg, batch: int, leads: int = 12) -> float:
  """One fine-tuning update: the unmasked encoder forward and its backward (the linear head is negligible)."""
  return 3.0 * batch * embed_forward_flops(cfg, leads)


METRICS_FILE = "metrics.jsonl"  # in the workdir: one JSON object per written step


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it is installed (the
  `torch` extra), seconds of every training run's start, only to accept torch tensors, which stmem never passes."""
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX is imported
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """metrics.jsonl and TensorBoard event files in a workdir: a local folder or a gs:// URL (`stmem.workdir`). On a
  bucket the event files are written locally and uploaded at each write (`stmem.workdir.Mirror`): tensorboardX's
  own bucket writer uploads its file again at interpreter exit, and waits minutes there when the bucket is gone."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
    from stmem import workdir as workdir_lib
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    workdir = workdir_lib.resolve(workdir)
    self.path = workdir / METRICS_FILE
    self._tb = self._mirror = None
    if self.enabled:
      workdir_lib.prepare(workdir)
      self._lines = workdir_lib.Appender(self.path)
      if workdir_lib.is_remote(workdir):
        self._mirror = workdir_lib.Mirror(workdir / "tensorboard")
      self._tb = summary_writer_class()(str(self._mirror.path if self._mirror else workdir / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    self._lines.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))
    if self._mirror is not None:
      self._tb.flush()
      self._mirror.sync()

  def close(self):
    if self._tb is not None:
      self._tb.close()
    if self._mirror is not None:
      self._mirror.close()
