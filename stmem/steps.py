"""The jitted steps, built once from a config and a mesh: what `stmem pretrain` runs, `stmem bench` times and
`stmem plan` compiles ahead of time for a TPU topology or a memory budget; and the fine-tuning step
(`finetune_step`) that `stmem finetune` runs and `stmem plan --programs finetune` compiles.

`pretrain_step(config, mesh, cfg)` returns a `PretrainStep`: the model's graphdef, the optimiser, the abstract
parameters and optimiser state with their shardings, the batch and replicated shardings, and the jitted, donated
update step. `abstract_args` gives the step's arguments as sharded shapes, so that the same step can be lowered
without allocating anything (`step.jitted.lower(*abstract_args(step, batch)).compile()`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from data_pipelines import leads as leads_lib
from data_pipelines.contract import Contract
from stmem import optim
from stmem import sharding as sharding_lib
from stmem.models import encoder_model, model_config, pretraining_model
from stmem.models.config import ModelConfig


def parse_mesh(spec: str) -> list[tuple[str, int]]:
  """'data:-1,fsdp:2' -> [('data', -1), ('fsdp', 2)]."""
  axes = []
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    axes.append((name, int(size or -1)))
  return axes


def model_cfg(config, contract: Contract | None = None) -> ModelConfig:
  """The model of a pretraining config (configs/pretrain.py) for data of `contract` (default: the standard one)."""
  contract = contract or Contract()
  return model_config(config.model.variant, dtype=config.model.dtype, mask_ratio=config.model.mask_ratio,
                      remat=config.model.get("remat", "none"), attention=config.model.get("attention", "xla"),
                      method=config.model.get("method", "stmem"),
                      patch_size=contract.patch_size, num_patches=contract.window // contract.patch_size)


def check_platform(cfg: ModelConfig, mesh: Mesh) -> None:
  """Refuse, before tracing, a model setting that cannot lower for the mesh's devices."""
  platform = mesh.devices.flat[0].platform
  if cfg.attention == "cudnn":
    if platform != "gpu":
      raise ValueError(f"config.model.attention='cudnn' runs only on NVIDIA GPUs; these devices are {platform}: "
                       f"use --config.model.attention=xla")
    if cfg.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"config.model.attention='cudnn' needs --config.model.dtype=bfloat16 (cuDNN's fused attention "
                       f"has no {cfg.dtype} kernel), or use --config.model.attention=xla")


