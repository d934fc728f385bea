"""Input pipelines: prepared datasets (or in-memory arrays) -> batches -> global jax.Arrays, with savable state.

One pipeline for every program. It takes any random-access source of example dicts (a prepared ArrayRecord split
via `tfds`, or `ArraySource` over numpy arrays for synthetic ECGs), and does, per process:

  indices -> this process's shard -> seeded shuffle (reshuffled each epoch) -> repeat (training)
          -> read example -> crop (training: one random crop; evaluation: the fixed eval crops)
          -> optional lead-set selection by name -> filter if per_crop, z-score -> batch

Why the pipeline runs over indices and derives each crop's RNG from (seed, epoch, source index): the batch at any
step is a pure function of (seed, step, process layout), so a restored iterator continues with exactly the batch
that would have come next, and a given record gets the same crop in a given epoch whatever the process count.

The batch (numpy, per process):
  signal     float32 (B, L, T)  L lead slots (12, or the chosen lead set), T = contract.window
  lead_ids   int32   (B, L)     canonical id of the lead in each slot
  lead_mask  bool    (B, L)     False where the lead is absent from the record
  labels     float32 (B, C)     C may be 0 for unlabelled data
  record_id  bytes   (B,)
  patient_id bytes   (B,)
  valid      bool    (B,)       False for evaluation padding rows (so every process yields the same number of batches)
  crop_index int32   (B,)       which evaluation crop a row is (0 in training)

Evaluation batches hold `batch_size` records, i.e. `batch_size * len(eval_starts)` rows, crops of one record
adjacent.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from data_pipelines import leads as leads_lib
from data_pipelines.contract import Contract
from data_pipelines.errors import UsageError

EVAL_STARTS = (0, 125, 250)  # the reference's three evaluation crops at 250 Hz (0, 0.5 and 1 s)
BATCH_KEYS = ("signal", "lead_ids", "lead_mask", "labels", "record_id", "patient_id", "valid", "crop_index")


class Source(Protocol):
  """Anything random-access that returns example dicts (`signal` (12, T), `lead_mask`, `labels`, ids)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Mapping[str, Any]: ...


# ------------------------------------------------------------------------------------------------ sources


class ArraySource:
  """A random-access source over a dict of equal-length numpy arrays (synthetic ECGs, tests, small sets).

  Required: `signal` (N, 12, T) float32. Optional: `lead_mask` (N, 12) bool (default all present), `labels` (N, C)
  (default (N, 0)), `record_id` / `patient_id` (N,) (default the row number). Picklable, so grain worker processes
  can use it.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if "signal" not in arrays:
      raise ValueError(f"ArraySource needs a 'signal' array; got {sorted(arrays)}")
    signal = np.asarray(arrays["signal"], np.float32)
    if signal.ndim != 3 or signal.shape[1] != leads_lib.NUM_LEADS:
      raise ValueError(f"signal must be (N, {leads_lib.NUM_LEADS}, T) in canonical lead order; got {signal.shape}")
    n = signal.shape[0]
    self.arrays: dict[str, np.ndarray] = {"signal": signal}
    self.arrays["lead_mask"] = np.asarray(arrays.get("lead_mask", np.ones((n, leads_lib.NUM_LEADS), bool)), bool)
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
  return Prepared(source=builder.as_data_source(split=split), contract=builder_base.load_contract(folder),
                  label_names=tuple(builder_base.load_label_names(folder)), folder=os.fspath(folder), split=split)


# ------------------------------------------------------------------------------------------------ per-example work


def _text(value: Any) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, np.ndarray):
    value = value.item()
  return value if isinstance(value, bytes) else str(value).encode()


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


def _finish(crops: np.ndarray, masks: np.ndarray, contract: Contract) -> np.ndarray:
  """A batch of crops (B, slots, T) of the selected slots -> the contract's per-crop work (filter if per_crop,
  z-score per ECG), in one call for the whole batch; absent slots stay zero.

  Why select before z-scoring: a model given 6 leads at inference sees statistics of those 6 leads only, so
  training on a lead subset must standardise the same way.
  """
  from data_pipelines import transforms
  return np.asarray(transforms.finish_crop(crops, contract, masks), np.float32)


def _read(source: Source, indices: Sequence[int]) -> list[Mapping[str, Any]]:
  """Examples at `indices`, in one batched read when the source offers it (ArrayRecord reads them in parallel)."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return list(getitems([int(i) for i in indices]))
  return [source[int(i)] for i in indices]


