"""Where a program's examples come from, and the grain pipeline from them to batches and global jax.Arrays.

One way for every program (pretrain, probe, finetune, embed) to get examples: a config's `data` block becomes a
`DatasetSpec` (`spec_from_config`), and `open_pool(spec, contract)` reads it: a prepared dataset (`stmem prepare`
output), a folder of raw records (read in memory through the same builder code that prepares it: reader -> Record
-> windows -> quarantine, every window, content hash included), or the built-in simulator. A `Pool` is random-access
examples plus what a program needs to choose and label them (ids, split names, labels); `task_pools` adds the named
tasks of `data_pipelines.labels.tasks` over them.

Then one pipeline, per process, over any random-access source of example dicts:

  indices -> this process's shard -> seeded shuffle (reshuffled each epoch) -> repeat (training)
          -> read examples -> crop (training: one random crop; evaluation: the fixed eval crops)
          -> optional lead-set selection by name -> filter if per_crop, z-score -> batch

Why the pipeline runs over indices and derives each crop's RNG from (seed, epoch, source index): the batch at any
step is a pure function of (seed, step, process layout), so a restored iterator continues with exactly the batch
that would have come next, and a given record gets the same crop in a given epoch whatever the process count.
Batches are assembled for the whole batch at once (one read, one gather of crops, one z-score), never example by
example: that, and decoding prepared examples straight from their bytes (`data_pipelines.example_codec`), is what
lets two cores feed an accelerator.

The batch (numpy, per process):
  signal     float32 (B, L, T)     training: L lead slots (12, or the chosen lead set), T = contract.window
             float32 (B, K, L, T)  evaluation: the K fixed crops of each record (default 3: 0, 0.5 and 1 s)
  lead_ids   int32   (B, L)        canonical id of the lead in each slot
  lead_mask  bool    (B, L)        False where the lead is absent from the record
  labels     float32 (B, C)        C may be 0 for unlabelled data
  record_id  bytes   (B,)
  patient_id bytes   (B,)
  valid      bool    (B,)          False for evaluation padding rows (so every process yields the same number of
                                   batches); always True in training
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from data_pipelines import leads as leads_lib
from data_pipelines import transforms
from data_pipelines.contract import Contract
from data_pipelines.errors import UsageError

SPLITS = ("train", "validation", "test")
SOURCES = ("prepared", "raw", "synthetic")
SIMULATOR_DEFAULT = 2  # the simulator version of `data.simulator` when a config does not say (stmem.synthetic)


class Source(Protocol):
  """Anything random-access that returns example dicts (`signal` (L, T), `lead_mask`, `labels`, ids)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Mapping[str, Any]: ...


# ------------------------------------------------------------------------------------------------ sources


