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


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
  # float32 accumulation and output for every input dtype: what the model's mixed precision does
  # (stmem.models.layers.matmul), and on CPUs with bf16 dot instructions the fast path (a bf16 -> bf16 product ran
  # at the float32 rate on the 2-core AMD EPYC, bf16 -> f32 at 1.8x it).
  return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


def matmul_rate(size: int = 4096, dtype: str = "float32", repeats: int = 5) -> dict[str, Any]:
  """FLOP/s of a (size x size) @ (size x size) product in `dtype` with float32 accumulation; the median of `repeats`
  timed runs after one warm-up."""
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dt)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dt)
  f = jax.jit(_product)
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
