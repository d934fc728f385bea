"""Downstream tasks: named label definitions over the examples of one dataset.

A task is columns of the labels its dataset's builder already writes (LUDB's `label_vector`, CinC's SNOMED
multi-hot, PTB-XL's benchmark classes), optionally restricted to the examples where some column is set, or one
per-example field (sex). Why columns of the builder's labels and not rules of their own: the label rules then
exist once, and a task means the same on raw files read in memory and on the same dataset prepared to disk.

Task names (comma-separated in a program's `tasks`):
  prepared                 every label of a prepared dataset (or the ones chosen by name)
  synthetic                the simulator's classes: version 2's rhythm and findings (`stmem.synthetic.CLASSES_V2`,
                           multi-label), or version 1's `CLASSES`, one per ECG (multi-class)
  ludb_af, ludb_lvh, ludb_axis, ludb_sex
                           LUDB: AF or flutter vs rest, left ventricular hypertrophy, left axis deviation vs normal
                           axis (other axes left out), male vs female (records of unknown sex left out)
  cinc_stach, cinc:CODE[+CODE...]
                           PhysioNet/CinC 2021: sinus tachycardia (SNOMED 427084000), or any scored SNOMED codes
                           as a multi-label task (equivalent codes merged as the Challenge scored them)
  ptbxl_super              PTB-XL's 5 diagnostic superclasses (NORM, MI, STTC, CD, HYP) on its official folds
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipelines.errors import UsageError
from data_pipelines.labels import snomed

KINDS = ("multilabel", "multiclass")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a task is, before any data is read.

  dataset: the builder whose examples the task labels ("ludb", "cinc", "ptbxl"), or "synthetic" / "prepared".
  folder:  where the dataset's raw files sit under a data root (`<records>/<folder>`, or the folder itself).
  options: the builder's keyword options for reading it (tasks with equal dataset and options share one pool).
  columns: the label names that are the task's classes (None: every label of the pool).
  keep_any: examples belong to the task only where one of these columns is 1 (e.g. normal or left axis).
  field:   instead of label columns, a per-example field that is the label ("sex": 1 male, 0 female, -1 left out).
  """
  name: str
  dataset: str
  kind: str = "multilabel"
  folder: str = ""
  options: tuple[tuple[str, str], ...] = ()
  columns: tuple[str, ...] | None = None
  keep_any: tuple[str, ...] = ()
  field: str = ""

  @property
  def pool_key(self) -> str:
    """Tasks with the same key are computed on one pool (one read, one feature pass)."""
    return self.dataset + "".join(f",{k}={v}" for k, v in self.options)


@dataclasses.dataclass(frozen=True)
class Task:
  """A task over a pool: labels (N, C) for every example of the pool, `keep` (N,) the examples that belong to it."""
  name: str
  label_names: tuple[str, ...]
  labels: np.ndarray
  keep: np.ndarray
  kind: str


# Raw CinC is read as one split (cross-validated by patient) with the Challenge's scored classes.
_CINC = dict(dataset="cinc", folder="cinc2021", options=(("codes", "scored"), ("splits", "train=1")))
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
  TaskSpec("synthetic", "synthetic", kind="multiclass"),
  TaskSpec("ludb_af", "ludb", folder="ludb", columns=("af_or_flutter",)),
  TaskSpec("ludb_lvh", "ludb", folder="ludb", columns=("lvh",)),
  TaskSpec("ludb_axis", "ludb", folder="ludb", columns=("axis_left_deviation",),
           keep_any=("axis_normal", "axis_left_deviation")),
  TaskSpec("ludb_sex", "ludb", folder="ludb", field="sex"),
  TaskSpec("cinc_stach", columns=("427084000",), **_CINC),
  TaskSpec("ptbxl_super", "ptbxl", folder="ptbxl", options=(("task", "superdiagnostic"),)),
)}


def task_spec(name: str, *, labels: Sequence[str] = (), kind: str = "multilabel") -> TaskSpec:
  """The spec of a task name; `labels` and `kind` apply to `prepared` (its chosen label names, its link)."""
  if kind not in KINDS:
    raise UsageError(f"kind must be one of {KINDS}, not {kind!r}")
  if name == "prepared":
    return TaskSpec("prepared", "prepared", kind=kind, columns=tuple(labels) or None)
  if name.startswith("cinc:"):
    codes = snomed.parse_dx(name.split(":", 1)[1].replace("+", ","))
    if not codes:
      raise UsageError(f"task {name!r} names no SNOMED code (write cinc:CODE+CODE)")
    return TaskSpec(name, columns=tuple(snomed.EQUIVALENT_CODES.get(c, c) for c in codes), **_CINC)
  if name not in TASKS:
    raise UsageError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}, prepared, cinc:CODE+CODE "
                     f"(data_pipelines/labels/tasks.py)")
  return TASKS[name]


def make_task(spec: TaskSpec, label_names: Sequence[str], labels: np.ndarray,
              fields: Mapping[str, np.ndarray] | None = None) -> Task:
  """The task's labels over a pool with `label_names`, `labels` (N, C) and per-example `fields` (e.g. `sex`)."""
  labels = np.asarray(labels, np.float32)
  n = labels.shape[0]
  if spec.field:
    value = np.asarray((fields or {}).get(spec.field, np.full(n, -1)))
    return Task(spec.name, ("male",) if spec.field == "sex" else (spec.field,),
                (value == 1).astype(np.float32)[:, None], value >= 0, spec.kind)
  names = list(label_names)
  wanted = list(spec.columns) if spec.columns is not None else names
  missing = [c for c in wanted + list(spec.keep_any) if c not in names]
  if missing:
    raise UsageError(f"task {spec.name}: label(s) {missing} are not among the data's labels {names} "
                     "(--config.labels)")
  keep = np.ones(n, bool)
  if spec.keep_any:
    keep = labels[:, [names.index(c) for c in spec.keep_any]].max(axis=1) > 0
  return Task(spec.name, tuple(wanted), labels[:, [names.index(c) for c in wanted]], keep, spec.kind)