def make_train_step(graphdef, tx: optax.GradientTransformation, accum_steps: int):
  """The pure update step: (params, opt_state, batch, key, ok) -> (params, opt_state, metrics, ok)."""

  def loss_fn(params, batch, key):
    model = nnx.merge(graphdef, params)
    return model(batch["signal"], batch["lead_ids"], batch["lead_mask"], key=key)["loss"]

  grad_fn = jax.value_and_grad(loss_fn)

  def step(params, opt_state, batch, key, ok):
    if accum_steps == 1:
      loss, grads = grad_fn(params, batch, key)
    else:  # micro-batches in a scan: the gradient of the whole batch with a fraction of the activation memory
      # Micro-batch i is rows i, i + accum, i + 2 accum, ...: each device holds its rows of every micro-batch, so
      # every micro-batch runs on all devices. (Contiguous blocks of rows, reshape(accum, -1), put each micro-batch
      # on a fraction of the devices: planned for v5e:4x4, large at batch 2048 needed more memory at accum 2 than
      # at 1, 26.9 against 25.8 GiB of temporaries per chip.)
      micro = jax.tree.map(lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        i, mb = xs
        loss, grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
      loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return params, opt_state, metrics, ok & jnp.isfinite(loss)

  return step


@dataclasses.dataclass
class PretrainStep:
  cfg: ModelConfig
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: Callable[[int], Any]
  init_params: Callable[[jax.Array], dict]
  abstract_params: Any
  abstract_opt: Any
  param_shardings: Any
  opt_shardings: Any
  batch_sharding: NamedSharding
  replicated: NamedSharding
  accum_steps: int
  leads: int
  jitted: Any  # jax.jit of make_train_step, parameters and optimiser state donated


def pretrain_step(config, mesh: Mesh, cfg: ModelConfig, accum_steps: int | None = None) -> PretrainStep:
  """The pretraining update of `config` (configs/pretrain.py) on `mesh`, jitted with its shardings and donation.

  accum_steps: the micro-batch count (default config.optim.accum_steps; 0 there means "derive it", which callers
  resolve first: stmem.memory_plan.fit)."""
  check_platform(cfg, mesh)
  accum_steps = int(config.optim.accum_steps if accum_steps is None else accum_steps)
  if accum_steps < 1:
    raise ValueError("accum_steps must be >= 1 here (0, 'derive from the memory budget', is resolved by stmem.memory_plan)")

  def init_params(key):
    return nnx.state(pretraining_model(cfg, rngs=nnx.Rngs(key)), nnx.Param).to_pure_dict()

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: pretraining_model(cfg, rngs=nnx.Rngs(0))))
  abstract_params = jax.eval_shape(init_params, jax.random.key(config.seed))
  lr = optim.scaled_lr(config.optim.base_lr, config.batch_size)
  schedule = optim.warmup_cosine(lr, config.warmup_steps, config.total_steps)
  tx = optim.adamw(abstract_params, schedule=schedule, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
                   weight_decay=config.optim.weight_decay, decay_mask=config.optim.decay_mask,
                   clip_norm=config.optim.clip_norm, frozen=tuple(config.optim.frozen))
  param_shardings = sharding_lib.tree_shardings(abstract_params, mesh, min_size=config.fsdp_min_size)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding_lib.tree_shardings(abstract_opt, mesh, min_size=config.fsdp_min_size)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  # Key, flag and metrics replicated: every process can read the scalars. The flag starts on the mesh, as every later
  # step returns it: a flag off the mesh made the second step trace and compile again (twice the start-up time).
  replicated = sharding_lib.replicated(mesh)
  jitted = jax.jit(make_train_step(graphdef, tx, accum_steps),
                   in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated, replicated),
                   out_shardings=(param_shardings, opt_shardings, replicated, replicated), donate_argnums=(0, 1))
  return PretrainStep(cfg=cfg, graphdef=graphdef, tx=tx, schedule=schedule, init_params=init_params,
                      abstract_params=abstract_params, abstract_opt=abstract_opt, param_shardings=param_shardings,
                      opt_shardings=opt_shardings, batch_sharding=batch_sharding, replicated=replicated,
                      accum_steps=accum_steps, leads=len(leads_lib.parse_lead_set(config.data.lead_set)),
                      jitted=jitted)