class ArraySource:
  """A random-access source over a dict of equal-length numpy arrays (simulated ECGs, raw folders, tests).

  Required: `signal` (N, L, T) float32, rows in the contract's lead order. Optional: `lead_mask` (N, L) bool
  (default all present), `labels` (N, C) (default (N, 0)), `record_id` / `patient_id` (N,) (default the row
  number). Picklable, so grain worker processes can use it.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if "signal" not in arrays:
      raise ValueError(f"ArraySource needs a 'signal' array; got {sorted(arrays)}")
    signal = np.asarray(arrays["signal"], np.float32)
    if signal.ndim != 3:
      raise ValueError(f"signal must be (N, leads, T); got {signal.shape}")
    n = signal.shape[0]
    self.arrays: dict[str, np.ndarray] = {"signal": signal}
    self.arrays["lead_mask"] = np.asarray(arrays.get("lead_mask", np.ones(signal.shape[:2], bool)), bool)
    self.arrays["labels"] = np.asarray(arrays.get("labels", np.zeros((n, 0), np.float32)), np.float32)
    ids = np.asarray([str(i) for i in range(n)])
    self.arrays["record_id"] = np.asarray(arrays.get("record_id", ids)).astype(str)
    self.arrays["patient_id"] = np.asarray(arrays.get("patient_id", self.arrays["record_id"])).astype(str)
    for k, v in arrays.items():
      self.arrays.setdefault(k, np.asarray(v))
    bad = {k: v.shape[0] for k, v in self.arrays.items() if v.shape[0] != n}
    if bad:
      raise ValueError(f"arrays disagree on the number of examples ({n} signals): {bad}")

  def __len__(self) -> int:
    return int(self.arrays["signal"].shape[0])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {k: v[index] for k, v in self.arrays.items()}

  def __repr__(self) -> str:
    return f"ArraySource(n={len(self)}, keys={sorted(self.arrays)})"


class PreparedSource:
  """One split of a prepared dataset: tfds's ArrayRecord source for reading, `example_codec` for decoding.

  Reads go through tfds's ArrayRecord reader (parallel for a batch of indices); each example is decoded straight
  from its bytes, to exactly what tfds's own decode gives (checked against it on the first example here and on
  every feature in tests/test_builders.py), at a third of its cost.
  """

  def __init__(self, tfds_source: Any):
    from data_pipelines import example_codec
    self.tfds_source = tfds_source
    self.decode = example_codec.Decoder.like(tfds_source[0]) if len(tfds_source) else None

  def __len__(self) -> int:
    return len(self.tfds_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    raw = self.tfds_source.data_source.__getitems__([int(i) for i in indices])
    return [self.decode(r) for r in raw]

  def __repr__(self) -> str:
    return f"PreparedSource({self.tfds_source!r})"


class ConcatSource:
  """Several sources read as one (a prepared dataset's splits, so one feature pass covers them all)."""

  def __init__(self, sources: Sequence[Source]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
    """One batched read per underlying source, results in the order asked."""
    which = np.searchsorted(self.offsets, np.asarray(indices, np.int64), side="right") - 1
    out: list[Any] = [None] * len(which)
    for k in np.unique(which):
      at = np.flatnonzero(which == k)
      for i, ex in zip(at, read_many(self.sources[k], [int(indices[i]) - int(self.offsets[k]) for i in at])):
        out[i] = ex
    return out


class MixedSource(ConcatSource):
  """Several sources trained on in fixed proportions (`data.sources`): read as one `ConcatSource`, drawn by
  `make_dataset` from each in proportion to its weight, each reshuffled on its own epochs (a small source repeats
  more often than a large one). `names` label the components in messages and summaries."""

  def __init__(self, sources: Sequence[Source], weights: Sequence[float], names: Sequence[str]):
    if not (len(sources) == len(weights) == len(names)) or not sources:
      raise ValueError("MixedSource needs one weight and one name per source")
    bad = [f"{n}={w}" for n, w in zip(names, weights) if not float(w) > 0]
    if bad:
      raise UsageError(f"data.sources: every weight must be positive; got {', '.join(bad)}")
    empty = [n for n, s in zip(names, sources) if len(s) == 0]
    if empty:
      raise UsageError(f"data.sources: {', '.join(empty)} has no examples")
    super().__init__(sources)
    total = float(sum(weights))
    self.weights = [float(w) / total for w in weights]
    self.names = list(names)

  def parts(self) -> list[tuple[int, int, float]]:
    """(offset, length, weight) of each component."""
    return [(int(self.offsets[k]), len(s), self.weights[k]) for k, s in enumerate(self.sources)]

  def __repr__(self) -> str:
    return "MixedSource(" + ", ".join(f"{n}: {len(s)} x {w:.3g}" for n, s, w in
                                      zip(self.names, self.sources, self.weights)) + ")"


class Subset:
  """Examples `indices` of a source, with `labels` (len(indices), C) in place of its own when given."""

  def __init__(self, source: Source, indices: Sequence[int], labels: np.ndarray | None = None):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.labels = None if labels is None else np.asarray(labels, np.float32)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Mapping[str, Any]:
    return self.__getitems__([i])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
    """One batched read of the underlying source."""
    examples = read_many(self.source, [int(self.indices[int(i)]) for i in indices])
    if self.labels is None:
      return examples
    return [{**ex, "labels": self.labels[int(i)]} for ex, i in zip(examples, indices)]


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One split of a prepared dataset: the source and what the folder says about it."""
  source: Source
  contract: Contract
  label_names: tuple[str, ...]
  folder: str
  split: str


class MissingSplit(UsageError, KeyError):
  """A split the prepared dataset does not have: a usage error (one line from `stmem`), still a KeyError for callers
  that try the splits in turn."""
  __str__ = Exception.__str__  # KeyError's would print the message in quotes


def open_prepared(data_dir: str | os.PathLike[str], split: str = "train", name: str | None = None) -> Prepared:
  """A split of a dataset written by `stmem prepare`, read with `tfds.data_source` machinery (no TensorFlow).

  `data_dir` may be the versioned folder, `<data_dir>/<name>`, or a --data_dir holding one dataset.
  """
  import tensorflow_datasets as tfds

  from data_pipelines import builder_base
  folder = builder_base.prepared_dir(data_dir, name)
  builder = tfds.builder_from_directory(os.fspath(folder))
  if split not in builder.info.splits:
    raise MissingSplit(f"{folder} has no split {split!r}; it has {sorted(builder.info.splits)}")
  return Prepared(source=PreparedSource(builder.as_data_source(split=split)),
                  contract=builder_base.load_contract(folder),
                  label_names=tuple(builder_base.load_label_names(folder)), folder=os.fspath(folder), split=split)


# ------------------------------------------------------------------------------------------------ pools


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where examples come from.

  source "prepared": `path` is a `stmem prepare --data_dir` (or the dataset's folder), `name` the dataset under it
    when it holds several; the `splits` that exist are read (one split alone means cross-validation downstream).
  source "raw": `path` is a folder of records and `name` the builder that knows them (ludb, cinc, ptbxl, code15,
    generic); `options` are that builder's keyword options, as `stmem prepare NAME --key value` takes them.
  source "synthetic": `num_synthetic` simulated 10 s ECGs (`stmem.synthetic`) from `seed`, by simulator version
    `simulator` (2, the default; 1 reproduces runs made with the first simulator); with the option
    ("signal", "clean"), the same records without their noise (the reference a reconstruction loss has a floor by).
  """
  source: str
  path: str = ""
  name: str = ""
  splits: tuple[str, ...] = SPLITS
  options: tuple[tuple[str, str], ...] = ()
  num_synthetic: int = 240
  seed: int = 0
  simulator: int = 2


COLUMNS = ("record_id", "patient_id", "split", "labels", "sex")


@dataclasses.dataclass(frozen=True)
class Pool:
  """Every example of a dataset (one per stored window) and what a program needs to choose and label them.

  Per-example columns, each (N,) or (N, C): `record_id`, `patient_id` (str), `split` (str: the prepared split an
  example was read from, the split its builder put it in, or the patient-hash split of simulated data), `labels`
  (float32 (N, C), columns `label_names`), `sex` (int32: 1 male, 0 female, -1 unknown). They are read on first
  use (`load_columns`): a pretraining run over a large prepared dataset never reads them.
  `quarantine`: {"total", "by_reason", "records"} of what a raw read skipped (empty otherwise).
  """
  name: str
  source: Source
  contract: Contract
  label_names: tuple[str, ...]
  load_columns: Any = dataclasses.field(repr=False, compare=False)  # () -> {column: array}
  quarantine: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  folder: str = ""  # a prepared dataset's folder ("" for raw and simulated pools, which live in memory)
  splits_read: tuple[str, ...] = ()  # a prepared dataset's splits this pool holds

  @functools.cached_property
  def columns(self) -> dict[str, np.ndarray]:
    return self.load_columns()

  record_id = property(lambda self: self.columns["record_id"])
  patient_id = property(lambda self: self.columns["patient_id"])
  split = property(lambda self: self.columns["split"])
  labels = property(lambda self: self.columns["labels"])
  sex = property(lambda self: self.columns["sex"])

  @property
  def fixed_splits(self) -> bool:
    """True when the data comes with more than one split (else programs cross-validate or hash-split)."""
    return len(set(self.split.tolist())) > 1

  def subset(self, indices: Sequence[int], labels: np.ndarray | None = None) -> Subset:
    return Subset(self.source, indices, labels)


def _as_str(values: Sequence[Any]) -> np.ndarray:
  return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=str)


def _pool_from_arrays(name: str, arrays: Mapping[str, np.ndarray], contract: Contract, label_names: Sequence[str],
                      quarantine: Mapping[str, Any]) -> Pool:
  source = ArraySource({k: v for k, v in arrays.items() if k != "split"})
  n = len(source)
  columns = {"record_id": source.arrays["record_id"], "patient_id": source.arrays["patient_id"],
             "split": np.asarray(arrays["split"], dtype=str), "labels": source.arrays["labels"],
             "sex": np.asarray(arrays.get("sex", np.full(n, -1)), np.int32)}
  return Pool(name, source, contract, tuple(label_names), lambda: columns, quarantine)


def _prepared_pool(spec: DatasetSpec) -> Pool:
  opened = []
  for s in spec.splits:
    try:
      opened.append(open_prepared(os.path.expanduser(spec.path), s, spec.name or None))
    except KeyError:
      continue
  if not opened:
    raise FileNotFoundError(f"{spec.path}: none of the splits {list(spec.splits)} is there")

  def load_columns() -> dict[str, np.ndarray]:
    got: dict[str, list[Any]] = {k: [] for k in COLUMNS}
    for p in opened:
      for lo in range(0, len(p.source), 256):
        for ex in read_many(p.source, range(lo, min(lo + 256, len(p.source)))):
          got["record_id"].append(ex.get("record_id", b""))
          got["patient_id"].append(ex.get("patient_id", ex.get("record_id", b"")))
          got["labels"].append(np.asarray(ex.get("labels", np.zeros(0)), np.float32))
          got["sex"].append(int(ex.get("sex", -1)))
          got["split"].append(p.split)
    return {"record_id": _as_str(got["record_id"]), "patient_id": _as_str(got["patient_id"]),
            "split": np.asarray(got["split"], dtype=str), "labels": np.stack(got["labels"]),
            "sex": np.asarray(got["sex"], np.int32)}

  source = opened[0].source if len(opened) == 1 else ConcatSource([p.source for p in opened])
  return Pool("prepared", source, opened[0].contract, opened[0].label_names, load_columns, folder=opened[0].folder,
              splits_read=tuple(p.split for p in opened))


def _raw_pool(spec: DatasetSpec, contract: Contract) -> Pool:
  import collections

  from data_pipelines import in_memory
  folder = os.path.expanduser(spec.path)
  if not os.path.isdir(folder):  # said with its fix here: the reader only knows the folder is missing
    raise UsageError(f"{spec.path} does not exist: set --config.data.records to the folder of your {spec.name} "
                     f"records")
  examples = in_memory.read_examples(spec.name, folder, contract, **dict(spec.options))
  reasons = collections.Counter(e["reason"] for e in examples.quarantine)
  quarantine = {"total": len(examples.quarantine), "by_reason": dict(reasons.most_common()),
                "records": list(examples.quarantine)}
  return _pool_from_arrays(spec.name, examples.arrays, contract, examples.label_names, quarantine)


def _synthetic_pool(spec: DatasetSpec, contract: Contract) -> Pool:
  """Simulated records at the contract's rate and length, in the contract's lead order, labelled by class (one-hot
  with simulator 1, multi-hot with simulator 2: a rhythm and any findings); band-passed once here when the contract
  filters offline (the records are in memory anyway)."""
  from data_pipelines import builder_base
  from stmem import synthetic
  clean = dict(spec.options).get("signal") == "clean"
  made = synthetic.make_dataset(spec.num_synthetic, spec.seed, seconds=contract.record_samples / contract.fs,
                                fs=contract.fs, with_clean=clean, version=spec.simulator)
  rows = [leads_lib.LEAD_ID[leads_lib.canonical_name(n)] for n in contract.leads]
  signal = made["clean_signal" if clean else "signal"][:, rows]
  if contract.filter_stage == "offline":
    signal = transforms.bandpass(signal, contract.fs, contract.highpass_hz, contract.lowpass_hz,
                                 contract.filter_order).astype(np.float32)
  names = tuple(str(c) for c in made["label_names"])
  labels = made["multilabel"] if "multilabel" in made else np.eye(len(names), dtype=np.float32)[made["labels"]]
  arrays = {"signal": signal, "labels": labels,
            "record_id": made["record_id"], "patient_id": made["patient_id"],
            "split": builder_base.split_names(made["patient_id"])}
  return _pool_from_arrays("synthetic", arrays, contract, names, {})


def open_pool(spec: DatasetSpec, contract: Contract | None = None) -> Pool:
  """The examples `spec` names. Raw and simulated examples are made to `contract` (default `Contract()`); a
  prepared dataset keeps its own (`pool.contract`; `features.adapt` checks it against a checkpoint's)."""
  contract = contract or Contract()
  if spec.source == "prepared":
    return _prepared_pool(spec)
  if spec.source == "raw":
    return _raw_pool(spec, contract)
  if spec.source == "synthetic":
    return _synthetic_pool(spec, contract)
  raise ValueError(f"DatasetSpec.source must be one of {SOURCES}, not {spec.source!r}")


def find_raw(root: str | os.PathLike[str], folder: str) -> str:
  """`<root>/<folder>` when it exists, else `root` itself (a data root holding `ludb/`, or LUDB's own folder)."""
  root = os.path.expanduser(os.fspath(root))
  candidate = os.path.join(root, folder)
  return candidate if folder and os.path.isdir(candidate) else root


def require_raw(root: str | os.PathLike[str], folder: str, task: str = "") -> None:
  """Refuse (UsageError, one line giving the `stmem download` command) a data root that lacks a dataset's folder.

  `root` is missing or empty, or it is a data root (it holds another downloadable dataset's folder) without
  `<root>/<folder>`. A root that is the dataset's own folder is accepted (as `find_raw` reads it).
  """
  from data_pipelines import download
  root = os.fspath(root).rstrip("/") or "/"
  # the dataset's own folder given as the root: the download goes to its parent
  parent = os.path.dirname(root) if os.path.basename(root) == folder else root
  command = download.command_for(folder, parent or ".")
  if command is None:
    return
  path = os.path.expanduser(root)
  where = f"{task}: " if task else ""
  fix = f"run `{command}`, or set --config.data.records to the folder holding {folder}/"
  if not os.path.isdir(path):
    raise UsageError(f"{where}no {folder} records: {root} does not exist; {fix}")
  if os.path.isdir(os.path.join(path, folder)):
    return
  others = [d.folder for d in download.DATASETS.values() if os.path.isdir(os.path.join(path, d.folder))]
  if others:
    raise UsageError(f"{where}no {folder}/ under {root} (it holds {', '.join(others)}); {fix}")
  if not os.listdir(path):
    raise UsageError(f"{where}no {folder} records: {root} is empty; {fix}")


def check_raw_tasks(task_names: Sequence[str], data_config: Mapping[str, Any]) -> None:
  """`require_raw` for every named task that reads raw records, before any is read (a program running hours of other
  work first checks its data here)."""
  from data_pipelines.labels import tasks as tasks_lib
  records = data_config.get("records", "") if hasattr(data_config, "get") else ""
  for name in task_names:
    spec = tasks_lib.task_spec(name)
    if spec.dataset not in ("prepared", "synthetic") and records:
      require_raw(records, spec.folder, name)


def _raw_folder(builder: str) -> str:
  """The folder a builder's raw files sit in under a data root (`cinc2021/` for cinc), as the named tasks say."""
  from data_pipelines.labels import tasks as tasks_lib
  return next((t.folder for t in tasks_lib.TASKS.values() if t.dataset == builder and t.folder), builder)


def spec_from_config(data_config: Mapping[str, Any], *, seed: int = 0,
                     options: Sequence[tuple[str, str]] = ()) -> DatasetSpec:
  """The `DatasetSpec` of a config's `data` block: the one way a program turns its config into where examples come
  from (then `open_pool(spec, contract)`).

  Keys (absent ones take their default): `source` ("synthetic", "prepared" or "raw"; "" means the one of
  `data_dir`, `records`, `num_synthetic` that is set), `name` (prepared: the dataset under `data_dir`; raw: the
  builder that reads `records`, default "generic"), `data_dir` (a `stmem prepare` output), `records` (a folder of raw
  records, or a folder holding them under the builder's folder: `ludb/`, `cinc2021/`), `split` (prepared:
  comma-separated splits to read; "" reads every split there), `num_synthetic` (simulated records, from `seed`),
  `simulator` (the simulator's version for them: 2, the default, or 1, the first simulator's records bit for bit),
  `lead_map` (raw: channel renames, as `stmem prepare --lead_map`). `options` are further builder options of a raw
  folder (a named task's).
  """
  def get(key: str, default: Any = "") -> Any:
    value = data_config.get(key, default) if hasattr(data_config, "get") else default
    return default if value is None else value

  source = get("source")
  if not source:
    given = [s for s, key in (("prepared", "data_dir"), ("raw", "records"), ("synthetic", "num_synthetic"))
             if get(key, 0)]
    if len(given) != 1:
      raise UsageError("give one of --config.data.data_dir (a prepared dataset), --config.data.records (a folder of "
                       "raw records) or --config.data.num_synthetic=N (N simulated ECGs)"
                       + (f"; got {' and '.join(given)}" if given else ""))
    source = given[0]
  if source == "synthetic":
    count = int(get("num_synthetic", 240))
    if count < 1:
      raise UsageError(f"data.source 'synthetic' needs --config.data.num_synthetic of 1 or more, not {count}")
    version = get("simulator", SIMULATOR_DEFAULT) or SIMULATOR_DEFAULT
    if str(version) not in ("1", "2"):
      raise UsageError(f"data.simulator must be 1 or 2 (the simulator's version), not {version!r}")
    return DatasetSpec("synthetic", num_synthetic=count, seed=int(seed), simulator=int(version))
  if source == "prepared":
    if not get("data_dir"):
      raise UsageError("data.source 'prepared' needs --config.data.data_dir (a `stmem prepare` output)")
    splits = tuple(s.strip() for s in str(get("split")).split(",") if s.strip()) or SPLITS
    return DatasetSpec("prepared", path=str(get("data_dir")), name=str(get("name")), splits=splits)
  if source == "raw":
    if not get("records"):
      raise UsageError("data.source 'raw' needs --config.data.records (a folder of raw records)")
    name = str(get("name")) or "generic"
    require_raw(get("records"), _raw_folder(name))
    lead_map = str(get("lead_map"))
    options = tuple(options) + ((("lead_map", lead_map),) if lead_map else ())
    return DatasetSpec("raw", path=find_raw(get("records"), _raw_folder(name)), name=name, options=options)
  raise UsageError(f"data.source must be one of {', '.join(SOURCES)}, not {source!r}")


def source_specs(data_config: Mapping[str, Any], *, seed: int = 0) -> list[tuple[str, DatasetSpec, float]]:
  """(label, spec, weight) of every source a `data` block trains on.

  `data.sources` names a mixture: comma-separated `KIND[:NAME][=WEIGHT]` items, KIND one of synthetic, prepared,
  raw, NAME the dataset or builder (default: `data.name`), WEIGHT a positive number (default 1; weights are
  normalised). Each item takes the rest of its settings from the block: `num_synthetic` for synthetic, `data_dir`
  and `split` for prepared, `records` and `lead_map` for raw. E.g. `synthetic=0.7,raw:generic=0.3` with
  `data.records=~/my_ecgs` trains on simulated ECGs and the user's unlabeled recordings, 7 to 3. Without
  `data.sources`, the block's one source (`spec_from_config`) with weight 1.
  """
  text = str(data_config.get("sources", "") or "") if hasattr(data_config, "get") else ""
  if not text.strip():
    spec = spec_from_config(data_config, seed=seed)
    return [(spec.source if not spec.name else f"{spec.source}:{spec.name}", spec, 1.0)]
  out = []
  for item in (x.strip() for x in text.split(",")):
    if not item:
      continue
    head, _, weight_text = item.partition("=")
    kind, _, name = head.strip().partition(":")
    if kind not in SOURCES:
      raise UsageError(f"--config.data.sources: {item!r} names the source {kind!r}; a source is one of "
                       f"{', '.join(SOURCES)} (KIND[:NAME][=WEIGHT], e.g. synthetic=0.7,raw:generic=0.3)")
    try:
      weight = float(weight_text) if weight_text.strip() else 1.0
    except ValueError:
      raise UsageError(f"--config.data.sources: {item!r} has the weight {weight_text!r}, which is not a number")
    if not weight > 0:
      raise UsageError(f"--config.data.sources: {item!r} has the weight {weight:g}; weights must be positive")
    block = {k: data_config.get(k) for k in data_config.keys()} if hasattr(data_config, "keys") else {}
    block.update(source=kind, name=name or block.get("name", ""))
    label = f"{kind}:{name}" if name else kind
    if label in (x[0] for x in out):
      raise UsageError(f"--config.data.sources names {label!r} twice")
    out.append((label, spec_from_config(block, seed=seed), weight))
  if not out:
    raise UsageError(f"--config.data.sources={text!r} names no source")
  return out


def training_pools(data_config: Mapping[str, Any], *, seed: int = 0) -> tuple[Source, Contract, list[Pool]]:
  """(source, contract, pools) of the examples a `data` block trains on (`source_specs`): one pool's source, or a
  `MixedSource` over several; the contract the examples are stored under.

  One contract for all: a prepared dataset keeps its own (two prepared datasets must agree), and raw or simulated
  examples are made to it. Without a prepared one, raw examples are made as `stmem prepare` would (the default
  contract) and simulated ones too, unless the simulator is the only source: then they are filtered once when made
  (the "offline" stage) rather than per crop, since per-crop filtering would be most of a tiny model's step.
  """
  specs = source_specs(data_config, seed=seed)
  opened: dict[str, Pool] = {}
  contract: Contract | None = None
  for label, spec, _ in specs:
    if spec.source != "prepared":
      continue
    pool = open_pool(spec)
    if contract is not None and pool.contract != contract:
      from data_pipelines import contract as contract_lib
      differ = contract_lib.compare(contract, pool.contract)
      raise UsageError(f"data.sources: {label} was prepared under another contract than the first prepared source "
                       f"({'; '.join(differ[0] + differ[1])}); prepare both alike")
    contract = contract or pool.contract
    opened[label] = pool
  if contract is None:
    only_simulated = all(spec.source == "synthetic" for _, spec, _ in specs)
    contract = Contract(filter_stage="offline") if only_simulated else Contract()
  for label, spec, _ in specs:
    if label not in opened:
      opened[label] = open_pool(spec, contract)
  pools = [opened[label] for label, _, _ in specs]
  if len(pools) == 1:
    return pools[0].source, contract, pools
  return MixedSource([p.source for p in pools], [w for _, _, w in specs], [label for label, _, _ in specs]), \
    contract, pools


def record_identities(pool: Pool) -> dict[str, str]:
  """{identity: record id} of a pool's records, an identity being what makes two records the same recording: the
  content hash of its samples (`builder_base.content_hash`, read by raw folders and kept by prepared datasets) or,
  for simulated records, the simulator's own record id (seed, patient and record)."""
  arrays = getattr(pool.source, "arrays", None)
  if arrays is not None and "content_hash" in arrays:
    return dict(zip(np.asarray(arrays["content_hash"]).astype(str), np.asarray(arrays["record_id"]).astype(str)))
  if arrays is not None and pool.name == "synthetic":
    ids = np.asarray(arrays["record_id"]).astype(str)
    return {f"simulated:{r}": r for r in ids}
  if pool.folder:  # a prepared dataset: its records.jsonl index (or a scan), the splits this pool read
    from data_pipelines import overlap
    return {r["content_hash"]: r["record_id"] for r in overlap.record_index(pool.folder)
            if r["split"] in pool.splits_read}
  return {}


def shared_records(trained: set[str], held_out: Pool) -> list[str]:
  """Record ids of `held_out` whose recordings are among `trained` (identities from `record_identities` of the
  training pools, gathered once by the caller)."""
  return sorted({rid for key, rid in record_identities(held_out).items() if key in trained})


def record_simulator(config) -> None:
  """A run on simulated records (alone or in a `data.sources` mix) names the simulator version that made them in
  its config (the default's when the config file did not say), so config.json and the checkpoint's metadata tell
  which simulator it was trained on."""
  versions = {spec.simulator for _, spec, _ in source_specs(config.data, seed=config.seed)
              if spec.source == "synthetic"}
  if versions and config.data.get("simulator") not in versions:
    with config.unlocked():
      config.data.simulator = versions.pop()


def refuse_shared(trained: Sequence[Pool], held_out: Sequence[tuple[str, Pool]], *, allow: bool, flag: str,
                  log: Callable[[str], None]) -> None:
  """A held-out pool (`(who scores it, pool)`) holding recordings that the `trained` pools hold measures memory, not
  transfer: refused, naming the records, unless `allow` (then said). `flag` is the option that allows it."""
  if not held_out or not trained:
    return
  identities = set().union(*(record_identities(pool) for pool in trained))  # read once, not per held-out pool
  for name, pool in held_out:
    shared = shared_records(identities, pool)
    if not shared:
      continue
    shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
    if not allow:
      raise UsageError(f"{name} scores {len(shared)} record(s) that pretraining trains on ({shown}): exclude them "
                       f"from the training data, or pass {flag}=true")
    log(f"{name} scores {len(shared)} record(s) pretraining trains on ({flag.removeprefix('--config.')})")


def recording_pools(data_config: Mapping[str, Any], *, seed: int = 0) -> list[Pool]:
  """The pools of recordings (prepared datasets and raw folders, not the simulator's records) that a `data` block
  trains on, opened under the contract `training_pools` would give them, without simulating anything: what a check
  made before any training compares with the records a probe scores."""
  specs = [spec for _, spec, _ in source_specs(data_config, seed=seed) if spec.source != "synthetic"]
  prepared = [open_pool(spec) for spec in specs if spec.source == "prepared"]
  contract = prepared[0].contract if prepared else Contract()
  return prepared + [open_pool(spec, contract) for spec in specs if spec.source != "prepared"]


def task_pools(task_names: Sequence[str], contract: Contract, data_config: Mapping[str, Any], *,
               labels: Sequence[str] = (), kind: str = "multilabel",
               seed: int = 0) -> tuple[dict[str, Pool], list[tuple[str, Any]]]:
  """Pools and named tasks (`data_pipelines.labels.tasks`) over them: ({pool key: Pool}, [(pool key, Task)]).

  Tasks of one dataset share one pool (one read, one feature pass). Each task names its source; `data_config` (a
  config's `data` block, read by `spec_from_config`) says where it is: `data_dir` for the `prepared` task, `records`
  (the folder holding ludb/, cinc2021/, ...) for raw tasks, `num_synthetic` for `synthetic`, and `lead_map`.
  `contract` is the checkpoint's: raw and simulated examples are made to it; a prepared dataset keeps its own.
  `labels` and `kind` choose the `prepared` task's columns and link.
  """
  from data_pipelines.labels import tasks as tasks_lib
  get = lambda key, default="": data_config.get(key, default)  # noqa: E731
  pools: dict[str, Pool] = {}
  pool_specs: dict[str, DatasetSpec] = {}
  out = []
  for name in task_names:
    spec = tasks_lib.task_spec(name, labels=labels, kind=kind)
    key = spec.pool_key
    if key not in pools:
      if spec.dataset == "prepared":
        if not get("data_dir"):
          raise UsageError("task 'prepared' needs a prepared dataset: set --config.data.data_dir (`stmem prepare` "
                           "output)")
        block = {"source": "prepared", "data_dir": get("data_dir"), "name": get("name")}
      elif spec.dataset == "synthetic":
        block = {"source": "synthetic", "num_synthetic": get("num_synthetic", 240),
                 "simulator": get("simulator", SIMULATOR_DEFAULT)}
      else:
        if not get("records"):
          raise UsageError(f"task {name!r} reads raw {spec.dataset} records: set --config.data.records (the folder "
                           f"holding {spec.folder}/)")
        require_raw(get("records"), spec.folder, name)
        block = {"source": "raw", "records": get("records"), "name": spec.dataset, "lead_map": get("lead_map")}
      pool_specs[key] = spec_from_config(block, seed=seed, options=spec.options)
      pools[key] = open_pool(pool_specs[key], contract)
    pool = pools[key]
    if spec.dataset == "synthetic" and pool_specs[key].simulator >= 2:
      spec = dataclasses.replace(spec, kind="multilabel")  # simulator 2: a rhythm and any findings per record
    out.append((key, tasks_lib.make_task(spec, pool.label_names, pool.labels, {"sex": pool.sex})))
  return pools, out


# ------------------------------------------------------------------------------------------------ per-batch work


def lead_selection(lead_set: str | Sequence[str] | None, contract: Contract) -> tuple[np.ndarray, np.ndarray]:
  """(rows, ids): which stored rows (the contract's lead order) fill the requested slots, in the requested order,
  and the canonical id of each slot. All of the contract's leads when `lead_set` is None."""
  names = tuple(contract.leads) if lead_set is None else leads_lib.parse_lead_set(lead_set)
  stored = {leads_lib.canonical_name(n): i for i, n in enumerate(contract.leads)}
  missing = [n for n in names if n not in stored]
  if missing:
    raise ValueError(f"lead set {lead_set!r} asks for {missing}, which the data does not store "
                     f"(stored leads: {list(contract.leads)})")
  rows = np.asarray([stored[n] for n in names], np.int64)
  ids = np.asarray([leads_lib.LEAD_ID[n] for n in names], np.int32)
  return rows, ids


def read_many(source: Source, indices: Sequence[int]) -> list[Mapping[str, Any]]:
  """Examples at `indices`, in one batched read when the source offers it (ArrayRecord reads them in parallel)."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return list(getitems([int(i) for i in indices]))
  return [source[int(i)] for i in indices]


def _text(value: Any) -> bytes:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value if isinstance(value, bytes) else str(value).encode()


class _Columns:
  """The examples of one batch as arrays, cropped while they are copied in: signal (B, K, L, window) of the
  selected rows at `starts` (B, K), lead_mask (B, L), labels (B, C), record_id, patient_id and window (B,): the
  window's index in its record (records longer than one window are stored as every full window).

  One copy per example into one preallocated batch (the crop is a slice of that copy); everything numeric after
  this (filter, z-score) runs once on the whole batch.
  """

  def __init__(self, examples: Sequence[Mapping[str, Any]], indices: Sequence[int], rows: np.ndarray,
               starts: np.ndarray, window: int, num_labels: int):
    b, k = starts.shape
    self.signal = np.empty((b, k, len(rows), window), np.float32)
    self.lead_mask = np.empty((b, len(rows)), bool)
    if len(rows) and (np.diff(rows) == 1).all():  # consecutive rows: a slice, so each crop is copied once
      rows = slice(int(rows[0]), int(rows[-1]) + 1)
    self.labels = np.zeros((b, num_labels), np.float32)
    rids, pids, windows = [], [], []
    for i, (ex, index) in enumerate(zip(examples, indices)):
      signal = np.asarray(ex["signal"])
      if signal.shape[-1] < int(starts[i].max()) + window:
        raise ValueError(f"example {index} has {signal.shape[-1]} samples, too few for crops of {window} at "
                         f"{starts[i].tolist()}")
      for j, s in enumerate(starts[i]):
        self.signal[i, j] = signal[rows, s:s + window]
      mask = ex.get("lead_mask")
      self.lead_mask[i] = True if mask is None else np.asarray(mask, bool)[rows]
      if num_labels:
        self.labels[i] = ex["labels"]
      rid = ex.get("record_id", str(index))
      rids.append(_text(rid))
      pids.append(_text(ex.get("patient_id", rid)))
      windows.append(int(ex.get("window", 0)))
    self.record_id, self.patient_id = np.asarray(rids), np.asarray(pids)
    self.window = np.asarray(windows, np.int32)


def _finish(crops: np.ndarray, masks: np.ndarray, contract: Contract) -> np.ndarray:
  """Crops (B, [K,] slots, T) of the selected slots -> the contract's per-crop work (filter if per_crop, z-score
  per ECG), in one call for the whole batch; absent slots stay zero.

  Why select before z-scoring: a model given 6 leads at inference sees statistics of those 6 leads only, so
  training on a lead subset must standardise the same way.
  """
  if crops.ndim == 4:
    masks = masks[:, None]
  return np.asarray(transforms.finish_crop(crops, contract, masks), np.float32)


class _Order:
  """position in one source's stream -> (epoch, source index): its shard, permuted afresh each epoch.

  The permutation of epoch e is `default_rng((*seed, e)).permutation(len(shard))`: a pure function of (seed, epoch),
  so any position can be computed without replaying the ones before it (exact resume). One numpy permutation per
  epoch instead of grain's per-element index shuffle, which cost about 0.3 ms an element here. `seed` is a tuple:
  (run seed,) for a single source, (run seed, k) for the k-th source of a mixture.
  """

  def __init__(self, shard: Sequence[int], seed: tuple[int, ...], shuffle: bool):
    self.shard = np.asarray(shard, np.int64)
    self.seed, self.shuffle = tuple(int(x) for x in seed), shuffle
    self._epoch, self._perm = -1, self.shard

  def __call__(self, position: int, _: Any) -> np.ndarray:
    epoch, k = divmod(int(position), len(self.shard))
    if self.shuffle and epoch != self._epoch:
      self._epoch = epoch
      self._perm = self.shard[np.random.default_rng((*self.seed, epoch)).permutation(len(self.shard))]
    return np.asarray([epoch, self._perm[k]], np.int64)


class _TrainBatch:
  """(B, 2) [epoch, source index] -> a training batch with one random crop per example.

  A class, not a closure, so grain workers can pickle it. Each crop's start is a hash of (seed, epoch, index)
  (`transforms.hashed_starts`): the same record gets the same crop in the same epoch, whatever the batch, process
  or worker it lands in.
  """

  def __init__(self, source: Source, contract: Contract, lead_set: Any, seed: int, num_labels: int):
    self.source, self.contract, self.seed = source, contract, seed
    self.rows, self.ids = lead_selection(lead_set, contract)
    self.num_labels = num_labels

  def __call__(self, order: np.ndarray) -> dict[str, np.ndarray]:
    examples = read_many(self.source, order[:, 1])
    window = self.contract.window
    epochs = order[:, 0]
    lengths = np.asarray([usable_samples(ex) for ex in examples], np.int64)  # padding (pad_short) left out
    starts = np.empty((len(order), 1), np.int64)
    for epoch in np.unique(epochs):  # one epoch per batch, or two across an epoch boundary
      at = epochs == epoch
      starts[at, 0] = transforms.hashed_starts(self.seed, int(epoch), order[at, 1], lengths[at], window)
    c = _Columns(examples, order[:, 1], self.rows, starts, window, self.num_labels)
    b = len(examples)
    return {"signal": _finish(c.signal[:, 0], c.lead_mask, self.contract),
            "lead_ids": np.broadcast_to(self.ids, (b, len(self.ids))).copy(), "lead_mask": c.lead_mask,
            "labels": c.labels, "record_id": c.record_id, "patient_id": c.patient_id, "valid": np.ones((b,), bool)}


def usable_samples(ex: Mapping[str, Any]) -> int:
  """Samples of an example's stored window that hold recording: `valid_samples` when the builder zero-padded it
  (`stmem prepare ... --pad_short true`), else the whole window. Crops are drawn from these."""
  n = int(np.shape(ex["signal"])[-1])
  return min(n, int(ex["valid_samples"])) if "valid_samples" in ex else n


class _EvalBatch:
  """(B,) source indices (-1 for padding) -> the fixed evaluation crops of each: signal (B, K, L, window)."""

  def __init__(self, source: Source, contract: Contract, lead_set: Any, starts: Sequence[int], num_labels: int):
    self.source, self.contract, self.starts = source, contract, np.asarray(starts, np.int64)
    self.rows, self.ids = lead_selection(lead_set, contract)
    self.num_labels = num_labels

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    b, k, slots, window = len(indices), len(self.starts), len(self.ids), self.contract.window
    valid = np.asarray(indices) >= 0
    out = {"signal": np.zeros((b, k, slots, window), np.float32),
           "lead_ids": np.broadcast_to(self.ids, (b, slots)).copy(),
           "lead_mask": np.zeros((b, slots), bool), "labels": np.zeros((b, self.num_labels), np.float32),
           "record_id": np.full((b,), b"", object), "patient_id": np.full((b,), b"", object),
           "window": np.zeros((b,), np.int32), "valid": valid}
    real = np.asarray(indices)[valid]
    if len(real):
      examples = read_many(self.source, real)
      # A zero-padded example (`pad_short`) moves its crops back inside the recording: they start at most at
      # valid_samples - window, so no evaluation crop holds padding where the recording fills one crop.
      last = np.asarray([max(usable_samples(ex) - window, 0) for ex in examples], np.int64)
      c = _Columns(examples, real, self.rows, np.minimum(self.starts[None, :], last[:, None]), window,
                   self.num_labels)
      out["signal"][valid] = _finish(c.signal, c.lead_mask, self.contract)
      out["lead_mask"][valid], out["labels"][valid] = c.lead_mask, c.labels
      out["record_id"][valid], out["patient_id"][valid] = c.record_id, c.patient_id
      out["window"][valid] = c.window
    out["record_id"], out["patient_id"] = out["record_id"].astype(bytes), out["patient_id"].astype(bytes)
    return out


def _num_labels(source: Source) -> int:
  if len(source) == 0:
    return 0
  return int(np.asarray(source[0].get("labels", np.zeros((0,)))).shape[0])


# ------------------------------------------------------------------------------------------------ the pipeline


def process_layout(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
  """(index, count) of this process: JAX's unless given (tests pass them to simulate several hosts)."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return int(process_index), int(process_count)


