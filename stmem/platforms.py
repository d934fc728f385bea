"""Which accelerator backends a `stmem` process lets JAX try, decided from the host before JAX is imported.

Why: with the TPU compiler installed (the `tpu` extra, libtpu) JAX tries the TPU backend first in every process. On a
host without TPU chips libtpu then loads (about 0.7 GB), prints its initialisation errors on stderr ("could not
determine TPU accelerator type", "unexpected worker hostname", a source-location trace) and fails, and only then does
JAX fall back to the CPU. The extra is there so that `stmem plan --topology v5e:4x4` can compile for a TPU slice from
any host, which loads libtpu by itself (`jax.experimental.topologies`) whatever backends JAX may start.

So `settings()` answers, from the environment and the device files alone:
- the user chose (JAX_PLATFORMS, JAX_PLATFORM_NAME or JAX_FORCE_TPU_INIT set to anything, even empty), libtpu is not
  installed, or this host has TPU chips (a TPU VM: PCI devices of Google's vendor id, /dev/accel*, /dev/vfio/N):
  nothing;
- no TPU chips and no GPU device file: JAX_PLATFORMS=cpu, the one backend JAX would end up with; libtpu is never
  loaded and the start is as fast as without the extra;
- a GPU: nothing either. Naming its platform would turn JAX's fallback to the CPU, when the GPU fails to start, into
  an error, and libtpu's own settings that quiet it would also reach the TPU topologies `stmem plan` describes; a
  user silences it with JAX_PLATFORMS=cuda (or rocm).
`apply()` sets them in this process's environment, and only while JAX is not imported yet (JAX reads JAX_PLATFORMS
when it is imported; a process that imported JAX is left as it is).

Also from the host alone: whether its CPU multiplies bfloat16 in hardware (`cpu_has_bf16_products`), for the line
`stmem pretrain` logs when bfloat16 compute would be slower than float32 there (`bf16_advice`).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import sys
from collections.abc import Mapping, MutableMapping

GOOGLE_PCI_VENDOR = "0x1ae0"  # how JAX itself counts TPU chips (jax._src.hardware_utils)
# NVIDIA (jax._src.hardware_utils), WSL2, AMD (the KFD driver ROCm uses)
GPU_DEVICE_FILES = ("dev/nvidia0", "dev/nvidiactl", "dev/dxg", "dev/kfd")
USER_CHOICES = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "JAX_FORCE_TPU_INIT")


def _libtpu_installed() -> bool:
  try:
    return importlib.util.find_spec("libtpu") is not None
  except (ImportError, ValueError):  # a parent package or sys.modules entry that hides it
    return False


def tpu_chips_visible(root: str = "/") -> bool:
  """Whether this host has TPU chips: a PCI device of Google's vendor id, or the device files TPU VMs have."""
  base = pathlib.Path(root)
  for vendor in glob.glob(str(base / "sys/bus/pci/devices/*/vendor")):
    try:
      if pathlib.Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return bool(glob.glob(str(base / "dev/accel*")) or glob.glob(str(base / "dev/vfio/[0-9]*")))


def gpu_visible(root: str = "/") -> bool:
  return any((pathlib.Path(root) / f).exists() for f in GPU_DEVICE_FILES)


def settings(environ: Mapping[str, str] | None = None, *, root: str = "/",
             libtpu_installed: bool | None = None) -> dict[str, str]:
  """The variables to set for this host (see the module's docstring); empty when nothing should change."""
  env = os.environ if environ is None else environ
  if any(name in env for name in USER_CHOICES):
    return {}
  if not (_libtpu_installed() if libtpu_installed is None else libtpu_installed):
    return {}
  if tpu_chips_visible(root) or gpu_visible(root):
    return {}
  return {"JAX_PLATFORMS": "cpu"}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
  """Set `settings()` in the environment (os.environ by default) unless JAX is already imported; returns what was
  set."""
  if "jax" in sys.modules:
    return {}
  env = os.environ if environ is None else environ
  chosen = settings(env)
  env.update(chosen)
  return chosen


# CPU features with bfloat16 dot-product instructions: x86 (/proc/cpuinfo "flags") and Arm ("Features").
BF16_PRODUCT_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
  """The fields of the first CPU in /proc/cpuinfo (`model name`, `flags` or Arm's `Features`, ...); {} where there is
  no such file. `cpuinfo`: that file's text, for tests."""
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
      return {}
  first = (line.partition(":") for line in cpuinfo.split("\n\n")[0].splitlines())
  return {name.strip(): value.strip() for name, sep, value in first if sep}


def cpu_has_bf16_products(cpuinfo: str | None = None) -> bool | None:
  """Whether this host's CPU multiplies bfloat16 in hardware (AVX512_BF16, AMX, Arm's BF16); None when unknown (no
  /proc/cpuinfo, or no feature line in it). `cpuinfo`: that file's text, for tests."""
  fields = cpuinfo_fields(cpuinfo)
  features = fields.get("flags", fields.get("Features"))
  return None if features is None else any(f in features.split() for f in BF16_PRODUCT_FEATURES)


def bf16_advice(platform: str, dtype: str, cpuinfo: str | None = None) -> str | None:
  """A line for the log when bfloat16 compute is asked of a CPU that has no bfloat16 products, where it is slower
  than float32 (its products are emulated: a base pretraining step took 1.4x float32's time on an AVX2-only AMD
  EPYC, benchmarks/README.md); None otherwise. Not an error: the results are right, only slower."""
  if platform != "cpu" or dtype != "bfloat16" or cpu_has_bf16_products(cpuinfo) is not False:
    return None
  return ("model.dtype=bfloat16 on a CPU without bfloat16 product instructions (AVX512_BF16, AMX): its products are "
          "emulated and float32 is faster here; --config.model.dtype=float32 to train in float32")
