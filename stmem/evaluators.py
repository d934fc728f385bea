"""Evaluators: what pretraining measures while it trains, and what the programs that evaluate a checkpoint run.

`config.evals` is a ConfigDict {name: ConfigDict(type=..., every=..., ...)}, as big_vision's: `type` ("heldout" or
"probe"; default the name) chooses the evaluator, `every` its cadence in optimiser steps (it also runs once at the
end of training), and the other keys are its own. Each evaluator is built once, its data read and kept; `run(model)`
returns {metric: value}, which the trainer writes under `eval/NAME/` (`eval/probe/12/auroc`).

- `heldout` (`HeldOut`): the masked reconstruction loss on records pretraining never sees (the simulator with
  another seed, or a prepared split), with a fixed masking key per batch: every run scores the same ECGs under the
  same masks. `stmem study`'s held-out loss is this evaluator.
- `probe` (`Probe`): a probe of the frozen encoder on a task, swept over lead sets, blocks and heads: the sharded
  feature pass (`stmem.features.extract`, every block asked for from one forward pass), heads fitted per fold
  (logistic regression, `stmem.linear_heads`; a one-hidden-layer MLP, `stmem.mlp_head`), each chosen on validation,
  the metrics with their patient-bootstrap intervals (`stmem.report` / `stmem.scoring`); optionally the same
  architecture randomly initialised beside it. `stmem probe` is this evaluator run on a checkpoint.

Evaluators read from the devices; the trainer runs them only at steps where it syncs anyway.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from data_pipelines.errors import UsageError

TYPES = ("heldout", "probe")
HEADS = ("linear", "mlp")  # the probe's heads: logistic regression (stmem.linear_heads), MLP (stmem.mlp_head)


@dataclasses.dataclass(frozen=True)
class Model:
  """What an evaluator scores: a pretraining model (ST-MEM, MTAE or MLAE) as its graphdef, its parameters (a pure
  dict, or an `nnx.State`; on the devices, in whatever shardings the caller keeps them) and its `ModelConfig`."""
  graphdef: Any
  params: Any
  cfg: Any


def _csv(text: Any) -> list[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def _get(config: Any, key: str, default: Any) -> Any:
  value = config.get(key, default) if hasattr(config, "get") else default
  return default if value is None else value


# ------------------------------------------------------------------------------------------------ held-out loss


def heldout_batches(pool: Any, *, batch_size: int, seed: int, lead_set: Any, num_batches: int = 0) -> list[dict]:
  """The held-out batches as pretraining sees examples (random crop, z-score), this process's rows of each global
  batch, on the host. The crops are a function of (seed, index): two pools of the same records (the simulator's
  noisy and clean twins) give the same crops. `num_batches` 0: every complete batch."""
  from stmem import data
  processes = jax.process_count()
  available = len(pool.source) // batch_size
  n = min(num_batches, available) if num_batches else available
  if n < 1:
    raise UsageError(f"held-out evaluation: {len(pool.source)} records do not fill one batch of {batch_size}; "
                     f"use more records or a smaller batch_size")
  it = data.make_iterator(pool.source, pool.contract, batch_size=batch_size // processes, train=True, seed=seed,
                          lead_set=lead_set)
  return [{k: np.asarray(b[k]) for k in ("signal", "lead_ids", "lead_mask")} for _, b in zip(range(n), it)]


class HeldOut:
  """Masked reconstruction loss on held-out records, one fixed masking key per batch.

  Keys: `data` (a data block, as pretraining's: `source`, `num_synthetic`, `data_dir`, `split`, ...), `seed` (the
  simulator's seed, the crops' and nothing else: use one pretraining does not), `batch_size` (rounded up to the
  mesh's devices), `num_batches` (0: every complete batch). Returns {"loss": mean over the batches}.
  """

  def __init__(self, config: Any, *, contract: Any, mesh: Any, lead_set: Any = "12"):
    from stmem import data, sharding as sharding_lib
    self.seed = int(_get(config, "seed", 0))
    self.spec = data.spec_from_config(_get(config, "data", {}), seed=self.seed)
    self.pool = data.open_pool(self.spec, contract)
    devices = mesh.size
    self.batch_size = -(-int(_get(config, "batch_size", 32)) // devices) * devices
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    self.replicated = sharding_lib.replicated(mesh)
    self.lead_set = lead_set
    self.batches = heldout_batches(self.pool, batch_size=self.batch_size, seed=self.seed, lead_set=lead_set,
                                   num_batches=int(_get(config, "num_batches", 0)))
    self._forward: dict[Any, Callable] = {}

  def forward(self, graphdef) -> Callable:
    """(params, signal, lead_ids, lead_mask, i) -> the model's outputs (loss, pred, mask) on held-out batch i under
    its fixed mask (masking key i), replicated; jitted once per architecture."""
    if graphdef not in self._forward:
      self._forward[graphdef] = jax.jit(
        lambda params, signal, ids, present, i: nnx.merge(graphdef, params)(signal, ids, present,
                                                                           key=jax.random.key(i)),
        out_shardings=self.replicated)
    return self._forward[graphdef]

  def losses(self, model: Model) -> list[float]:
    from stmem import data
    fn = self.forward(model.graphdef)
    out = []
    for i, batch in enumerate(self.batches):
      arrays = data.to_global(batch, self.batch_sharding)
      out.append(fn(model.params, arrays["signal"], arrays["lead_ids"], arrays["lead_mask"], i)["loss"])
    return [float(x) for x in out]

  def run(self, model: Model) -> dict[str, float]:
    return {"loss": float(np.mean(self.losses(model)))}


# ------------------------------------------------------------------------------------------------ linear probe

# The probe's keys and their defaults, as configs/probe.py has them (tests/test_evaluators.py holds the two equal):
# a probe block in another config names only what it changes.
PROBE_DEFAULTS = {
  "tasks": "synthetic", "labels": "", "kind": "multilabel", "lead_sets": "12", "use_splits": True, "cv_folds": 5,
  "blocks": "last", "heads": "linear",
  "l2_grid": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0), "lbfgs_steps": 100,
  "mlp_hidden": 256, "mlp_l2_grid": (1e-3, 1e-2, 0.1), "mlp_steps": 200, "mlp_snapshots": 4, "mlp_lr": 1e-2,
  "select_on": "auroc", "random_baseline": True, "random_seed": 1234, "bootstrap": 1000, "batch_size": 32, "seed": 0,
}
# Metric names leave out a block or a head that is the default, so that a probe of the last block with the linear
# head logs what it always did (eval/probe/12/auroc); eval/probe/12/6/mlp/auroc is block 6's MLP head.
DEFAULT_BLOCK, DEFAULT_HEAD = "last", "linear"


def evaluation_folds(task, pool, config) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """(train, validation, test) weights (K, N_pool) for the task's records, and the protocol's name.

  Fixed splits when the data has them (K = 1); else patient-grouped K-fold: test fold k, validation fold k + 1,
  training the rest, so every record is scored exactly once, by a head that never saw its patient.
  """
  from stmem import scoring
  keep = task.keep
  if pool.fixed_splits and config["use_splits"]:
    return ((keep & (pool.split == "train"))[None], (keep & (pool.split == "validation"))[None],
            (keep & (pool.split == "test"))[None], "train/validation/test splits")
  k = int(config["cv_folds"])
  idx = np.flatnonzero(keep)
  fold = np.full(len(keep), -1)
  fold[idx] = scoring.grouped_folds(pool.patient_id[idx], k, seed=int(config["seed"]), labels=task.labels[idx])
  test = np.stack([fold == f for f in range(k)])
  val = np.stack([fold == (f + 1) % k for f in range(k)])
  train = keep[None] & ~test & ~val
  return train, val, test, f"{k}-fold patient-grouped cross-validation"


def fit_heads(x: np.ndarray, task, train: np.ndarray, config, head: str = "linear") -> list[list]:
  """Candidate heads per fold (heads[k]) of one kind on features x (N_pool, D), for `linear_heads.select`."""
  from stmem import linear_heads, mlp_head
  if head == "linear":
    return linear_heads.fit_folds(x, task.labels, train, tuple(config["l2_grid"]), task.kind,
                                  int(config["lbfgs_steps"]))
  if head == "mlp":
    return mlp_head.fit_folds(x, task.labels, train, tuple(config["mlp_l2_grid"]), task.kind,
                              hidden=int(config["mlp_hidden"]), steps=int(config["mlp_steps"]),
                              snapshots=int(config["mlp_snapshots"]), lr=float(config["mlp_lr"]),
                              seed=int(config["seed"]))
  raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def probe_task(x: np.ndarray, task, weights, config, head: str = "linear") -> dict:
  """Out-of-fold test scores, binary predictions and chosen L2s (and, for the MLP, training steps) of a task on
  features x (N_pool, D) with heads of kind `head`, each chosen on its fold's validation rows."""
  from stmem import linear_heads, scoring
  train, val, test = weights
  multiclass = task.kind == "multiclass"
  heads = fit_heads(x, task, train, config, head)
  scores = np.full(task.labels.shape, np.nan, np.float32)
  predicted = np.zeros(task.labels.shape, bool)
  l2s, steps = [], []
  for k, fold_heads in enumerate(heads):
    v, t = val[k], test[k]
    chosen, _ = linear_heads.select(fold_heads, x[v], task.labels[v], on=config["select_on"])
    thresholds = None if multiclass else scoring.thresholds_for(task.labels[v], chosen.predict(x[v]))
    s = chosen.predict(x[t])
    scores[t] = s
    predicted[t] = scoring.predictions(s, thresholds, multiclass)
    l2s.append(chosen.l2)
    steps.append(getattr(chosen, "steps", 0))
  tested = test.any(axis=0)
  return {"rows": tested, "scores": scores[tested], "predicted": predicted[tested], "l2": l2s, "steps": steps}


class Probe:
  """A probe of the frozen encoder on one or more tasks, swept over lead sets, blocks and heads (keys:
  `PROBE_DEFAULTS`, and a `data` block saying where the tasks' records are: `num_synthetic`, `records`, `data_dir`,
  `lead_map`).

  `rows(encoders)` gives the report rows and ROC curves of any encoders (`stmem probe` writes them);
  `run(model)` probes a pretraining model's encoder, the random-encoder rows computed once beside it, and returns
  {"LEAD_SET/auroc", "LEAD_SET/auroc_lo", "LEAD_SET/auroc_hi", "LEAD_SET/random_auroc"} (each name led by
  "TASK/" when it probes several tasks, and followed by "/BLOCK" and "/HEAD" for a block other than `last` and a
  head other than `linear`).

  `depth`, the encoder's number of blocks, checks the block specs now (else at the first `run`); `key` is how a
  usage error names this probe's keys (`--config` for `stmem probe`, `--config.evals.NAME` for an evaluator).
  """

  def __init__(self, config: Any, *, contract: Any, mesh: Any, log: Callable[[str], None] | None = None,
               depth: int | None = None, key: str = "--config"):
    from data_pipelines import leads as leads_lib
    from stmem import data, features
    self.config = {k: _get(config, k, v) for k, v in PROBE_DEFAULTS.items()}
    self.data_config = _get(config, "data", {})
    self.mesh, self.contract, self.log, self.key = mesh, contract, log or (lambda _: None), key
    self.lead_sets = _csv(self.config["lead_sets"])
    for ls in self.lead_sets:
      leads_lib.parse_lead_set(ls)  # refuse a bad lead set before any data is read
    self.blocks = features.parse_blocks(str(self.config["blocks"]), depth, key=f"{key}.blocks")
    self.depth = depth
    self.heads = _csv(self.config["heads"])
    unknown = [h for h in self.heads if h not in HEADS]
    if unknown or not self.heads or len(set(self.heads)) < len(self.heads):
      raise UsageError(f"{key}.heads={self.config['heads']!r}: give each of the heads {', '.join(HEADS)} at most "
                       f"once, comma-separated")
    steps, snapshots = int(self.config["mlp_steps"]), int(self.config["mlp_snapshots"])
    if "mlp" in self.heads and not (1 <= snapshots <= steps and steps % snapshots == 0):
      raise UsageError(f"{key}.mlp_snapshots={snapshots}: the MLP head keeps its parameters every mlp_steps / "
                       f"mlp_snapshots steps; give a divisor of {key}.mlp_steps={steps}")
    self.pools, self.tasks = data.task_pools(_csv(self.config["tasks"]), contract, self.data_config,
                                            labels=_csv(self.config["labels"]), kind=self.config["kind"],
                                            seed=int(self.config["seed"]))
    self.protocols = {t.name: evaluation_folds(t, self.pools[key], self.config) for key, t in self.tasks}
    self.notes: list[str] = []
    self._random_metrics: dict[str, float] | None = None

  def check_depth(self, depth: int) -> None:
    """Refuse a block spec the encoder's depth does not have (one line naming the spec and the depth)."""
    from stmem import features
    if self.depth != depth:
      features.parse_blocks(self.blocks, depth, key=f"{self.key}.blocks")
      self.depth = depth

  def title(self, task) -> str:
    from stmem import report
    return report.task_title(task.name, {"data": self.data_config})

  def rows(self, encoders: Mapping[str, Any]) -> tuple[list[dict], dict]:
    """Report rows (macro and per-class metrics with patient-bootstrap intervals) of every encoder on every task,
    lead set, block and head, and their ROC curves {task: {"LEAD_SET (MODEL[, block B, HEAD])": curve}}. One
    feature pass per pool and lead set feeds every encoder and every block."""
    from stmem import features, report
    first = self.encoder_depth(encoders)
    if first is not None:
      self.check_depth(first)
    rows, curves = [], {}
    default = (self.blocks[0], self.heads[0])
    for pool_name, pool in self.pools.items():
      pool_tasks = [t for key, t in self.tasks if key == pool_name]
      for lead_set in self.lead_sets:
        source, contract, adapted = features.adapt(self.contract, pool.contract, pool.source, lead_set)
        self.notes += [f"{pool.name}: adapted {line}" for line in adapted if f"{pool.name}: adapted {line}" not in
                       self.notes]
        t0 = time.time()
        feats = features.extract(encoders, source, contract, mesh=self.mesh, lead_set=lead_set,
                                 batch_size=int(self.config["batch_size"]), blocks=self.blocks)
        if not np.array_equal(feats["record_id"], pool.record_id):
          raise RuntimeError(f"{pool.name}: the feature pass returned records in another order than the pool")
        self.log(f"{pool.name}, lead set {lead_set}: features of {len(pool.record_id)} examples in "
                 f"{time.time() - t0:.1f} s")
        for task in pool_tasks:
          train, val, test, protocol = self.protocols[task.name]
          for block in self.blocks:
            for head in self.heads:
              for model, x in feats["blocks"][block].items():
                out = probe_task(x, task, (train, val, test), self.config, head)
                extra = {"steps": int(np.median(out["steps"]))} if head == "mlp" else {}
                row, curve = report.task_row(
                  self.title(task), model, lead_set, task.labels[out["rows"]], out["scores"], out["predicted"],
                  pool.patient_id[out["rows"]], class_names=task.label_names, multiclass=task.kind == "multiclass",
                  protocol=protocol, n_resamples=int(self.config["bootstrap"]), seed=int(self.config["seed"]),
                  block=block, head=head, l2=float(np.median(out["l2"])), **extra)
                rows.append(row)
                shown = model == "checkpoint" or len(encoders) == 1
                if (block, head) == default and (shown or lead_set == self.lead_sets[0]):
                  curves.setdefault(row["task"], {})[f"{lead_set} ({model})"] = curve
                elif shown and lead_set == self.lead_sets[0]:
                  curves.setdefault(row["task"], {})[f"{lead_set} ({model}, block {block}, {head})"] = curve
                self.log(f"{row['task']:<12} {model:<12} {lead_set:<10} {block:<6} {head:<6} AUROC "
                         f"{row['auroc']:.3f} [{row['auroc_lo']:.3f}, {row['auroc_hi']:.3f}]")
    return rows, curves

  @staticmethod
  def encoder_depth(encoders: Mapping[str, Any]) -> int | None:
    for e in encoders.values():
      cfg = getattr(getattr(e, "encoder", e), "cfg", None)
      if cfg is not None:
        return int(cfg.depth)
    return None

  def metrics(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`{"TASK/LEAD_SET/BLOCK/HEAD/auroc": macro AUROC, "..._lo", "..._hi": its interval}` of the "checkpoint" rows
    and `{"TASK/LEAD_SET/BLOCK/HEAD/random_auroc"}` of the "random init" rows; `TASK/` only when the probe has
    several tasks, `BLOCK/` and `HEAD/` only when they are not `last` and `linear`."""
    several = len(self.tasks) > 1
    out = {}
    for r in rows:
      name = f"{r['task']}/{r['lead_set']}" if several else r["lead_set"]
      if r.get("block", DEFAULT_BLOCK) != DEFAULT_BLOCK:
        name += f"/{r['block']}"
      if r.get("head", DEFAULT_HEAD) != DEFAULT_HEAD:
        name += f"/{r['head']}"
      if r["model"] == "random init":
        out[f"{name}/random_auroc"] = float(r["auroc"])
      else:
        out.update({f"{name}/{k}": float(r[k]) for k in ("auroc", "auroc_lo", "auroc_hi")})
    return out

  def run(self, model: Model) -> dict[str, float]:
    from stmem import features, sharding as sharding_lib
    from stmem.models import encoder_model
    # The encoder as a checkpoint of this model restores it (stmem.checkpoint.make_meta): same graph, same features.
    cfg = model.cfg.replace(remat="none", attention="xla")
    self.check_depth(int(cfg.depth))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: encoder_model(cfg, rngs=nnx.Rngs(0))))
    params = model.params["encoder"]
    params = jax.jit(lambda p: p, out_shardings=sharding_lib.replicated(self.mesh))(
      params.to_pure_dict() if hasattr(params, "to_pure_dict") else params)
    encoder = nnx.merge(graphdef, params)
    rows, _ = self.rows({"checkpoint": encoder})
    out = self.metrics(rows)
    if self.config["random_baseline"]:
      if self._random_metrics is None:  # the random encoder never changes: its rows once
        random = features.random_encoder(cfg, seed=int(self.config["random_seed"]), contract=self.contract)
        self._random_metrics = self.metrics(self.rows({"random init": random})[0])
      out.update(self._random_metrics)
    return out


# ------------------------------------------------------------------------------------------------ from config


def from_config(evals: Any, *, contract: Any, mesh: Any, model_cfg: Any = None, lead_set: Any = "12",
                log: Callable[[str], None] | None = None) -> list[tuple[str, int, Any]]:
  """[(name, every, evaluator)] of `config.evals`, built once (their data read now); an empty block is an evaluator
  turned off (`--config.evals.probe=`, or `--config.evals=` for all). An unknown type, an `every` below 1, or a
  probe lead set that the model's method refuses is a usage error naming the key."""
  built = []
  for name, block in (evals or {}).items():
    if not block:
      continue
    kind = _get(block, "type", "") or name
    every = int(_get(block, "every", 0))
    if kind not in TYPES:
      raise UsageError(f"--config.evals.{name}.type={kind!r}: an evaluator is one of {', '.join(TYPES)}")
    if every < 1:
      raise UsageError(f"--config.evals.{name}.every={every}: give a cadence of 1 step or more")
    if kind == "heldout":
      evaluator = HeldOut(block, contract=contract, mesh=mesh, lead_set=lead_set)
    else:
      method = getattr(model_cfg, "method", "stmem")
      refused = [s for s in _csv(_get(block, "lead_sets", PROBE_DEFAULTS["lead_sets"])) if s != "12"]
      if method != "stmem" and refused:  # MTAE's and MLAE's tokens need all 12 leads
        raise UsageError(f"--config.evals.{name}.lead_sets: {method} takes the 12 leads only, not {refused}; "
                         f"set --config.evals.{name}.lead_sets=12")
      evaluator = Probe(block, contract=contract, mesh=mesh, log=log, key=f"--config.evals.{name}",
                        depth=getattr(model_cfg, "depth", None))
    built.append((name, every, evaluator))
  return built


def due(evals: Sequence[tuple[str, int, Any]], step: int, total_steps: int) -> list[tuple[str, int, Any]]:
  """The evaluators that run at `step`: those whose cadence divides it, and every one at the last step."""
  return [e for e in evals if step % e[1] == 0 or step == total_steps]


def run(evals: Sequence[tuple[str, int, Any]], model: Model, log: Callable[[str], None] | None = None
        ) -> dict[str, float]:
  """Every evaluator of `evals` on `model`: {"eval/NAME/METRIC": value}, with "eval/NAME/seconds", its cost."""
  out = {}
  for name, _, evaluator in evals:
    t0 = time.perf_counter()
    metrics = evaluator.run(model)
    seconds = time.perf_counter() - t0
    out.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
    out[f"eval/{name}/seconds"] = seconds
    if log is not None:
      shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith(("_lo", "_hi")))
      log(f"eval {name} ({seconds:.1f} s): {shown}")
  return out

