"""The machine a benchmark ran on, for its JSON: figures are only comparable on the same CPU (machines of one kind
differ: some are Zen 3 with AVX2 only, some Zen 4 or Xeon with AVX-512 BF16), so every result names it."""
from __future__ import annotations

import os
import platform
from typing import Any

from stmem import platforms

# CPU features that change what XLA and numpy can do here (vector width, bf16 dot products, AMX tiles).
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu() -> dict[str, Any]:
  """Model name, vendor family/model and the vector features of the first CPU in /proc/cpuinfo ({} elsewhere)."""
  first = platforms.cpuinfo_fields()
  if not first:
    return {"model_name": platform.processor()}
  flags = set(first.get("flags", "").split())
  return {"model_name": first.get("model name", ""), "family": first.get("cpu family", ""),
          "model": first.get("model", ""), "features": [f for f in FLAGS_OF_INTEREST if f in flags]}


def describe() -> dict[str, Any]:
  """CPU count and model, platform, Python and the load averages now (1, 5, 15 min)."""
  return {"cpus": os.cpu_count(), "cpu": cpu(), "platform": platform.platform(), "processor": platform.processor(),
          "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}
