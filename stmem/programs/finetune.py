"""`stmem finetune`: train an encoder and a linear head on a labelled task; select on validation; test once.

  stmem finetune --config finetune:PRESET [--config.init_from=CKPT] --workdir DIR     (see configs/finetune.py)

Reads top to bottom like pretraining: mesh, encoder, data (one task; its train/validation/test splits), model and
head created in their shardings, restore, the jitted and donated update step, the sharded evaluation, the train loop
(metrics, checkpoints at every evaluation with the best-so-far model, SIGTERM, NaN guard), then the test split scored
once with the selected model, the report and the selected model's checkpoint. The loop is `stmem.train_loop`, the
one pretraining runs. Running the same command again resumes from the latest readable training checkpoint in
WORKDIR/train_state with exactly the next batch.
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmem import workdir_hold

DEFAULT_CONFIG = "finetune"  # configs/finetune.py, found by name from any directory (stmem.configflags)
TRAIN_STATE_DIR = "train_state"  # the training checkpoints; WORKDIR/checkpoints holds the selected model


def task_data(config, loaded):
  """The task and its splits, as sources the pipeline reads: (task, {split: (indices, source)}, contract, notes).

  The data's own splits when it has them, else the one patient-grouped split (`builder_base.split_names`)."""
  from data_pipelines import builder_base
  from stmem import data
  from stmem import features
  pools, task_list = data.task_pools([config.task], loaded.contract, config.data,
                                     labels=[x for x in config.labels.split(",") if x], kind=config.kind,
                                     seed=int(config.seed))
  pool_key, task = task_list[0]
  pool = pools[pool_key]
  split = pool.split if pool.fixed_splits else builder_base.split_names(pool.patient_id)
  source, contract, adapted = features.adapt(loaded.contract, pool.contract, pool.source, config.data.lead_set)
  from data_pipelines.errors import DataError
  indices = {name: np.flatnonzero(task.keep & (split == name)) for name in data.SPLITS}
  empty = [name for name, idx in indices.items() if not len(idx)]
  if empty:  # a small dataset: 80/10/10 of a few patients can leave a split with nobody in it
    counts = {name: len(idx) for name, idx in indices.items()}
    raise DataError(f"task {task.name}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
                    f"(records per split: {counts}); fine-tuning selects on validation and scores test once, so it "
                    f"needs all three: use more records, or `stmem probe` (cross-validation) for a set this small")
  subsets = {name: (idx, data.Subset(source, idx, task.labels[idx])) for name, idx in indices.items()}
  return task, subsets, contract, [f"adapted {line}" for line in adapted]


def class_weights(labels: np.ndarray, kind: str, how: str):
  """None, or per-class weights from the training labels: inverse frequency (multi-class), negatives/positives
  (multi-label)."""
  if how != "balanced":
    return None
  if kind == "multiclass":
    counts = np.maximum(labels.sum(0), 1)
    return jnp.asarray(len(labels) / (len(counts) * counts), jnp.float32)
  pos = np.maximum(labels.sum(0), 1)
  return jnp.asarray((len(labels) - pos) / pos, jnp.float32)


