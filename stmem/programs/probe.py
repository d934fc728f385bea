"""`stmem probe`: a linear probe of a frozen encoder on one or more tasks, swept over lead sets.

  stmem probe --config configs/probe.py:shared --config.init_from=CKPT --workdir DIR   (see configs/probe.py)

Read top to bottom: encoders (the checkpoint and a randomly initialised twin), data (pools of records and tasks over
them), then for every pool and lead set one feature pass feeding every encoder, then for every task a logistic
regression per fold (L2 chosen on validation, F1 thresholds chosen on validation, the test rows scored once), then
the report with 95 % patient-level bootstrap intervals.
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

import numpy as np

DEFAULT_CONFIG = "probe"  # configs/probe.py, found by name from any directory (stmem.configflags)


def _csv(text: str) -> list[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def evaluation_folds(task, pool, config) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """(train, validation, test) weights (K, N_pool) for the task's records, and the protocol's name.

  Fixed splits when the data has them (K = 1); else patient-grouped K-fold: test fold k, validation fold k + 1,
  training the rest, so every record is scored exactly once, by a head that never saw its patient.
  """
  from stmem import scoring
  keep = task.keep
  if pool.fixed_splits and config.use_splits:
    return ((keep & (pool.split == "train"))[None], (keep & (pool.split == "validation"))[None],
            (keep & (pool.split == "test"))[None], "train/validation/test splits")
  k = int(config.cv_folds)
  idx = np.flatnonzero(keep)
  fold = np.full(len(keep), -1)
  fold[idx] = scoring.grouped_folds(pool.patient_id[idx], k, seed=config.seed, labels=task.labels[idx])
  test = np.stack([fold == f for f in range(k)])
  val = np.stack([fold == (f + 1) % k for f in range(k)])
  train = keep[None] & ~test & ~val
  return train, val, test, f"{k}-fold patient-grouped cross-validation"


def probe_task(x: np.ndarray, task, weights, config) -> dict:
  """Out-of-fold test scores, binary predictions and chosen L2s of a task on features x (N_pool, D)."""
  from stmem import scoring
  from stmem import linear_heads
  train, val, test = weights
  multiclass = task.kind == "multiclass"
  heads = linear_heads.fit_folds(x, task.labels, train, tuple(config.l2_grid), task.kind, int(config.lbfgs_steps))
  scores = np.full(task.labels.shape, np.nan, np.float32)
  predicted = np.zeros(task.labels.shape, bool)
  l2s = []
  for k, fold_heads in enumerate(heads):
    v, t = val[k], test[k]
    head, _ = linear_heads.select(fold_heads, x[v], task.labels[v], on=config.select_on)
    thresholds = None if multiclass else scoring.thresholds_for(task.labels[v], head.predict(x[v]))
    s = head.predict(x[t])
    scores[t] = s
    predicted[t] = scoring.predictions(s, thresholds, multiclass)
    l2s.append(head.l2)
  tested = test.any(axis=0)
  return {"rows": tested, "scores": scores[tested], "predicted": predicted[tested], "l2": l2s}


def summarise(task, model: str, lead_set: str, out: dict, pool, protocol: str, config) -> tuple[dict, tuple]:
  """A report row (macro and per-class metrics with patient-bootstrap intervals, warnings) and the ROC curve."""
  from stmem import report
  return report.task_row(report.task_title(task.name, config), model, lead_set, task.labels[out["rows"]],
                         out["scores"], out["predicted"], pool.patient_id[out["rows"]],
                         class_names=task.label_names, multiclass=task.kind == "multiclass", protocol=protocol,
                         n_resamples=int(config.bootstrap), seed=int(config.seed), l2=float(np.median(out["l2"])))


def main(argv: Sequence[str]) -> int:
  from stmem import configflags
  config, workdir = configflags.parse(argv, "stmem probe", DEFAULT_CONFIG + ":shared")
  from stmem.metrics import console_logger
  log = console_logger("stmem.probe")
  start = time.time()

  from data_pipelines import leads as leads_lib
  from stmem import data
  from stmem.models import model_config
  from stmem import sharding as sharding_lib
  from stmem import features, report, sharded_eval
  from stmem.steps import parse_mesh

  # ------------------------------------------------------------------------------------------ mesh
  # The feature pass splits every batch over the devices of every process; the heads are fitted on the host.
  import jax
  mesh = sharding_lib.make_mesh(parse_mesh(config.mesh), devices=sharding_lib.program_devices(config.num_devices))

  # ------------------------------------------------------------------------------------------ encoders
  if config.init_from:
    main_encoder = features.load_encoder(config.init_from)
    log.info("checkpoint %s (fingerprint %s, %s)", config.init_from, main_encoder.fingerprint,
             main_encoder.meta.get("origin", "?"))
    encoders = {"checkpoint": main_encoder}
  else:
    main_encoder = features.random_encoder(model_config(config.model.variant), seed=int(config.random_seed))
    log.info("no checkpoint: random-encoder rows only (%s)", config.model.variant)
    encoders = {}
  if config.random_baseline or not encoders:
    encoders["random init"] = features.random_encoder(main_encoder, seed=int(config.random_seed))
  lead_sets = _csv(config.lead_sets)
  for ls in lead_sets:
    leads_lib.parse_lead_set(ls)  # refuse a bad lead set before any data is read

  # ------------------------------------------------------------------------------------------ data
  pools, task_list = data.task_pools(_csv(config.tasks), main_encoder.contract, config.data,
                                     labels=_csv(config.labels), kind=config.kind, seed=int(config.seed))
  notes = [f"encoder: {config.init_from or config.model.variant} (fingerprint {main_encoder.fingerprint}); "
           f"random init: same architecture, seed {config.random_seed}"]

  # ------------------------------------------------------------------------------------------ features and heads
  rows, curves = [], {}
  for pool_name, pool in pools.items():
    if pool.quarantine.get("total"):
      notes.append(f"{pool.name}: {pool.quarantine['total']} records skipped {pool.quarantine['by_reason']}")
    pool_tasks = [t for key, t in task_list if key == pool_name]
    protocols = {t.name: evaluation_folds(t, pool, config) for t in pool_tasks}
    for lead_set in lead_sets:
      source, contract, adapted = features.adapt(main_encoder.contract, pool.contract, pool.source, lead_set)
      for line in adapted:
        notes.append(f"{pool.name}: adapted {line}")
      t0 = time.time()
      feats = sharded_eval.extract(encoders, source, contract, mesh=mesh, lead_set=lead_set,
                                   batch_size=int(config.batch_size), last_blocks=int(config.last_blocks))
      if not np.array_equal(feats["record_id"], pool.record_id):
        raise RuntimeError(f"{pool.name}: the feature pass returned records in another order than the pool")
      log.info("%s, lead set %s: features of %d examples in %.1f s", pool.name, lead_set, len(pool.record_id),
               time.time() - t0)
      for task in pool_tasks:
        for model, x in feats["features"].items():
          out = probe_task(x, task, protocols[task.name][:3], config)
          row, curve = summarise(task, model, lead_set, out, pool, protocols[task.name][3], config)
          rows.append(row)
          if model == "checkpoint" or len(encoders) == 1 or lead_set == lead_sets[0]:
            curves.setdefault(row["task"], {})[f"{lead_set} ({model})"] = curve
          log.info("%-12s %-12s %-10s AUROC %.3f [%.3f, %.3f]", row["task"], model, lead_set, row["auroc"],
                   row["auroc_lo"], row["auroc_hi"])

  # ------------------------------------------------------------------------------------------ report
  notes += [f"{report.task_title(t.name, config)}: {evaluation_folds(t, pools[key], config)[3]}"
            for key, t in task_list]
  notes.append(f"intervals: 95 % percentile bootstrap over patients ({config.bootstrap} resamples); F1 thresholds "
               f"chosen on validation; L2 chosen on validation {config.select_on}")
  paths = report.write(workdir, rows, title="Linear probe", curves=curves, notes=notes,
                       info={"config": config.to_dict(), "fingerprint": main_encoder.fingerprint,
                             "contract": main_encoder.contract.to_dict(), "seconds": round(time.time() - start, 1)})
  print(pathlib.Path(paths["markdown"]).read_text())
  log.info("report in %s (%.0f s)", workdir, time.time() - start)
  return 0