def _file_backed(source: Source) -> bool:
  if isinstance(source, PreparedSource):
    return True
  if isinstance(source, ConcatSource):
    return all(_file_backed(x) for x in source.sources)
  inner = getattr(source, "source", None)  # wrappers: Subset, features.ResampledSource
  return inner is not None and _file_backed(inner)


def default_worker_count(source: Source) -> int:
  """Grain worker processes for a training pipeline over `source`: one per CPU core this process may use for a
  prepared (file-backed) source, none for one in memory.

  Why per core: reading, decoding, cropping and z-scoring are all host work, and a host that drives an
  accelerator has its cores free for them (benchmarks/input_pipeline.py measures what one core delivers). Why none
  for in-memory sources: there is nothing to decode, and every worker would get a pickled copy of the arrays.
  """
  if not _file_backed(source):
    return 0
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else max(1, os.cpu_count() or 1)


def _training_order(source: Source, p: int, count: int, seed: int, num_epochs: int | None) -> grain.MapDataset:
  """[epoch, source index] of every position of this process's training stream.

  One source: its shard (every count-th example from p), reshuffled each epoch. A `MixedSource`: each component's
  shard reshuffled on its own epochs, interleaved by grain's `MapDataset.mix` in proportion to the weights. Both are
  random access by position, so the iterator's state (a position) resumes exactly.
  """
  parts = source.parts() if isinstance(source, MixedSource) else [(0, len(source), 1.0)]
  streams = []
  for k, (offset, length, _) in enumerate(parts):
    shard = list(range(offset + p, offset + length, count))
    if not shard:
      where = f"source {source.names[k]!r} ({length} examples)" if isinstance(source, MixedSource) else \
        f"a source of {length}"
      raise ValueError(f"process {p} of {count} gets no examples from {where}")
    order = _Order(shard, (seed,) if len(parts) == 1 else (seed, k), shuffle=True)
    streams.append(grain.MapDataset.range(len(shard)).repeat(num_epochs).map_with_index(order))
  if len(streams) == 1:
    return streams[0]
  return grain.MapDataset.mix(streams, [w for _, _, w in parts])