class _Order:
  """position in this process's stream -> (position, source index): the shard, permuted afresh each epoch.

  The permutation of epoch e is `default_rng((seed, e)).permutation(len(shard))`: a pure function of (seed, epoch),
  so any position can be computed without replaying the ones before it (exact resume). One numpy permutation per
  epoch instead of grain's per-element index shuffle, which cost about 0.3 ms an element here.
  """

  def __init__(self, shard: Sequence[int], seed: int, shuffle: bool):
    self.shard = np.asarray(shard, np.int64)
    self.seed, self.shuffle = seed, shuffle
    self._epoch, self._perm = -1, self.shard

  def __call__(self, position: int, _: Any) -> np.ndarray:
    epoch, k = divmod(int(position), len(self.shard))
    if self.shuffle and epoch != self._epoch:
      self._epoch = epoch
      self._perm = self.shard[np.random.default_rng((self.seed, epoch)).permutation(len(self.shard))]
    return np.asarray([position, self._perm[k]], np.int64)


class _TrainBatch:
  """(B, 2) [position, source index] -> a training batch with one random crop per example.

  A class, not a closure, so grain workers can pickle it. Each crop's RNG is `default_rng((seed, epoch, index))`:
  the same record gets the same crop in the same epoch, whatever the batch, process or worker it lands in.
  """

  def __init__(self, source: Source, contract: Contract, lead_set: Any, seed: int, shard_len: int):
    self.source, self.contract, self.seed, self.shard_len = source, contract, seed, shard_len
    self.rows, self.ids = lead_selection(lead_set, contract)

  def __call__(self, order: np.ndarray) -> dict[str, np.ndarray]:
    from data_pipelines import transforms
    examples = _read(self.source, order[:, 1])
    crops, masks, labels, rids, pids = [], [], [], [], []
    for (position, index), ex in zip(order, examples):
      rng = np.random.default_rng((self.seed, int(position) // self.shard_len, int(index)))
      signal = np.asarray(ex["signal"], np.float32)
      mask = np.asarray(ex.get("lead_mask", np.ones(signal.shape[0], bool)), bool)
      crops.append(transforms.random_crop(signal, self.contract.window, rng)[self.rows])
      masks.append(mask[self.rows])
      labels.append(np.asarray(ex.get("labels", np.zeros((0,), np.float32)), np.float32))
      rids.append(_text(ex.get("record_id", str(index))))
      pids.append(_text(ex.get("patient_id", ex.get("record_id", str(index)))))
    b = len(examples)
    masks = np.stack(masks)
    return {"signal": _finish(np.stack(crops), masks, self.contract),
            "lead_ids": np.broadcast_to(self.ids, (b, len(self.ids))).copy(),
            "lead_mask": masks, "labels": np.stack(labels), "record_id": np.asarray(rids),
            "patient_id": np.asarray(pids), "valid": np.ones((b,), bool), "crop_index": np.zeros((b,), np.int32)}


class _EvalBatch:
  """(B,) source indices (-1 for padding) -> the fixed evaluation crops of each, crops of a record adjacent."""

  def __init__(self, source: Source, contract: Contract, lead_set: Any, starts: Sequence[int], num_labels: int):
    self.source, self.contract, self.starts = source, contract, tuple(int(s) for s in starts)
    self.rows, self.ids = lead_selection(lead_set, contract)
    self.num_labels = num_labels

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    from data_pipelines import transforms
    k, n_slots, window = len(self.starts), len(self.ids), self.contract.window
    real = [int(i) for i in indices if i >= 0]
    examples = iter(_read(self.source, real))
    out: dict[str, list[Any]] = {key: [] for key in ("signal", "lead_mask", "labels", "record_id", "patient_id",
                                                     "valid")}
    for index in indices:
      if index < 0:
        out["signal"].append(np.zeros((k, n_slots, window), np.float32))
        out["lead_mask"].append(np.zeros((k, n_slots), bool))
        out["labels"].append(np.zeros((k, self.num_labels), np.float32))
        out["record_id"] += [b""] * k
        out["patient_id"] += [b""] * k
        out["valid"].append(np.zeros((k,), bool))
        continue
      ex = next(examples)
      signal = np.asarray(ex["signal"], np.float32)
      mask = np.asarray(ex.get("lead_mask", np.ones(signal.shape[0], bool)), bool)
      crops = transforms.eval_crops(signal, window, starts=self.starts)
      labels = np.asarray(ex.get("labels", np.zeros((0,), np.float32)), np.float32)
      out["signal"].append(crops[:, self.rows])
      out["lead_mask"].append(np.broadcast_to(mask[self.rows], (k, n_slots)))
      out["labels"].append(np.broadcast_to(labels, (k, labels.shape[0])))
      out["record_id"] += [_text(ex.get("record_id", str(index)))] * k
      out["patient_id"] += [_text(ex.get("patient_id", ex.get("record_id", str(index))))] * k
      out["valid"].append(np.ones((k,), bool))
    rows = len(indices) * k
    lead_mask = np.concatenate(out["lead_mask"])
    return {"signal": _finish(np.concatenate(out["signal"]), lead_mask, self.contract),
            "lead_ids": np.broadcast_to(self.ids, (rows, n_slots)).copy(),
            "lead_mask": lead_mask, "labels": np.concatenate(out["labels"]),
            "record_id": np.asarray(out["record_id"]), "patient_id": np.asarray(out["patient_id"]),
            "valid": np.concatenate(out["valid"]), "crop_index": np.tile(np.arange(k, dtype=np.int32), len(indices))}


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


def make_dataset(source: Source, contract: Contract, *, batch_size: int, train: bool, seed: int = 0,
                 lead_set: str | Sequence[str] | None = None, num_epochs: int | None = None,
                 eval_starts: Sequence[int] = EVAL_STARTS, process_index: int | None = None,
                 process_count: int | None = None, worker_count: int = 0, read_threads: int = 0,
                 prefetch: int = 0) -> grain.IterDataset:
  """The grain pipeline of this process's share of `source`. Iterate it (`iter(...)`) for batches.

  train=True: shuffled by `seed` (a new order each epoch), repeated `num_epochs` times (None: forever), one random
    crop of `contract.window` per example, full batches only.
  train=False: in order, once, the `eval_starts` crops of every example; the shard is padded with invalid rows
    (`valid` False) to a whole number of batches of the same count on every process, so no host waits on another.
  worker_count > 0 runs the per-example work in that many grain worker processes (batches are made in the workers);
  read_threads > 0 reads ahead with that many threads. Both keep the iterator state exact.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  p, count = process_layout(process_index, process_count)
  n = len(source)
  lead_selection(lead_set, contract)  # refuse a bad lead set here, not inside a worker
  shard = list(range(p, n, count))
  if train:
    if not shard:
      raise ValueError(f"process {p} of {count} gets no examples from a source of {n}")
    ds = grain.MapDataset.range(len(shard)).repeat(num_epochs)
    ds = ds.map_with_index(_Order(shard, seed, shuffle=True)).batch(batch_size, drop_remainder=True)
    ds = ds.map(_TrainBatch(source, contract, lead_set, seed, len(shard)))
  else:
    per_process = math.ceil(math.ceil(n / count) / batch_size) * batch_size
    shard += [-1] * (per_process - len(shard))
    ds = grain.MapDataset.source(np.asarray(shard, np.int64)).batch(batch_size, drop_remainder=True)
    ds = ds.map(_EvalBatch(source, contract, lead_set, eval_starts, _num_labels(source)))
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch, read_threads))
  it_ds = ds.to_iter_dataset(options)
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


def batch_spec(contract: Contract, batch_size: int, num_labels: int, lead_set: str | Sequence[str] | None = None,
               train: bool = True, eval_starts: Sequence[int] = EVAL_STARTS) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of each numeric batch array, for ahead-of-time compilation without reading data."""
  rows = batch_size if train else batch_size * len(eval_starts)
  slots = len(lead_selection(lead_set, contract)[1])
  return {"signal": ((rows, slots, contract.window), np.float32), "lead_ids": ((rows, slots), np.int32),
          "lead_mask": ((rows, slots), np.bool_), "labels": ((rows, num_labels), np.float32),
          "valid": ((rows,), np.bool_), "crop_index": ((rows,), np.int32)}


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


def batch_sharding(mesh: Any, axis: str | tuple[str, ...] = "data") -> Any:
  """The usual batch layout: leading (batch) dimension split over `axis` of `mesh`, the rest replicated."""
  import jax
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


# ------------------------------------------------------------------------------------------------ conveniences


def prepared_iterator(data_dir: str | os.PathLike[str], split: str, *, batch_size: int, train: bool,
                      contract: Contract | None = None, name: str | None = None,
                      **kwargs: Any) -> tuple[grain.DatasetIterator, Prepared]:
  """Iterator over a prepared split, under the folder's own contract unless `contract` is given.

  Why allow another contract: a checkpoint's window may differ from the data's; `data_pipelines.contract.check` decides
  whether that is adaptable before this is called.
  """
  prepared = open_prepared(data_dir, split, name)
  it = make_iterator(prepared.source, contract or prepared.contract, batch_size=batch_size, train=train, **kwargs)
  return it, prepared


def array_iterator(arrays: Mapping[str, np.ndarray], contract: Contract, *, batch_size: int, train: bool,
                   **kwargs: Any) -> grain.DatasetIterator:
  """The same pipeline over in-memory arrays (see `ArraySource`): the demo's synthetic ECGs."""
  return make_iterator(ArraySource(arrays), contract, batch_size=batch_size, train=train, **kwargs)


