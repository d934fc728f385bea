"""Metrics out of a training loop: JSON lines and TensorBoard event files (tensorboardX, no TensorFlow), written by
process 0 only, plus a one-line console progress report. Also the MFU estimate's device peaks."""
from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import jax

# Dense peak FLOP/s per device by `device_kind`, (float32, bfloat16). Unknown devices (CPUs) get no MFU.
PEAK_FLOPS = {
  "NVIDIA H100 80GB HBM3": (67e12, 989e12), "NVIDIA H100": (67e12, 989e12), "NVIDIA H200": (67e12, 989e12),
  "NVIDIA A100-SXM4-80GB": (19.5e12, 312e12), "NVIDIA A100-SXM4-40GB": (19.5e12, 312e12),
  "TPU v4": (275e12, 275e12), "TPU v5 lite": (197e12, 197e12), "TPU v5e": (197e12, 197e12),
  "TPU v5p": (459e12, 459e12), "TPU v6 lite": (918e12, 918e12),
}


def device_peak_flops(dtype: str) -> float | None:
  kind = jax.devices()[0].device_kind
  for name, (f32, bf16) in PEAK_FLOPS.items():
    if kind.startswith(name):
      return (bf16 if dtype == "bfloat16" else f32) * jax.device_count()
  return None


def console_logger(name: str) -> logging.Logger:
  """Our own progress lines at INFO, without turning on every library's INFO logging (orbax is chatty)."""
  log = logging.getLogger(name)
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  return log


class MetricWriter:
  def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
    self._last_console = 0.0

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))

  def console(self, step: int, total: int, metrics: dict[str, float], force: bool = False):
    if not self.enabled or (not force and time.time() - self._last_console < 2.0):
      return
    self._last_console = time.time()
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "grad_norm", "steps_per_s",
                                                                         "samples_per_s", "mfu"))
    print(f"[step {step}/{total}] {shown}", file=sys.stderr, flush=True)

  def close(self):
    if self._tb is not None:
      self._tb.close()