def abstract_batch(batch_size: int, leads: int, window: int, sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The pretraining batch as sharded shapes: signal (B, L, T) float32, lead_ids (B, L) int32, lead_mask (B, L)."""
  return {"signal": jax.ShapeDtypeStruct((batch_size, leads, window), jnp.float32, sharding=sharding),
          "lead_ids": jax.ShapeDtypeStruct((batch_size, leads), jnp.int32, sharding=sharding),
          "lead_mask": jax.ShapeDtypeStruct((batch_size, leads), jnp.bool_, sharding=sharding)}


def sharded_shapes(tree, shardings):
  """Arrays or shapes -> ShapeDtypeStructs carrying `shardings` (a matching tree): arguments to lower a step with."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def key_and_flag(replicated: NamedSharding) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """The (key, ok) arguments every update step takes, as replicated shapes."""
  key = jax.eval_shape(lambda: jax.random.key(0))
  return (jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
          jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated))


def abstract_args(step: PretrainStep, batch_size: int) -> tuple:
  """(params, opt_state, batch, key, ok) as sharded shapes: the update step lowered without allocating anything."""
  return (sharded_shapes(step.abstract_params, step.param_shardings),
          sharded_shapes(step.abstract_opt, step.opt_shardings),
          abstract_batch(batch_size, step.leads, step.cfg.window, step.batch_sharding),
          *key_and_flag(step.replicated))


def embed_forward(graphdef) -> Callable:
  """(encoder params, signal, lead_ids, lead_mask) -> pooled features (B, D): the 12-lead embedding's forward."""

  def pooled(params, signal, lead_ids, lead_mask):
    return nnx.merge(graphdef, params).features(signal, lead_ids, lead_mask)["pooled"]

  return pooled


def encoder_graphdef_and_params(cfg: ModelConfig, *, abstract: bool = False):
  """An encoder's graphdef and its parameters as a pure dict (shapes only when `abstract`)."""
  build = lambda: encoder_model(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef, params = nnx.split(nnx.eval_shape(build) if abstract else build())
  return graphdef, params.to_pure_dict()


# ------------------------------------------------------------------------------------------------ fine-tuning


def task_loss(logits, labels, kind: str, smoothing: float = 0.0, class_weight=None):
  """Mean loss per record: sigmoid BCE summed over classes (multi-label) or softmax cross-entropy (multi-class)."""
  if kind == "multiclass":
    target = optax.smooth_labels(labels, smoothing) if smoothing else labels
    per = optax.softmax_cross_entropy(logits, target)
    if class_weight is not None:
      per = per * (labels @ class_weight)
    return per.mean()
  target = labels * (1 - smoothing) + 0.5 * smoothing if smoothing else labels
  per = optax.sigmoid_binary_cross_entropy(logits, target)
  if class_weight is not None:  # positives of class c weighted by its negative/positive ratio
    per = per * jnp.where(labels > 0, class_weight[None, :], 1.0)
  return per.sum(-1).mean()


@dataclasses.dataclass
class FinetuneStep:
  """The fine-tuning update built once: optimiser, shardings and the jitted, donated step (what `train` runs and
  `stmem plan --programs finetune` compiles ahead of time)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  param_shardings: Any
  opt_shardings: Any
  abstract_opt: Any
  batch_sharding: Any
  replicated: Any
  jitted: Any  # (params, opt_state, batch, key, ok) -> (params, opt_state, loss, ok); params and state donated


def finetune_step(config, mesh, graphdef, params, *, kind: str, depth: int, class_weight=None) -> FinetuneStep:
  """The update of a `Classifier` (`graphdef`, `params` as a pure dict, arrays or shapes) under `config`
  (configs/finetune.py) on `mesh`; `depth` is the encoder's (layer-wise decay). The batch holds signal (B, L, T),
  lead_ids, lead_mask (B, L) and labels (B, C)."""
  o = config.optim
  lr = optim.scaled_lr(float(o.base_lr), int(config.batch_size))
  schedule = optim.warmup_cosine(lr, int(config.warmup_steps), int(config.total_steps))
  tx = optim.adamw(params, schedule=schedule, b1=o.b1, b2=o.b2, weight_decay=float(o.weight_decay),
                   clip_norm=float(o.clip_norm), layer_decay=float(o.layer_decay), depth=depth)
  param_shardings = sharding_lib.tree_shardings(params, mesh, min_size=config.fsdp_min_size)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_shardings = sharding_lib.tree_shardings(abstract_opt, mesh, min_size=config.fsdp_min_size)
  batch_sharding, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  smoothing = float(config.label_smoothing)

  def train_step(params, opt_state, batch, key, ok):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(batch["signal"], batch["lead_ids"], batch["lead_mask"], key)
      return task_loss(logits, batch["labels"], kind, smoothing, class_weight)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, ok & jnp.isfinite(loss)

  jitted = jax.jit(train_step, in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated, replicated),
                   out_shardings=(param_shardings, opt_shardings, replicated, replicated), donate_argnums=(0, 1))
  return FinetuneStep(tx=tx, schedule=schedule, param_shardings=param_shardings, opt_shardings=opt_shardings,
                      abstract_opt=abstract_opt, batch_sharding=batch_sharding, replicated=replicated, jitted=jitted)
