"""The machine's own yardstick: the rate of one large square matmul in float32 and in bfloat16.

Every model workload is reported as a fraction of these rates, measured in the same process and run, so that a
figure taken on a busy or throttled machine is judged against what that machine could do at that moment.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp


def matmul_rate(size: int = 4096, dtype: str = "float32", repeats: int = 5) -> dict[str, Any]:
  """FLOP/s of a (size x size) @ (size x size) product; the median of `repeats` timed runs after one warm-up."""
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dt)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dt)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  flops = 2.0 * size ** 3
  return {"size": size, "dtype": dtype, "seconds": seconds, "flop_per_s": flops / seconds,
          "times": [round(t, 4) for t in times]}


def run(size: int = 4096, repeats: int = 5) -> dict[str, Any]:
  return {dtype: matmul_rate(size, dtype, repeats) for dtype in ("float32", "bfloat16")}
