"""`stmem finetune`: train an encoder and a linear head on a labelled task; select on validation; test once.

  stmem finetune --config configs/finetune.py:PRESET [--config.checkpoint=CKPT] --workdir DIR  (see configs/finetune.py)

Read top to bottom: config, data (one task; its train/validation/test splits), model (encoder from the checkpoint or
from scratch, a linear head, drop path), optimiser, update step, evaluation, train loop with model selection on
validation, the test split scored once with the selected model, report and checkpoint.
"""
from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "finetune.py")


class Classifier(nnx.Module):
  """Encoder + linear head on the pooled features, with drop path (stochastic depth) on every residual branch.

  The randomness of drop path lives here, not in `stmem.models`: only fine-tuning uses it; the encoder only takes the
  resulting branch multipliers. Block i's rate is drop_path * i / (depth-1); a dropped branch is zero for that ECG, a
  kept one scaled by 1 / (1 - rate). Without drop path, or at evaluation, the forward pass is exactly the encoder's
  `features(...)["pooled"]` followed by the head.
  """

  def __init__(self, encoder, num_classes: int, drop_path: float, *, rngs: nnx.Rngs):
    self.encoder = encoder
    d = encoder.cfg.width
    self.head = nnx.Linear(d, num_classes, kernel_init=nnx.initializers.normal(0.01),
                           bias_init=nnx.initializers.zeros, rngs=rngs)
    depth = encoder.cfg.depth
    self.rates = tuple(float(drop_path * i / max(depth - 1, 1)) for i in range(depth))

  def __call__(self, signal, lead_ids, lead_mask, key: jax.Array | None = None):
    enc = self.encoder
    branch_scale = None
    if key is not None and any(self.rates):
      rates = jnp.asarray(self.rates, jnp.float32)[:, None, None]                      # (depth, 1, 1)
      keep = jax.random.bernoulli(key, 1 - rates, (len(self.rates), signal.shape[0], 2))  # (depth, B, 2)
      branch_scale = keep.astype(jnp.float32) / (1 - rates)
    return self.head(enc.features(signal, lead_ids, lead_mask, branch_scale=branch_scale)["pooled"])


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