@workdir_hold.held("finetune")  # one writer per workdir; a workdir belongs to one program
def run(config, workdir: str | pathlib.Path, *, stop_after: int | None = None) -> dict:
  """Fine-tune, select on validation, test once; returns a summary. `stop_after` ends the loop early without a
  save (tests use it to stand in for a crash)."""
  from data_pipelines import transforms
  from stmem import augment, checkpoint as ckpt_lib, console, data, models, scoring, sharding as sharding_lib, steps
  from stmem import features, report, train_loop
  from stmem.models import model_config

  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  log = console.Log("finetune")
  start = time.time()

  # ---------------------------------------------------------------------------------------------------- mesh
  mesh = sharding_lib.mesh_from_config(config)
  batch_sharding, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  processes = jax.process_count()
  if config.batch_size % mesh.size:  # (the devices are a multiple of the processes)
    raise ValueError(f"--config.batch_size={config.batch_size} must be a multiple of the {mesh.size} devices")

  # ---------------------------------------------------------------------------------------------------- encoder
  if config.init_from:
    loaded = features.load_encoder(config.init_from)
    origin = f"{config.init_from} (fingerprint {loaded.fingerprint})"
  else:
    loaded = features.random_encoder(model_config(config.model.variant), seed=int(config.seed))
    origin = f"from scratch ({config.model.variant})"
  log(f"encoder: {origin}")

  # ---------------------------------------------------------------------------------------------------- data
  task, subsets, contract, notes = task_data(config, loaded)
  for line in notes:
    log(line)
  log(f"task {task.name}: {({k: len(v[0]) for k, v in subsets.items()})}")
  class_weight = class_weights(task.labels[subsets["train"][0]], task.kind, config.class_weighting)
  starts = transforms.eval_starts(contract.record_samples, contract.window)

  def make_train_iter(state=None):
    return data.make_iterator(subsets["train"][1], contract, state=state, batch_size=config.batch_size // processes,
                              train=True, seed=int(config.seed), lead_set=config.data.lead_set)

  # ---------------------------------------------------------------------------------------------- model and optimiser
  model = models.Classifier(loaded.encoder, task.labels.shape[1], float(config.drop_path), rngs=nnx.Rngs(int(config.seed)))
  graphdef, host_params = nnx.split(model, nnx.Param)
  host_params = jax.tree.map(np.asarray, host_params.to_pure_dict())
  ft = steps.finetune_step(config, mesh, graphdef, host_params, kind=task.kind, depth=loaded.encoder.cfg.depth,
                           class_weight=class_weight)
  param_shardings, opt_shardings = ft.param_shardings, ft.opt_shardings
  # Every device receives only its shard of the encoder read from the checkpoint and of the new head.
  params = sharding_lib.place(host_params, param_shardings)
  opt_state = sharding_lib.place(ft.tx.init, opt_shardings, params)
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=param_shardings)  # best-so-far snapshot

  # ---------------------------------------------------------------------------------------------------- checkpoint
  # A training checkpoint at every evaluation, with the best-so-far model as its item `best`.
  checkpointer = ckpt_lib.Checkpointer(workdir / TRAIN_STATE_DIR, every=config.eval_every,
                                       keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  start_step, restored = train_loop.restore(checkpointer, log, params=host_params, opt_state=ft.abstract_opt,
                                            param_shardings=param_shardings, opt_shardings=opt_shardings,
                                            extra_items={"best": (host_params, param_shardings)})
  best = {"params": None, "score": -np.inf, "step": -1}
  data_state = None
  if restored is not None:
    params, opt_state, data_state = restored["params"], restored["opt_state"], restored.get("data_state")
    saved = restored["meta"]
    best["step"] = saved["best_step"]
    best["score"] = saved["best_score"] if saved["best_score"] is not None else -np.inf
    if best["step"] >= 0:
      best["params"] = restored["best"]
  train_it = make_train_iter(data_state)

  # ---------------------------------------------------------------------------------------------------- update step
  key = jax.random.key(int(config.seed))
  ok = jax.device_put(jnp.asarray(True), replicated)

  def update(params, opt_state, batch, step, ok):
    if config.randaugment:  # the RNG of a row is a function of (seed, step, process, row): resumes exactly
      batch = augment.augment_batch(batch, int(config.seed) * 1_000_003 + jax.process_index(), step + 1,
                                    num_ops=int(config.randaugment_ops), prob=float(config.randaugment_prob))
    arrays = data.to_global({k: batch[k] for k in ("signal", "lead_ids", "lead_mask", "labels")}, batch_sharding)
    params, opt_state, loss, ok = ft.jitted(params, opt_state, arrays, jax.random.fold_in(key, step + 1), ok)
    return params, opt_state, {"train_loss": loss}, ok

  # ---------------------------------------------------------------------------------------------------- evaluation
  link = (lambda z: jax.nn.softmax(z, -1)) if task.kind == "multiclass" else jax.nn.sigmoid
  predict = jax.jit(lambda p, *b: features.crop_mean(lambda *x: link(nnx.merge(graphdef, p)(*x)))(*b),
                    in_shardings=(param_shardings, batch_sharding, batch_sharding, batch_sharding),
                    out_shardings=replicated)

  def evaluate(params, name: str) -> dict:
    """The split's records, each scored by its class probabilities averaged over its evaluation crops."""
    probs, labels, pids = [], [], []
    for out, rows in features.eval_pass(lambda *b: predict(params, *b), subsets[name][1], contract,
                                         batch_size=config.eval_batch_size, lead_set=config.data.lead_set,
                                         starts=starts, batch_sharding=batch_sharding,
                                         host_keys=("valid", "labels", "patient_id")):
      valid = rows["valid"]
      probs.append(np.asarray(out)[valid])
      labels.append(rows["labels"][valid])
      pids.append(rows["patient_id"][valid])
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    eps = 1e-7
    if task.kind == "multiclass":
      loss = float(-np.mean(np.sum(labels * np.log(probs + eps), -1)))
    else:
      loss = float(-np.mean(np.sum(labels * np.log(probs + eps) + (1 - labels) * np.log(1 - probs + eps), -1)))
    return {"loss": loss, "auroc": scoring.macro_metrics(labels, probs)["auroc"], "probs": probs,
            "labels": labels, "patient_id": np.concatenate(pids).astype(str)}

  def validate(step: int, params) -> dict[str, float]:
    """At every evaluation step: the validation split scored, the best-so-far model kept (selection sees only it)."""
    val = evaluate(params, "validation")
    score = -val["loss"] if config.select_on == "loss" else val["auroc"]
    if np.isfinite(score) and score > best["score"]:
      best.update(params=copy(params), score=score, step=step)
    return {"val_loss": val["loss"], "val_auroc": val["auroc"], "best_step": best["step"],
            "seconds": round(time.time() - start, 1)}

  def save_items(params) -> tuple[dict, dict]:
    score = float(best["score"]) if np.isfinite(best["score"]) else None
    return ({"best_step": best["step"], "best_score": score},
            {"best": best["params"] if best["params"] is not None else params})

  # ---------------------------------------------------------------------------------------------------- train loop
  # Fine-tuning steps are few: a SIGTERM is agreed at every step, so it stops at the next one.
  loop = train_loop.Loop(workdir, checkpointer, log=log, total_steps=config.total_steps, log_every=config.eval_every,
                         meta={"origin": "stmem finetune", "task": task.name}, schedule=ft.schedule,
                         batch_size=config.batch_size, extra_due=lambda step: step % config.eval_every == 0,
                         on_sync=validate, save_items=save_items, stop_check_every=1, stop_after=stop_after)
  result = loop.run(update, params, opt_state, train_it, start_step, ok)
  summary = {"workdir": str(workdir), "start_step": start_step, "step": result.step}
  if result.preempted or result.stopped:
    return {**summary, **({"preempted": True} if result.preempted else {"stopped": True})}
  best_params, best_step = best["params"], best["step"]
  if best_params is None:
    best_params, best_step = result.params, result.step

  # ---------------------------------------------------------------------------------------------------- test, once
  val = evaluate(best_params, "validation")
  test = evaluate(best_params, "test")
  multiclass = task.kind == "multiclass"
  thresholds = None if multiclass else scoring.thresholds_for(val["labels"], val["probs"])
  predicted = scoring.predictions(test["probs"], thresholds, multiclass)
  row, curve = report.task_row(report.task_title(task.name, config),
                               "fine-tuned" if config.init_from else "from scratch", config.data.lead_set,
                               test["labels"], test["probs"], predicted, test["patient_id"],
                               class_names=task.label_names, multiclass=multiclass, protocol="train/validation/test",
                               n_resamples=int(config.bootstrap), seed=int(config.seed), l2="")
  notes = [f"encoder: {origin}", f"selected step {best_step} of {config.total_steps} on validation {config.select_on}",
           "test split scored once, with the selected model; F1 thresholds chosen on validation",
           f"intervals: 95 % percentile bootstrap over patients ({config.bootstrap} resamples)"]
  if is_main:
    paths = report.write(workdir, [row], title="Fine-tuning", curves={row["task"]: {f"{config.data.lead_set}": curve}},
                         notes=notes, info={"config": config.to_dict(), "best_step": best_step})
    log.text(pathlib.Path(paths["markdown"]).read_text())

  # -------------------------------------------------------------------------------------------- the selected model
  # An encoder-only checkpoint (every program loads it) with the head as its own item (`checkpoint.read_item`).
  selected = workdir / ckpt_lib.CHECKPOINT_DIR
  path = selected / str(best_step)
  if not path.exists():  # a re-run of a finished fine-tuning has written it already
    head = {"kernel": np.asarray(best_params["head"]["kernel"]), "bias": np.asarray(best_params["head"]["bias"])}
    meta = ckpt_lib.make_meta(loaded.encoder.cfg, loaded.contract, config=config.to_dict(), step=best_step,
                              encoder_only=True, origin="stmem finetune",
                              extra={"head": {"label_names": list(task.label_names), "kind": task.kind},
                                     "parent": origin, "task": task.name})
    path = ckpt_lib.save_params(selected, {"encoder": best_params["encoder"]}, meta, step=best_step,
                                extra_items={"head": head})
  log(f"selected step {best_step}; checkpoint {path}; report {workdir} ({time.time() - start:.0f} s)")
  return {**summary, "best_step": best_step, "checkpoint": str(path), "auroc": row["auroc"]}


def main(argv: Sequence[str]) -> int:
  from stmem import entry
  return entry.main(argv, run, program="finetune", config=DEFAULT_CONFIG + ":prepared")
