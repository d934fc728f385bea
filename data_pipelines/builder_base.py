"""What every stmem TFDS builder shares: Record -> examples, splits, the quarantine and the files beside the data.

The builders in `data_pipelines/<name>/` are thin on purpose: each one only knows where its dataset keeps records,
labels and patient ids. Everything that must be identical across datasets (resampling to the contract rate, cutting
10 s windows, dropping broken windows, the example layout, the content hash that overlap checks rely on, the report
of skipped records) lives here once, so that two datasets prepared under one contract are interchangeable.

Written beside the ArrayRecord shards (in the builder's versioned folder):
  contract.json     the preprocessing contract, every parameter included;
  labels.json       the label names, in the order of the `labels` vector;
  quarantine.jsonl  one line per skipped record (file, reason, detail);
  records.jsonl     one line per written record (split, ids, source, content hash, windows): the overlap index;
  summary.json      counts (records read, examples written, quarantined by reason, padded, duplicated by
                    content hash) and the histogram of record lengths;
  inputs.json       what it was built from (`data_pipelines.inputs`: builder options, the download's files).

A build never writes into the folder it will occupy: `stmem prepare` builds in a staging folder beside it and
`swap_into_place` moves the finished dataset in, so a failed or interrupted build (or `--overwrite`) leaves the
previous dataset as it was and no half-written folder behind; the quarantine report of a failed build is kept
(`FAILED_REPORT`), since it is what the user needs then.

No TensorFlow: builders write `file_format='array_record'` and features are fixed-shape numpy Tensors and Text,
which tfds encodes and decodes with numpy alone.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines.quarantine import Quarantine
from data_pipelines.readers import common
from data_pipelines.record import Record, RecordError
from data_pipelines import contract as contract_lib
from data_pipelines.contract import Contract

VERSION = "1.0.0"
SIDE_FILES = ("contract.json", "labels.json", "quarantine.jsonl", "records.jsonl", "summary.json", "inputs.json")
# Beside the versioned folders (`<data_dir>/<name>/`): the report of the last build that failed, removed by the next
# one that succeeds.
FAILED_REPORT = "quarantine.failed-build.jsonl"
# Deterministic patient-grouped split used by datasets without an official one.
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}


# ------------------------------------------------------------------------------------------------ small helpers


def content_hash(record: Record) -> str:
  """sha1 of the raw samples in canonical lead order, quantised to 1 microvolt, and the sampling rate.

  Why quantised: the same recording is redistributed in different containers (PTB-XL `.dat` vs the CinC `.mat` copy)
  whose float conversions can differ in the last bit; the integer microvolt values do not. Why canonical order:
  files list leads in different orders. Computed before resampling so it identifies the recording, not our
  preprocessing of it.
  """
  signal, present = record.standard()
  micro = np.round(np.nan_to_num(np.asarray(signal, np.float64), nan=0.0) * 1000.0).astype(np.int32)
  h = hashlib.sha1()
  h.update(f"fs={float(record.fs):g};leads={''.join('1' if p else '0' for p in present)};".encode())
  h.update(np.ascontiguousarray(micro).tobytes())
  return h.hexdigest()


def hash_fraction(key: str) -> float:
  """A stable number in [0, 1) from a string: the same patient lands in the same split on every machine."""
  return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16) / float(16 ** 15)


def hash_split(key: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> str:
  """The split a patient belongs to, by hashing its id: grouped by patient and independent of file order."""
  u, acc = hash_fraction(key), 0.0
  names = list(fractions)
  total = float(sum(fractions.values()))
  for name in names:
    acc += fractions[name] / total
    if u < acc:
      return name
  return names[-1]


def split_names(keys: Iterable[Any], fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> np.ndarray:
  """`hash_split` of each key (patient ids) as a str array: the one patient-grouped split, for data in memory."""
  return np.asarray([hash_split(str(k), fractions) for k in keys], dtype=str)


def parse_fractions(spec: str | Mapping[str, float] | None) -> dict[str, float]:
  """`train=0.8,validation=0.1,test=0.1` (or a mapping) -> fractions; zero-fraction splits are dropped."""
  if spec is None or spec == "":
    return dict(DEFAULT_FRACTIONS)
  if isinstance(spec, Mapping):
    out = {str(k): float(v) for k, v in spec.items()}
  else:
    out = {}
    for part in str(spec).split(","):
      name, _, value = part.partition("=")
      out[name.strip()] = float(value) if value else 1.0
  out = {k: v for k, v in out.items() if v > 0}
  if not out:
    raise ValueError(f"split fractions {spec!r} give no split")
  return out


def parse_bool(value: bool | str, name: str) -> bool:
  """A builder option given as text (`true`, `false`, `1`, `0`, `yes`, `no`); UsageError naming the option."""
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("true", "1", "yes", "y"):
    return True
  if text in ("false", "0", "no", "n", ""):
    return False
  from data_pipelines.errors import UsageError
  raise UsageError(f"--{name} {value!r}: expected true or false")


def age_code(value: Any) -> float:
  """The stored `age`: years as the readers parse it (`readers.common.parse_age`), -1.0 when unknown."""
  age = common.parse_age(value)
  return -1.0 if age is None else float(age)


def sex_code(value: Any) -> int:
  """The stored `sex`: 1 male, 0 female, -1 unknown, from the readers' `M` / `F` (`readers.common.parse_sex`).

  An integer is taken as already coded (a builder that converted a dataset-specific numeric code itself).
  """
  if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    return int(value)
  return {"M": 1, "F": 0}.get(common.parse_sex(value), -1)


def multi_hot(names: Iterable[str], vocabulary: Sequence[str]) -> np.ndarray:
  """Multi-hot float32 over `vocabulary`; names outside it are ignored."""
  index = {n: i for i, n in enumerate(vocabulary)}
  out = np.zeros((len(vocabulary),), np.float32)
  for n in names:
    i = index.get(str(n))
    if i is not None:
      out[i] = 1.0
  return out


def rglob(root: str | os.PathLike[str], pattern: str) -> list[str]:
  """Files under `root` at any depth matching `pattern`, sorted. Local folders (epath refuses `**` for GCS reasons);
  downloads live on local disk."""
  import pathlib
  return sorted(str(p) for p in pathlib.Path(os.fspath(root)).rglob(pattern))


def non_empty(chosen: Mapping[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
  """Splits that have at least one record: tfds refuses to write an empty split (a PTB-XL excerpt may lack fold 9)."""
  return {name: items for name, items in chosen.items() if len(items)}


def read_each(paths: Iterable[Any], reader: Callable[[Any], Record]) -> Iterator[Record | RecordError]:
  """Read paths one by one, turning any failure into a RecordError that names the file.

  Why not let exceptions fly: one unreadable file among 300,000 must not stop a build (it is quarantined instead),
  and an unexpected exception type from a third-party reader still has to name the file it came from.
  """
  for path in paths:
    try:
      yield reader(path)
    except RecordError as e:
      yield e
    except Exception as e:  # noqa: BLE001 - any reader failure becomes a quarantined record.
      yield RecordError(str(path), "unreadable", f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------ Record -> windows


def _validate(record: Record) -> None:
  """The shape checks that windows rely on. Duration, rate, finiteness and flat leads are the readers' `validate`,
  which every reader applies before returning a Record; not repeated here. Raises RecordError."""
  signal = np.asarray(record.signal)
  where = record.path or record.record_id
  if signal.ndim != 2 or signal.shape[0] != len(record.leads) or signal.shape[-1] == 0:
    raise RecordError(where, "bad_header", f"signal shape {signal.shape} for {len(record.leads)} leads")
  if not record.leads:
    raise RecordError(where, "unknown_leads", f"no standard lead (dropped {list(record.dropped_leads)})")


def record_windows(record: Record, contract: Contract) -> tuple[np.ndarray, np.ndarray, int]:
  """(windows, lead_present, dropped): non-overlapping (W, 12, record_samples) float32 windows at contract.fs.

  Resampling, the offline filter (when filter_stage == 'offline') and the cutting are the transforms module's (which
  already drops windows holding NaN); windows still holding NaN or inf are dropped here and counted in `dropped`,
  because one bad sample poisons a whole z-scored crop.
  """
  from data_pipelines import transforms
  windows = np.asarray(transforms.prepare_record_windows(record, contract), np.float32)
  present = np.asarray(transforms.lead_mask(record, contract), bool)
  good = np.isfinite(windows).reshape(len(windows), -1).all(axis=1) if len(windows) else np.zeros((0,), bool)
  return windows[good], present, int((~good).sum())


def pad_short_record(record: Record, contract: Contract) -> tuple[Record, int]:
  """(record resampled to contract.fs and zero-padded at the end to one stored window, real samples), for
  `pad_short` builds; other records come back unchanged with `record_samples` real samples.

  Only records that fill at least one model crop (`contract.window`) are padded, so the first crop a model sees
  is all recording; shorter ones stay `too_short`. Resampled before padding, so that FFT ringing never reaches the
  padding. Zeros, never NaN: a NaN would poison the z-score of every crop that touches it. The example's
  `valid_samples` says where the recording ends.
  """
  from data_pipelines import transforms
  native = int(round(contract.record_samples * float(record.fs) / contract.fs))
  have = record.signal.shape[-1]
  if have >= native or have * contract.fs / float(record.fs) < contract.window:
    return record, contract.record_samples
  x = transforms.resample(np.asarray(record.signal, np.float64), record.fs, contract.fs)
  valid = min(x.shape[-1], contract.record_samples)
  signal = np.zeros((x.shape[0], contract.record_samples), np.float32)
  signal[:, :valid] = x[:, :valid]
  return dataclasses.replace(record, signal=signal, fs=float(contract.fs)), valid


def record_examples(record: Record, contract: Contract, labels: np.ndarray, *, age: float = -1.0, sex: int = -1,
                    source: str | None = None, pad_short: bool = False
                    ) -> tuple[list[tuple[str, dict[str, Any]]], str, int]:
  """The examples of one record: ([(key, example)], content_hash, windows dropped). Raises RecordError.

  A record with no usable window is an error (quarantined), never an empty success. Longer records give every full
  window; with `pad_short`, a record shorter than one window but at least one crop long is zero-padded
  (`pad_short_record`).
  """
  _validate(record)
  digest = content_hash(record)
  valid = contract.record_samples
  if pad_short:
    record, valid = pad_short_record(record, contract)
  windows, present, dropped = record_windows(record, contract)
  if valid < contract.record_samples and len(windows):
    windows[-1][:, valid:] = 0.0  # an offline filter rings into the padding; the padding stays zeros
  where = record.path or record.record_id
  if not len(windows):
    native = contract.record_samples * float(record.fs) / contract.fs
    if dropped or record.signal.shape[-1] >= native:
      raise RecordError(where, "non_finite", "every window holds NaN or inf samples")
    hint = "" if pad_short else " (--pad_short true pads records at least one crop long)"
    raise RecordError(where, "too_short",
                      f"{record.seconds:.2f} s < {contract.record_samples / contract.fs:.2f} s needed for one window"
                      + hint)
  source = record.source if source is None else source
  patient = record.patient_id if record.patient_id not in (None, "") else record.record_id
  out = []
  for i, w in enumerate(windows):
    out.append((f"{source}/{record.record_id}/{i}", {
      "signal": w,
      "lead_mask": np.asarray(present, bool),
      "record_id": str(record.record_id),
      "patient_id": str(patient),
      "source": str(source),
      "window": i,
      "labels": np.asarray(labels, np.float32),
      "age": np.float32(age),
      "sex": np.int32(sex),
      "content_hash": digest,
      "valid_samples": np.int32(valid if i == len(windows) - 1 else contract.record_samples),
    }))
  return out, digest, dropped


def features(num_labels: int, contract: Contract) -> tfds.features.FeaturesDict:
  """The example layout: rows of `signal` and `lead_mask` are the contract's leads, in its order.

  Fixed-shape numpy Tensors, Scalars and Text only: tfds encodes and decodes these with numpy alone (checked with
  tfds 4.9.10 and no TensorFlow installed, zero-length `labels` included).
  """
  n_leads = len(contract.leads)
  return tfds.features.FeaturesDict({
    "signal": tfds.features.Tensor(shape=(n_leads, contract.record_samples), dtype=np.float32),
    "lead_mask": tfds.features.Tensor(shape=(n_leads,), dtype=np.bool_),
    "record_id": tfds.features.Text(),
    "patient_id": tfds.features.Text(),
    "source": tfds.features.Text(),
    "window": tfds.features.Scalar(dtype=np.int32),
    "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.float32),
    "age": tfds.features.Scalar(dtype=np.float32),
    "sex": tfds.features.Scalar(dtype=np.int32),
    "content_hash": tfds.features.Text(),
    "valid_samples": tfds.features.Scalar(dtype=np.int32),  # samples before zero padding (`pad_short`)
  })


# ------------------------------------------------------------------------------------------------ the builder base


class BuildStats:
  """Counts of one build, for the closing summary and summary.json."""

  def __init__(self) -> None:
    self.records_read = 0
    self.records_written = 0
    self.examples_written = 0
    self.windows_dropped = 0
    self.quarantined: collections.Counter[str] = collections.Counter()
    self.errors: list[RecordError] = []
    self.index: list[dict[str, Any]] = []
    self.per_split: collections.Counter[str] = collections.Counter()
    self.seconds: list[float] = []  # length of every written record, for the length histogram
    self.padded = 0
    self.label_names: tuple[str, ...] = ()
    self.label_kind: str | None = None
    self.label_counts: np.ndarray | None = None  # records written per label
    self.notes: list[str] = []  # what a builder wants the user to read in the summary (e.g. unused label rows)

  def duplicates(self) -> dict[str, list[dict[str, Any]]]:
    """{content hash: the written records that share it} for hashes written more than once."""
    return internal_duplicates(self.index)

  def to_dict(self) -> dict[str, Any]:
    dup = self.duplicates()
    return {
      "records_read": self.records_read,
      "records_written": self.records_written,
      "examples_written": self.examples_written,
      "examples_per_split": dict(self.per_split),
      "windows_dropped_non_finite": self.windows_dropped,
      "quarantined": sum(self.quarantined.values()),
      "quarantined_by_reason": dict(sorted(self.quarantined.items())),
      "records_padded": self.padded,
      "length_seconds": length_histogram(self.seconds),
      "duplicate_records": sum(len(v) - 1 for v in dup.values()),
      "duplicate_groups": [[f"{r['split']}/{r['record_id']}" for r in v] for v in dup.values()][:20],
      "records_with_notes": sum(1 for r in self.index if r.get("notes")),
      "records_with_flat_leads": sum(1 for r in self.index if r.get("flat_leads")),
      "flat_leads_by_lead": dict(collections.Counter(lead for r in self.index for lead in r.get("flat_leads", ()))
                                 .most_common()),
      "first_note": next((f"{r['record_id']}: {r['notes'][0]}" for r in self.index if r.get("notes")), None),
      "notes": list(self.notes),
      "label_kind": self.label_kind,
      "label_counts": ({n: int(c) for n, c in zip(self.label_names, self.label_counts)}
                       if self.label_counts is not None else {}),
    }


# Edges of the length histogram (s): 10 s is the stored window; CinC 2017 runs 9-61 s, Holter excerpts longer.
LENGTH_EDGES = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def length_histogram(seconds: Sequence[float]) -> dict[str, Any]:
  """Record lengths: min / median / max and `bins`, [range, count] pairs in `LENGTH_EDGES` order (`["10-15 s", 8]`),
  empty bins left out (pairs, not a mapping, so that summary.json keeps them in order).

  Why in every summary: a variable-length set (9-61 s) gives many windows per long record and none per short one,
  which changes what a 'record' weighs in training; the summary should show that before anyone trains on it.
  """
  if not len(seconds):
    return {"min": None, "median": None, "max": None, "bins": []}
  x = np.asarray(seconds, np.float64)
  edges = list(LENGTH_EDGES) + [np.inf]
  bins = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    n = int(((x >= lo) & (x < hi)).sum())
    if n:
      bins.append([f"{lo:g}-{hi:g} s" if np.isfinite(hi) else f">= {lo:g} s", n])
  return {"min": round(float(x.min()), 2), "median": round(float(np.median(x)), 2), "max": round(float(x.max()), 2),
          "bins": bins}


def internal_duplicates(index: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Records of one dataset's index (records.jsonl rows) that share a content hash: {hash: [rows]}, by first id.

  The same recording filed twice (copied under two names, or two exams of one tracing) inflates a test split and
  leaks between splits; only the samples can tell.
  """
  by_hash: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for r in index:
    by_hash[r["content_hash"]].append(dict(r))
  groups = {h: sorted(v, key=lambda r: (r["split"], r["record_id"])) for h, v in by_hash.items() if len(v) > 1}
  return dict(sorted(groups.items(), key=lambda kv: (kv[1][0]["record_id"], kv[0])))


class StmemBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of every stmem builder. Subclasses set `label_names` and implement `_split_generators`.

  Construction arguments (all keyword, beside tfds's own `data_dir`, `file_format`...):
    manual_dir:  the folder the user downloaded (also accepted through tfds's DownloadConfig); builders whose label
                 list is read from the download (CinC's dx_mapping.csv) need it here, before tfds asks for `_info`.
    contract:    the preprocessing contract (default `Contract()`); written as contract.json.
    strict:      raise on the first bad record instead of quarantining it.
    show_progress: a tqdm bar over records per split.
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "ST-MEM contract examples: (12, record_samples) float32 windows + lead mask + ids."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Download the dataset yourself and pass its folder as --manual_dir."
  label_names: tuple[str, ...] = ()
  label_kind: str | None = None  # "multiclass" / "multilabel" when the builder knows (shown in the summary)

  # The options every builder takes (`stmem prepare NAME --help` lists them with the builder's own `OPTIONS`).
  COMMON_OPTIONS = {
    "lead_map": "rename file channels to standard leads, e.g. ECG=I or MLII=II,V=V1 (for names no alias covers)",
    "pad_short": "true: zero-pad records shorter than one stored window but at least one crop long (else skipped)",
  }
  OPTIONS: dict[str, str] = {}

  def __init__(self, *, manual_dir: str | os.PathLike[str] | None = None, contract: Contract | None = None,
               strict: bool = False, show_progress: bool = True, lead_map: str | Mapping[str, str] | None = None,
               pad_short: bool | str = False, **kwargs: Any):
    from data_pipelines.readers import parse_lead_map
    self.lead_map = parse_lead_map(lead_map)
    self.pad_short = parse_bool(pad_short, "pad_short")
    self.manual_root = epath.Path(manual_dir) if manual_dir is not None else None
    self.contract = contract if contract is not None else Contract()
    self.strict = strict
    self.show_progress = show_progress
    self.stats = BuildStats()
    self._generated = False
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=features(len(self.label_names), self.contract),
      metadata=tfds.core.MetadataDict(contract=self.contract.to_dict(), label_names=list(self.label_names)),
    )

  def manual(self, dl_manager: Any = None) -> epath.Path:
    """The user's download folder, from the constructor or tfds's DownloadConfig."""
    if self.manual_root is not None:
      return self.manual_root
    if dl_manager is not None:
      return epath.Path(dl_manager.manual_dir)
    raise ValueError(f"{self.name}: pass manual_dir= (the folder holding the downloaded dataset)")

  # -- the one loop every split goes through

  def generate(self, items: Iterable[Record | RecordError], split: str,
               describe: Callable[[Record], Mapping[str, Any]], total: int | None = None
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Examples of `items` (records or their reading errors). `describe(record)` returns the record's `labels`
    (required), and optionally `age`, `sex`, `source`, `patient_id`; it may raise RecordError (e.g. unknown label).
    """
    self._generated = True
    self.stats.label_names, self.stats.label_kind = tuple(self.label_names), self.label_kind
    bar = None
    if self.show_progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=total, desc=f"{self.name} {split}", unit=" records", leave=True)
    try:
      for item in items:
        self.stats.records_read += 1
        if bar is not None:
          bar.update(1)
        try:
          if isinstance(item, RecordError):
            raise item
          meta = dict(describe(item))
          if meta.get("patient_id"):
            item.patient_id = str(meta["patient_id"])
          examples, digest, dropped = record_examples(
            item, self.contract, meta["labels"], age=age_code(meta.get("age")), sex=sex_code(meta.get("sex")),
            source=meta.get("source"), pad_short=self.pad_short)
        except RecordError as e:
          if self.strict:
            raise
          self.stats.quarantined[e.reason] += 1
          self.stats.errors.append(e)
          if bar is not None:
            bar.set_postfix(quarantined=sum(self.stats.quarantined.values()))
          continue
        self.stats.records_written += 1
        self.stats.examples_written += len(examples)
        self.stats.windows_dropped += dropped
        self.stats.per_split[split] += len(examples)
        self.stats.seconds.append(item.seconds)
        labels = np.asarray(meta["labels"], np.float64) > 0
        self.stats.label_counts = labels + (0 if self.stats.label_counts is None else self.stats.label_counts)
        self.stats.padded += int(examples[-1][1]["valid_samples"] < self.contract.record_samples)
        first = examples[0][1]
        self.stats.index.append({"split": split, "record_id": first["record_id"], "patient_id": first["patient_id"],
                                 "source": first["source"], "content_hash": digest, "windows": len(examples),
                                 "path": os.path.basename(str(item.path)) if item.path else "",
                                 **({"notes": list(item.metadata["notes"])} if item.metadata.get("notes") else {}),
                                 # leads that were flat in the file, written masked (absent): said, never silent
                                 **({"flat_leads": list(item.metadata["flat_leads"])}
                                    if item.metadata.get("flat_leads") else {})})
        yield from examples
    finally:
      if bar is not None:
        bar.close()

  # tfds prints the folder it builds in, which is `stmem prepare`'s staging folder ("... to .../.ludb.building-x/");
  # the closing summary names the final folder instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _generate_examples(self, *args: Any, **kwargs: Any):
    """Unused: every split goes through `generate` (tfds only requires the method to exist)."""
    raise NotImplementedError

  # -- files beside the data

  def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
    """tfds's build, then contract.json, labels.json, quarantine.jsonl, records.jsonl and summary.json beside it.

    Written only when this call generated the data: re-running on a prepared folder must not blank its report.
    """
    super().download_and_prepare(*args, **kwargs)
    if self._generated:
      store_uncompressed(epath.Path(self.data_dir))
      write_side_files(epath.Path(self.data_dir), self.contract, self.label_names, self.stats)


def store_uncompressed(folder: epath.Path) -> None:
  """Rewrite the ArrayRecord shards tfds wrote (zstd per record, its fixed option) without compression.

  Why: reading is the input pipeline's largest stage, and ECG samples barely compress (LUDB: 22.5 MB with zstd,
  24.2 MB without, +7 %), while decompressing every 120 kB example on read cost about 1.5-2.5x the uncompressed
  read here. The files stay ordinary ArrayRecord files (the reader takes either), with the same records in the
  same order.
  """
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
  for shard in sorted(folder.glob("*.array_record-*")):
    reader = ArrayRecordReader(os.fspath(shard))
    try:
      if "uncompressed" in reader.writer_options_string():
        continue
      tmp = shard.with_name(shard.name + ".uncompressed")
      writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1,uncompressed")
      n = reader.num_records()
      for lo in range(0, n, 256):  # bounded memory: 256 examples at a time
        for record in reader.read(lo, min(lo + 256, n)):
          writer.write(record)
      writer.close()
    finally:
      reader.close()
    os.replace(os.fspath(tmp), os.fspath(shard))


def write_side_files(folder: epath.Path, contract: Contract, label_names: Sequence[str], stats: BuildStats) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "contract.json").write_text(contract.to_json() + "\n")
  (folder / "labels.json").write_text(json.dumps(list(label_names), indent=1) + "\n")
  _write_quarantine(folder / "quarantine.jsonl", stats.errors)
  (folder / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in stats.index))
  (folder / "summary.json").write_text(json.dumps(stats.to_dict(), indent=2, sort_keys=True) + "\n")


def write_failed_report(dataset_folder: str | os.PathLike[str], stats: BuildStats) -> str | None:
  """Keep the quarantine report of a build that failed (as `<data_dir>/<name>/FAILED_REPORT`); its path, or None
  when nothing was quarantined."""
  if not stats.errors:
    return None
  folder = epath.Path(os.path.dirname(os.fspath(dataset_folder)))
  folder.mkdir(parents=True, exist_ok=True)
  _write_quarantine(folder / FAILED_REPORT, stats.errors)
  return os.fspath(folder / FAILED_REPORT)


def staging_prefix(name: str) -> str:
  """The prefix of the hidden folder `stmem prepare` builds dataset `name` in: it names this host and process, so
  that a later build can tell the folder of a killed build (`clear_interrupted`) from that of a running one."""
  return f".{name}.building-{socket.gethostname()}-{os.getpid()}-"


def _aside(final: str) -> str:
  return f"{final}.replaced-{socket.gethostname()}-{os.getpid()}"


def _ended(host: str, pid: str) -> bool:
  """Whether process `pid` of `host` has ended; a process of another host is never judged (False)."""
  if host != socket.gethostname():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, ValueError, OverflowError):
    return False
  return False


def clear_interrupted(data_dir: str | os.PathLike[str], name: str) -> list[str]:
  """Undo what a killed `stmem prepare NAME` (SIGKILL, a lost node: no `finally` ran) left in `data_dir`; returns
  one line per thing done. Its staging folder is deleted; a dataset it had moved aside (`swap_into_place`) is put
  back when the new one never moved in, and deleted when it had. Only folders of this host's processes that have
  ended are touched: a build running beside this one keeps its own."""
  import re
  import shutil
  data_dir = os.fspath(data_dir)
  done = []
  staging = re.compile(rf"\.{re.escape(name)}\.building-(.+)-(\d+)-[^-]*")
  for entry in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
    m = staging.fullmatch(entry)
    if m and _ended(m[1], m[2]):
      shutil.rmtree(os.path.join(data_dir, entry), ignore_errors=True)
      done.append(f"removed {os.path.join(data_dir, entry)}, the staging folder of an interrupted build")
  dataset = os.path.join(data_dir, name)
  for entry in sorted(os.listdir(dataset)) if os.path.isdir(dataset) else []:
    m = re.fullmatch(r"(.+)\.replaced-(.+)-(\d+)", entry)
    if not (m and _ended(m[2], m[3])):
      continue
    aside, final = os.path.join(dataset, entry), os.path.join(dataset, m[1])
    if os.path.exists(final):
      shutil.rmtree(aside, ignore_errors=True)
      done.append(f"removed {aside}, a dataset an interrupted build had replaced")
    else:
      os.rename(aside, final)
      done.append(f"put {final} back: an interrupted build had moved it aside")
  return done


def swap_into_place(built: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
  """Move a finished dataset folder to `final`, replacing what is there only once the new one is complete.

  Two renames on one file system: the old folder steps aside, the new one moves in, then the old one is deleted.
  If the second rename fails the old folder is put back; a process killed between them leaves the old folder aside,
  where readers still find it (`prepared_dir`) and the next build puts it back (`clear_interrupted`). Also removes a
  failed build's report beside `final`.
  """
  built, final = os.fspath(built), os.fspath(final)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  aside = None
  if os.path.exists(final):
    aside = _aside(final)
    os.rename(final, aside)
  try:
    os.rename(built, final)
  except BaseException:
    if aside is not None:
      os.rename(aside, final)
    raise
  if aside is not None:
    import shutil
    shutil.rmtree(aside, ignore_errors=True)
  failed = os.path.join(os.path.dirname(final), FAILED_REPORT)
  if os.path.exists(failed):
    os.remove(failed)


def _write_quarantine(path: epath.Path, errors: Sequence[RecordError]) -> None:
  """Through the shared Quarantine writer, so that every report has one format."""
  with Quarantine(str(path)) as q:
    for e in errors:
      q.add(e)


# ------------------------------------------------------------------------------------------------ prepared folders


def prepared_dir(path: str | os.PathLike[str], name: str | None = None) -> epath.Path:
  """The versioned folder of a prepared dataset from any of: that folder, `<data_dir>/<name>`, `<data_dir>` holding
  exactly one dataset. Why: users remember the --data_dir they passed, not tfds's `<name>/<version>` layout.
  """
  p = epath.Path(path)
  if name:
    p = p / name
  if (p / "dataset_info.json").exists():
    return p
  versions = sorted((c for c in p.iterdir() if c.is_dir() and (c / "dataset_info.json").exists()),
                    key=lambda c: tfds.core.Version(c.name) if _is_version(c.name) else tfds.core.Version("0.0.0"))
  if versions:
    return versions[-1]
  # Hidden folders are staging folders of builds, running or interrupted: never a dataset to read.
  found = [c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")] if p.exists() else []
  nested = [v for c in found for v in [_try_prepared(c)] if v is not None]
  if len(nested) == 1:
    return nested[0]
  if not nested:
    raise FileNotFoundError(f"no prepared dataset under {p} (run `stmem prepare NAME --data_dir ...` first)")
  raise ValueError(f"{p} holds several prepared datasets {[str(n) for n in nested]}: name one")


def _is_version(s: str) -> bool:
  try:
    tfds.core.Version(s)
    return True
  except ValueError:
    return False


def _try_prepared(p: epath.Path) -> epath.Path | None:
  try:
    return prepared_dir(p) if any(c.is_dir() for c in p.iterdir()) or (p / "dataset_info.json").exists() else None
  except (FileNotFoundError, ValueError):
    return None


def load_contract(folder: str | os.PathLike[str]) -> Contract:
  path = prepared_dir(folder) / "contract.json"
  return contract_lib.from_bytes(path.read_bytes(), str(path))


def load_label_names(folder: str | os.PathLike[str]) -> list[str]:
  p = prepared_dir(folder) / "labels.json"
  return json.loads(p.read_text()) if p.exists() else []


def load_index(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """records.jsonl of a prepared folder: one dict per written record."""
  p = prepared_dir(folder) / "records.jsonl"
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