def make_dataset(source: Source, contract: Contract, *, batch_size: int, train: bool, seed: int = 0,
                 lead_set: str | Sequence[str] | None = None, num_epochs: int | None = None,
                 eval_starts: Sequence[int] | None = None, process_index: int | None = None,
                 process_count: int | None = None, worker_count: int | None = 0, read_threads: int = 0,
                 prefetch: int = 0) -> grain.IterDataset:
  """The grain pipeline of this process's share of `source`. Iterate it (`iter(...)`) for batches.

  train=True: shuffled by `seed` (a new order each epoch), repeated `num_epochs` times (None: forever), one random
    crop of `contract.window` per example, full batches only.
  train=False: in order, once, the `eval_starts` crops of every example (default
    `transforms.eval_starts(contract.record_samples, contract.window)`: 3 spread over the record), signal
    (B, K, L, window); the shard is padded with invalid rows (`valid` False) to a whole number of batches of the
    same count on every process, so no host waits on another.
  worker_count > 0 runs the batch work in that many grain worker processes; None chooses
  `default_worker_count(source)` (training only; evaluation stays in process). read_threads > 0 reads ahead with
  that many threads. Both keep the iterator state exact.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  p, count = process_layout(process_index, process_count)
  n = len(source)
  lead_selection(lead_set, contract)  # refuse a bad lead set here, not inside a worker
  shard = list(range(p, n, count))
  num_labels = 0 if isinstance(source, MixedSource) else _num_labels(source)  # a mixture's labels do not line up
  if train:
    ds = _training_order(source, p, count, seed, num_epochs).batch(batch_size, drop_remainder=True)
    ds = ds.map(_TrainBatch(source, contract, lead_set, seed, num_labels))
  else:
    if eval_starts is None:
      eval_starts = transforms.eval_starts(contract.record_samples, contract.window)
    per_process = math.ceil(math.ceil(n / count) / batch_size) * batch_size
    shard += [-1] * (per_process - len(shard))
    ds = grain.MapDataset.source(np.asarray(shard, np.int64)).batch(batch_size, drop_remainder=True)
    ds = ds.map(_EvalBatch(source, contract, lead_set, eval_starts, num_labels))
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch, read_threads))
  it_ds = ds.to_iter_dataset(options)
  if worker_count is None:
    worker_count = default_worker_count(source) if train else 0
  if worker_count > 0:
    _absl_flags_ready()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it_ds


def _absl_flags_ready() -> None:
  """grain's worker processes read absl flags; outside an absl `app.run` (pytest, notebooks, `stmem` without absl)
  nothing parsed them and grain raises UnparsedFlagAccessError. Mark them parsed with their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_iterator(source: Source, contract: Contract, *, state: Mapping[str, Any] | bytes | None = None,
                  **kwargs: Any) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`, restored to `state` (from `it.get_state()`) when given.

  Save `it.get_state()` with the checkpoint (it is a small JSON-able dict; `grain.checkpoint.CheckpointSave(it)`
  does it through orbax) and pass it back here to resume on exactly the next batch.
  """
  it = iter(make_dataset(source, contract, **kwargs))
  if state is not None:
    it.set_state(state)
  return it


# ------------------------------------------------------------------------------------------------ global arrays


def to_global(batch: Mapping[str, np.ndarray], sharding: Any | Mapping[str, Any]) -> dict[str, Any]:
  """Per-process numpy batches -> global `jax.Array`s laid out by `sharding` (one for all keys, or one per key).

  Each process passes its own rows; the global batch is their concatenation in process order
  (`jax.make_array_from_process_local_data`). Text arrays (`record_id`, `patient_id`) cannot live on devices and
  are returned unchanged, still per process.
  """
  import jax
  out: dict[str, Any] = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in ("S", "U", "O"):
      out[key] = value
      continue
    s = sharding[key] if isinstance(sharding, Mapping) else sharding
    out[key] = jax.make_array_from_process_local_data(s, value)
  return out
