"""`stmem forward-check`: one jitted forward + backward pass of a model variant on generated input.

A smoke test of an installation that needs no data: it builds the model, masks, reconstructs and differentiates.
"""
from __future__ import annotations

import argparse
import time


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="stmem forward-check", description=__doc__)
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from stmem.models import StMem, model_config

  cfg = model_config(args.variant)
  model = StMem(cfg, rngs=nnx.Rngs(0))
  signal = jax.random.normal(jax.random.key(1), (args.batch, 12, cfg.window))
  lead_ids = jnp.tile(jnp.arange(12), (args.batch, 1))

  @nnx.jit
  def loss_and_grad(model, signal, lead_ids, key):
    return nnx.value_and_grad(lambda m: m(signal, lead_ids, key=key)["loss"])(model)

  start = time.perf_counter()
  loss, grads = loss_and_grad(model, signal, lead_ids, jax.random.key(2))
  grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
  from stmem import console
  console.Log("forward-check")(f"variant={args.variant} batch={args.batch} loss={float(loss):.4f} "
                               f"grad_norm={grad_norm:.4f} ({time.perf_counter() - start:.1f} s incl. compile) on "
                               f"{jax.devices()[0].platform}")
  return 0
