"""Downstream tasks for the probe and fine-tune programs: where the records come from and what their labels are.

A `Pool` is a set of records in one source (a prepared dataset's splits concatenated, raw files read into memory,
or synthetic ECGs) with, when the data has them, fixed split names per record. A `Task` is a label matrix over a
pool's records and the subset of records that belong to it. Several tasks on one pool share one feature pass.

Task names (comma-separated in `config.tasks`):
  prepared                 every label of the prepared dataset at `config.data_dir` (`config.labels` to choose some)
  synthetic                the built-in simulator's 6 rhythm/morphology classes (multi-class)
  ludb_af, ludb_lvh, ludb_axis, ludb_sex
                           LUDB raw files under `config.data_root` (a folder holding `ludb/` or LUDB itself):
                           AF or flutter vs rest, left ventricular hypertrophy, electric axis left deviation vs normal
                           (other axes left out), male vs female
  cinc_stach, cinc:CODE[+CODE...]
                           PhysioNet/CinC 2021 records under `config.data_root` (`cinc2021/` or the folder itself):
                           sinus tachycardia (SNOMED 427084000), or any SNOMED codes as a multi-label task
Raw tasks are preprocessed straight to the checkpoint's contract (so the only adaptation is the one done on read).
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.contract import Contract
from data_pipelines.errors import UsageError

SPLITS = ("train", "validation", "test")
HOLDOUT = {"train": 0.7, "validation": 0.1, "test": 0.2}  # the paper's 70/10/20, when data has no splits


@dataclasses.dataclass
class Pool:
  name: str
  source: Any                  # random-access source of examples (`stmem.data.Source`)
  contract: Contract           # the data's contract
  record_id: np.ndarray        # (N,) str, in source order
  patient_id: np.ndarray       # (N,) str
  split: np.ndarray | None     # (N,) str split names, or None when the data has no fixed splits
  labels: np.ndarray | None = None  # (N, C) labels the source carries (prepared data)
  label_names: tuple[str, ...] = ()


@dataclasses.dataclass
class Task:
  name: str
  pool: str
  label_names: tuple[str, ...]
  labels: np.ndarray           # (N_pool, C) float32, multi-hot or one-hot
  keep: np.ndarray             # (N_pool,) bool: records that belong to the task
  kind: str                    # "multilabel" or "multiclass"


class ConcatSource:
  """Several sources read as one (a prepared dataset's splits, so one feature pass covers them all)."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int):
    k = int(np.searchsorted(self.offsets, index, side="right") - 1)
    return self.sources[k][int(index - self.offsets[k])]


def hash_split(patient_ids: Sequence[str], fractions: dict[str, float] = HOLDOUT, salt: str = "") -> np.ndarray:
  """A split name per record from a hash of its patient id: grouped by patient, independent of order."""
  names, cum = list(fractions), np.cumsum(list(fractions.values())) / sum(fractions.values())
  out = []
  for p in patient_ids:
    u = int(hashlib.sha1(f"{salt}{p}".encode()).hexdigest()[:15], 16) / float(16 ** 15)
    out.append(names[min(int(np.searchsorted(cum, u, side="right")), len(names) - 1)])
  return np.asarray(out, dtype=str)


# ------------------------------------------------------------------------------------------------ pools


def _text(x: Any) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode() if isinstance(x, bytes) else str(x)


def prepared_pool(data_dir: str, splits: Sequence[str] = SPLITS) -> Pool:
  """The splits of a prepared dataset that exist, concatenated; one split alone means cross-validation."""
  from stmem import data
  opened = []
  for s in splits:
    try:
      opened.append(data.open_prepared(data_dir, s))
    except KeyError:
      continue
  if not opened:
    raise FileNotFoundError(f"{data_dir}: none of the splits {list(splits)}")
  source = ConcatSource([p.source for p in opened])
  rids, pids, labels, split = [], [], [], []
  for p in opened:
    for i in range(len(p.source)):
      ex = p.source[i]
      rids.append(_text(ex.get("record_id", i)))
      pids.append(_text(ex.get("patient_id", ex.get("record_id", i))))
      labels.append(np.asarray(ex.get("labels", np.zeros(0)), np.float32))
      split.append(p.split)
  fixed = np.asarray(split, dtype=str) if len(opened) > 1 else None
  return Pool("prepared", source, opened[0].contract, np.asarray(rids, dtype=str), np.asarray(pids, dtype=str), fixed,
              np.stack(labels), opened[0].label_names)


def synthetic_pool(n: int, seed: int, contract: Contract) -> tuple[Pool, Task]:
  """`n` simulated ECGs at the contract's rate and record length, split 70/10/20 by patient."""
  from stmem import data, synthetic
  arrays = synthetic.make_dataset(n, seed, seconds=contract.record_samples / contract.fs, fs=contract.fs)
  names = tuple(str(c) for c in arrays["label_names"])
  onehot = np.eye(len(names), dtype=np.float32)[arrays["labels"]]
  source = data.ArraySource({"signal": arrays["signal"], "labels": onehot, "record_id": arrays["record_id"],
                             "patient_id": arrays["patient_id"]})
  from stmem.train import features
  pool = Pool("synthetic", source, features.canonical_contract(contract), arrays["record_id"].astype(str),
              arrays["patient_id"].astype(str), hash_split(arrays["patient_id"]), onehot, names)
  return pool, Task("synthetic", "synthetic", names, onehot, np.ones(n, bool), "multiclass")


def _find(root: pathlib.Path, folder: str, marker: str) -> pathlib.Path:
  for cand in (root / folder, root):
    if cand.is_dir() and any(cand.glob(marker)):
      return cand
  raise FileNotFoundError(f"no {folder} records ({marker}) under {root}")


def _raw_pool(name: str, records: list, contract: Contract) -> tuple[Pool, list]:
  from stmem import data
  from stmem.train import features
  arrays = features.records_to_arrays(records, contract)
  arrays.pop("skipped")
  kept = set(arrays["record_id"])
  records = [r for r in records if r.record_id in kept]
  source = data.ArraySource(arrays)
  return Pool(name, source, features.canonical_contract(contract), arrays["record_id"], arrays["patient_id"],
              None), records


def ludb_pool(root: str | pathlib.Path, contract: Contract) -> tuple[Pool, dict[str, Any]]:
  """LUDB records (in record-number order) and their `ludb.csv` rows."""
  from data_pipelines.labels import ludb
  from data_pipelines.readers import read_wfdb
  folder = _find(pathlib.Path(root), "ludb", "ludb.csv")
  table = ludb.load_ludb(folder / "ludb.csv")
  headers = sorted(folder.glob("*.hea"), key=lambda p: (len(p.stem), p.stem))
  records = [read_wfdb(h, source="ludb") for h in headers]
  pool, records = _raw_pool("ludb", records, contract)
  return pool, {"rows": [table[r.record_id] for r in records]}


def cinc_pool(root: str | pathlib.Path, contract: Contract) -> tuple[Pool, dict[str, Any]]:
  from data_pipelines.readers import read_wfdb
  folder = _find(pathlib.Path(root), "cinc2021", "*.hea")
  records = [read_wfdb(h, source="cinc") for h in sorted(folder.glob("*.hea"))]
  pool, records = _raw_pool("cinc", records, contract)
  return pool, {"dx": [[str(c) for c in r.metadata.get("dx", [])] for r in records]}


def _binary(name: str, pool: str, values: Sequence[int | None], label: str) -> Task:
  keep = np.asarray([v is not None for v in values])
  y = np.asarray([[float(v or 0)] for v in values], np.float32)
  return Task(name, pool, (label,), y, keep, "multilabel")


def _ludb_task(name: str, rows: list) -> Task:
  from data_pipelines.labels import ludb
  if name == "ludb_af":
    return _binary(name, "ludb", [ludb.af_or_flutter(r) for r in rows], "af_or_flutter")
  if name == "ludb_lvh":
    return _binary(name, "ludb", [ludb.lvh(r) for r in rows], "lvh")
  if name == "ludb_axis":
    return _binary(name, "ludb", [ludb.axis_left_vs_normal(r) for r in rows], "axis_left_vs_normal")
  if name == "ludb_sex":
    return _binary(name, "ludb", [None if r.sex is None else int(r.sex == "M") for r in rows], "male")
  raise UsageError(f"unknown LUDB task {name!r}")


def _cinc_task(name: str, dx: list[list[str]]) -> Task:
  from data_pipelines.labels import snomed
  codes = ["427084000"] if name == "cinc_stach" else snomed.parse_dx(name.split(":", 1)[1].replace("+", ","))
  y = np.stack([snomed.multi_hot(d, codes, merge_equivalent=True) for d in dx]) if dx else np.zeros((0, len(codes)))
  return Task(name, "cinc", tuple(codes), y.astype(np.float32), np.ones(len(dx), bool), "multilabel")


def load(task_names: Sequence[str], contract: Contract, *, data_dir: str = "", data_root: str = "",
         labels: Sequence[str] = (), kind: str = "multilabel", synthetic_n: int = 240, seed: int = 0
         ) -> tuple[dict[str, Pool], list[Task]]:
  """Pools and tasks for the named tasks. `contract` is the checkpoint's: raw and synthetic records are made to it;
  prepared data keeps its own (the caller adapts it)."""
  pools: dict[str, Pool] = {}
  extras: dict[str, dict] = {}
  tasks = []
  for name in task_names:
    if name == "prepared":
      if not data_dir:
        raise UsageError("task 'prepared' needs --config.data_dir (a folder written by stmem prepare)")
      pools.setdefault("prepared", prepared_pool(data_dir))
      p = pools["prepared"]
      unknown = [l for l in labels if l not in p.label_names]
      if unknown:
        raise UsageError(f"--config.labels: {unknown} not among the labels of {data_dir}: {list(p.label_names)}")
      cols = [p.label_names.index(l) for l in labels] if labels else list(range(len(p.label_names)))
      tasks.append(Task("prepared", "prepared", tuple(p.label_names[c] for c in cols), p.labels[:, cols],
                        np.ones(len(p.record_id), bool), kind))
    elif name == "synthetic":
      pool, task = synthetic_pool(synthetic_n, seed, contract)
      pools["synthetic"] = pool
      tasks.append(task)
    elif name.startswith("ludb_"):
      if "ludb" not in pools:
        pools["ludb"], extras["ludb"] = ludb_pool(data_root, contract)
      tasks.append(_ludb_task(name, extras["ludb"]["rows"]))
    elif name == "cinc_stach" or name.startswith("cinc:"):
      if "cinc" not in pools:
        pools["cinc"], extras["cinc"] = cinc_pool(data_root, contract)
      tasks.append(_cinc_task(name, extras["cinc"]["dx"]))
    else:
      raise UsageError(f"unknown task {name!r} (--config.task / --config.tasks); see stmem/train/tasks.py for the names")
  return pools, tasks