def main(argv: Sequence[str]) -> int:
  from stmem.train import configflags
  config, workdir = configflags.parse(argv, "stmem finetune", DEFAULT_CONFIG + ":prepared")
  from stmem.train.metrics import console_logger
  log = console_logger("stmem.finetune")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()

  from stmem import augment, checkpoint as ckpt_lib, data, evaluation
  from stmem.models import model_config
  from data_pipelines import builder_base
  from stmem.train import features, optim, report

  # ------------------------------------------------------------------------------------------ encoder
  if config.checkpoint:
    loaded = features.load_encoder(config.checkpoint)
    origin = f"{config.checkpoint} (fingerprint {loaded.fingerprint})"
  else:
    loaded = features.random_encoder(model_config(config.model), seed=int(config.seed))
    origin = f"from scratch ({config.model})"
  log.info("encoder: %s", origin)

  # ------------------------------------------------------------------------------------------ data
  pools, task_list = data.task_pools([config.task], loaded.contract, data_dir=config.data_dir,
                                     data_root=config.data_root, labels=[x for x in config.labels.split(",") if x],
                                     kind=config.kind, num_synthetic=int(config.synthetic_n), seed=int(config.seed))
  pool_key, task = task_list[0]
  pool = pools[pool_key]
  split = pool.split if pool.fixed_splits else builder_base.split_names(pool.patient_id)
  source, contract, adapted = features.adapt(loaded.contract, pool.contract, pool.source, config.lead_set)
  for line in adapted:
    log.info("adapted %s", line)
  subsets = {}
  for name in data.SPLITS:
    idx = np.flatnonzero(task.keep & (split == name))
    if not len(idx):
      raise ValueError(f"task {task.name}: the {name} split is empty")
    subsets[name] = (idx, data.Subset(source, idx, task.labels[idx]))
  log.info("task %s: %s", task.name, {k: len(v[0]) for k, v in subsets.items()})
  train_labels = task.labels[subsets["train"][0]]
  class_weight = None
  if config.class_weighting == "balanced":
    if task.kind == "multiclass":
      counts = np.maximum(train_labels.sum(0), 1)
      class_weight = jnp.asarray(len(train_labels) / (len(counts) * counts), jnp.float32)
    else:
      pos = np.maximum(train_labels.sum(0), 1)
      class_weight = jnp.asarray((len(train_labels) - pos) / pos, jnp.float32)
  train_it = data.make_iterator(subsets["train"][1], contract, batch_size=int(config.batch_size), train=True,
                                seed=int(config.seed), lead_set=config.lead_set, process_index=0, process_count=1)

  # ------------------------------------------------------------------------------------------ model and optimiser
  model = Classifier(loaded.encoder, task.labels.shape[1], float(config.drop_path), rngs=nnx.Rngs(int(config.seed)))
  lr = optim.scaled_lr(float(config.base_lr), int(config.batch_size))
  tx = optim.adamw(nnx.state(model, nnx.Param).to_pure_dict(),
                   schedule=optim.warmup_cosine(lr, int(config.warmup_steps), int(config.steps)), b1=config.b1,
                   b2=config.b2, weight_decay=float(config.weight_decay), clip_norm=float(config.clip_norm),
                   layer_decay=float(config.layer_decay), depth=loaded.encoder.cfg.depth)
  graphdef, params = nnx.split(model, nnx.Param)
  params = params.to_pure_dict()
  opt_state = tx.init(params)

  # ------------------------------------------------------------------------------------------ update step
  @jax.jit
  def train_step(params, opt_state, batch, key):
    def loss_fn(p):
      m = nnx.merge(graphdef, p)
      logits = m(batch["signal"], batch["lead_ids"], batch["lead_mask"], key)
      return task_loss(logits, batch["labels"], task.kind, float(config.label_smoothing), class_weight)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  link = (lambda z: jax.nn.softmax(z, -1)) if task.kind == "multiclass" else jax.nn.sigmoid

  @jax.jit
  def predict_step(params, signal, lead_ids, lead_mask):
    """Probabilities averaged over the evaluation crops (signal (B, K, L, T))."""
    model = nnx.merge(graphdef, params)
    return features.crop_mean(lambda s, i, m: link(model(s, i, m)))(signal, lead_ids, lead_mask)

  # ------------------------------------------------------------------------------------------ evaluation
  def evaluate(params, name: str) -> dict:
    """3-crop evaluation of one split: probabilities averaged over the crops of each example."""
    idx, subset = subsets[name]
    probs, labels = [], []
    for batch in features.eval_batches(subset, contract, lead_set=config.lead_set,
                                       batch_size=int(config.eval_batch_size)):
      p = np.asarray(predict_step(params, batch["signal"], batch["lead_ids"], batch["lead_mask"]))
      probs.append(p[batch["valid"]])
      labels.append(batch["labels"][batch["valid"]])
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    eps = 1e-7
    if task.kind == "multiclass":
      loss = float(-np.mean(np.sum(labels * np.log(probs + eps), -1)))
    else:
      loss = float(-np.mean(np.sum(labels * np.log(probs + eps) + (1 - labels) * np.log(1 - probs + eps), -1)))
    m = evaluation.macro_metrics(labels, probs)
    return {"loss": loss, "auroc": m["auroc"], "probs": probs, "labels": labels, "patient_id": pool.patient_id[idx]}

  # ------------------------------------------------------------------------------------------ train loop
  metrics_file = open(workdir / "metrics.jsonl", "a")
  best, best_score, best_step = None, -np.inf, -1
  key = jax.random.key(int(config.seed))
  for step in range(1, int(config.steps) + 1):
    batch = next(train_it)
    if config.randaugment:
      batch = augment.augment_batch(batch, int(config.seed), step, num_ops=int(config.randaugment_ops),
                                    prob=float(config.randaugment_prob))
    arrays = {k: batch[k] for k in ("signal", "lead_ids", "lead_mask", "labels")}
    params, opt_state, loss = train_step(params, opt_state, arrays, jax.random.fold_in(key, step))
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"step {step}: loss is {float(loss)}")
    if step % int(config.eval_every) == 0 or step == int(config.steps):
      val = evaluate(params, "validation")
      score = -val["loss"] if config.select_on == "loss" else val["auroc"]
      if np.isfinite(score) and score > best_score:  # selection sees the validation split only
        best, best_score, best_step = jax.device_get(params), score, step
      record = {"step": step, "train_loss": float(loss), "val_loss": val["loss"], "val_auroc": val["auroc"],
                "best_step": best_step, "seconds": round(time.time() - start, 1)}
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()
      log.info("step %d train loss %.4f val loss %.4f val AUROC %.3f", step, float(loss), val["loss"], val["auroc"])
  metrics_file.close()
  if best is None:
    best, best_step = jax.device_get(params), int(config.steps)

  # ------------------------------------------------------------------------------------------ test, once
  val = evaluate(best, "validation")
  test = evaluate(best, "test")
  multiclass = task.kind == "multiclass"
  thresholds = None if multiclass else evaluation.thresholds_for(val["labels"], val["probs"])
  predicted = evaluation.predictions(test["probs"], thresholds, multiclass)
  row, curve = report.task_row(report.task_title(task.name, config),
                               "fine-tuned" if config.checkpoint else "from scratch", config.lead_set, test["labels"],
                               test["probs"], predicted, test["patient_id"], class_names=task.label_names,
                               multiclass=multiclass, protocol="train/validation/test",
                               n_resamples=int(config.bootstrap), seed=int(config.seed), l2="")
  notes = [f"encoder: {origin}", f"selected step {best_step} of {config.steps} on validation {config.select_on}",
           "test split scored once, with the selected model; F1 thresholds chosen on validation",
           f"intervals: 95 % percentile bootstrap over patients ({config.bootstrap} resamples)"]
  paths = report.write(workdir, [row], title="Fine-tuning", curves={row["task"]: {f"{config.lead_set}": curve}},
                       notes=notes, info={"config": config.to_dict(), "best_step": best_step})

  # ------------------------------------------------------------------------------------------ checkpoint
  # An encoder-only checkpoint (every program loads it) with the head as its own item (`checkpoint.read_item`).
  head = {"kernel": np.asarray(best["head"]["kernel"]), "bias": np.asarray(best["head"]["bias"])}
  meta = ckpt_lib.make_meta(loaded.encoder.cfg, loaded.contract, config=config.to_dict(), step=best_step,
                            encoder_only=True, origin="stmem finetune",
                            extra={"head": {"label_names": list(task.label_names), "kind": task.kind},
                                   "parent": origin, "task": task.name})
  path = ckpt_lib.save_params(workdir / ckpt_lib.CHECKPOINT_DIR, {"encoder": best["encoder"]}, meta, step=best_step,
                              extra_items={"head": head})
  print(pathlib.Path(paths["markdown"]).read_text())
  log.info("selected step %d; checkpoint %s; report %s (%.0f s)", best_step, path, workdir, time.time() - start)
  return 0
