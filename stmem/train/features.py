"""Shared by the probe, fine-tune and embed programs: loading an encoder, checking (and adapting) the data's
preprocessing contract against the checkpoint's, and frozen-encoder features over an evaluation pipeline.

Features of a record are the encoder's pooled features averaged over its evaluation crops (the reference averages
predictions over 3 crops at 0, 0.5 and 1 s; averaging the features is the linear-probe equivalent). With
`last_blocks=k` they are instead the mean over the last k blocks of each block's pooled patch tokens, each put
through the final LayerNorm (k=1 is exactly the usual pooled feature).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import leads as leads_lib
from data_pipelines import contract as contract_lib
from data_pipelines.contract import Contract

EVAL_CROPS = 3


# ------------------------------------------------------------------------------------------------ encoders


@dataclasses.dataclass
class Loaded:
  """An encoder and what is known about it: its contract, checkpoint meta and parameter fingerprint."""
  encoder: Any
  contract: Contract
  meta: dict
  fingerprint: str
  name: str


def load_encoder(checkpoint: str | os.PathLike[str]) -> Loaded:
  from stmem import checkpoint as ckpt_lib
  encoder, meta = ckpt_lib.load_model(checkpoint, encoder_only=True)
  params = nnx.state(encoder, nnx.Param).to_pure_dict()
  name = os.path.basename(os.path.normpath(os.fspath(checkpoint))) or "checkpoint"
  return Loaded(encoder, ckpt_lib.contract_from_meta(meta), meta, ckpt_lib.fingerprint(params), name)


def random_encoder(like: Loaded | Any, seed: int = 1234, contract: Contract | None = None) -> Loaded:
  """The same architecture with a fresh random initialisation (the baseline every probe report carries)."""
  from stmem import checkpoint as ckpt_lib
  from stmem.models import ModelConfig, encoder_model
  cfg = like.encoder.cfg if isinstance(like, Loaded) else like
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"expected a Loaded encoder or a ModelConfig, got {type(like)}")
  encoder = encoder_model(cfg, rngs=nnx.Rngs(seed))
  params = nnx.state(encoder, nnx.Param).to_pure_dict()
  contract = contract or (like.contract if isinstance(like, Loaded) else Contract())
  return Loaded(encoder, contract, {"origin": f"random init (seed {seed})"}, ckpt_lib.fingerprint(params),
                "random init")


# ------------------------------------------------------------------------------------------------ the contract


class ResampledSource:
  """A source whose examples are FFT-resampled from `fs_in` to `fs_out` on read (an adaptable contract mismatch)."""

  def __init__(self, source: Any, fs_in: float, fs_out: float, record_samples: int):
    self.source, self.fs_in, self.fs_out, self.record_samples = source, fs_in, fs_out, record_samples

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    from data_pipelines import transforms
    ex = dict(self.source[index])
    ex["signal"] = transforms.resample_to(np.asarray(ex["signal"], np.float32), self.record_samples)
    return ex


def eval_starts(record_samples: int, window: int, crops: int = EVAL_CROPS) -> tuple[int, ...]:
  """Crop starts spread evenly over a record: (0, 125, 250) for the reference's 2500-sample records and 2250 window."""
  if window > record_samples:
    raise contract_lib.ContractMismatch(f"records of {record_samples} samples are shorter than the checkpoint's "
                                        f"window of {window}")
  return tuple(int(round(s)) for s in np.linspace(0, record_samples - window, crops))


def adapt(checkpoint: Contract, data: Contract, source: Any, lead_set: str | Sequence[str] | None = None
          ) -> tuple[Any, Contract, list[str]]:
  """Check the data's contract against the checkpoint's; return (source, pipeline contract, adaptations made).

  Adapted: the sampling rate (resampled on read), the lead order (slots are filled by lead name), the record length
  (the checkpoint's window is cropped from it), where the band-pass happens (the data is filtered exactly once).
  Refused, with a message naming the field: units, filters, normalisation, patch size, or a lead the checkpoint
  never saw. Raises `ContractMismatch`.
  """
  notes = contract_lib.check(checkpoint, data)
  if checkpoint.patch_size != data.patch_size or checkpoint.window % checkpoint.patch_size:
    raise contract_lib.ContractMismatch(f"patch_size: data {data.patch_size} vs checkpoint {checkpoint.patch_size}")
  if lead_set is not None:
    wanted = leads_lib.parse_lead_set(lead_set)
    unseen = [n for n in wanted if n not in {leads_lib.canonical_name(x) for x in checkpoint.leads}]
    if unseen:
      raise contract_lib.ContractMismatch(f"leads: lead set {lead_set!r} asks for {unseen}, which the checkpoint "
                                          f"never saw (checkpoint leads: {list(checkpoint.leads)})")
  record_samples = data.record_samples
  if data.fs != checkpoint.fs:
    record_samples = int(round(data.record_samples * checkpoint.fs / data.fs))
    source = ResampledSource(source, data.fs, checkpoint.fs, record_samples)
  # The pipeline crops the checkpoint's window at its rate; filters and z-scores as the data's own stage says (an
  # offline-filtered dataset is not filtered twice, a per-crop one is filtered per crop).
  pipeline = dataclasses.replace(data, fs=checkpoint.fs, window=checkpoint.window, record_samples=record_samples,
                                 patch_size=checkpoint.patch_size)
  eval_starts(record_samples, checkpoint.window)
  return source, pipeline, notes


# ------------------------------------------------------------------------------------------------ raw records


def records_to_arrays(records: Sequence[Any], contract: Contract) -> dict[str, np.ndarray]:
  """Records (`data_pipelines.record.Record`) -> arrays for `stmem.data.ArraySource`, preprocessed offline to
  `contract` (FFT-resampled to its rate, band-passed here only if its filter stage is "offline").

  One example per record: its first window of `contract.record_samples` samples (the first 10 s); the evaluation
  crops are cut from that. Leads go to their canonical slots; absent leads are zero rows, False in `lead_mask`.
  Records shorter than one window are skipped and listed in `skipped`.
  """
  from data_pipelines import transforms
  signals, masks, rids, pids, skipped = [], [], [], [], []
  order = [leads_lib.LEAD_ID[leads_lib.canonical_name(n)] for n in contract.leads]
  for rec in records:
    w = transforms.prepare_record_windows(rec, contract)
    if not len(w):
      skipped.append(rec.record_id)
      continue
    sig = np.zeros((leads_lib.NUM_LEADS, contract.record_samples), np.float32)
    mask = np.zeros((leads_lib.NUM_LEADS,), bool)
    sig[order] = w[0]
    mask[order] = transforms.lead_mask(rec, contract)
    signals.append(sig)
    masks.append(mask)
    rids.append(rec.record_id)
    pids.append(rec.patient_id or rec.record_id)
  n = len(signals)
  return {"signal": np.stack(signals) if n else np.zeros((0, leads_lib.NUM_LEADS, contract.record_samples), np.float32),
          "lead_mask": np.stack(masks) if n else np.zeros((0, leads_lib.NUM_LEADS), bool),
          "record_id": np.asarray(rids, dtype=str), "patient_id": np.asarray(pids, dtype=str),
          "skipped": np.asarray(skipped, dtype=str)}


def canonical_contract(contract: Contract) -> Contract:
  """The contract of arrays made by `records_to_arrays`: the same, with the leads in canonical slots."""
  return dataclasses.replace(contract, leads=leads_lib.LEADS)


# ------------------------------------------------------------------------------------------------ features


def _pool_tokens(encoder, tokens: jax.Array, lead_mask: jax.Array) -> jax.Array:
  """(B, L, S, D) block output (SEPs included) -> (B, D): mean over present leads' patch tokens, final LayerNorm."""
  patch = tokens[:, :, 1:-1].astype(jnp.float32)
  present = lead_mask.astype(jnp.float32)
  summed = jnp.einsum("blnd,bl->bd", patch, present)
  return encoder.norm(summed / (jnp.maximum(present.sum(axis=1, keepdims=True), 1.0) * patch.shape[2]))


def feature_fn(last_blocks: int = 0, per_lead: bool = False, per_patch: bool = False):
  """A jitted pure function (graphdef, state, signal, lead_ids, lead_mask) -> dict of features.

  Parameters are an argument, not a constant: encoders of one architecture (a checkpoint and its random twin)
  share one compilation.
  """
  blocks = tuple(range(-last_blocks, 0)) if last_blocks > 0 else ()

  @jax.jit
  def fn(graphdef, state, signal, lead_ids, lead_mask):
    encoder = nnx.merge(graphdef, state)
    f = encoder.features(signal, lead_ids, lead_mask, blocks=blocks)
    out = {"pooled": f["pooled"]}
    if blocks:
      out["pooled"] = jnp.mean(jnp.stack([_pool_tokens(encoder, t, lead_mask) for t in f["blocks"].values()]), axis=0)
    if per_lead:
      out["per_lead"] = f["per_lead"]
    if per_patch:
      out["tokens"] = f["tokens"]
    return out

  return fn


def batches_of(source: Any, contract: Contract, *, lead_set: Any, batch_size: int, crops: int = EVAL_CROPS):
  """The evaluation pipeline (`stmem.data`) over a source: every record once, in order, `crops` crops each."""
  from stmem import data
  starts = eval_starts(contract.record_samples, contract.window, crops)
  return data.make_iterator(source, contract, batch_size=batch_size, train=False, lead_set=lead_set,
                            eval_starts=starts, process_index=0, process_count=1)


def extract(encoders: Mapping[str, Loaded | Any], source: Any, contract: Contract, *, lead_set: Any = None,
            batch_size: int = 32, last_blocks: int = 0, crops: int = EVAL_CROPS, progress: bool = False
            ) -> dict[str, Any]:
  """Features of every record of `source`, in source order, for each encoder (one data pass feeds them all).

  Returns {"features": {name: (N, D) float32}, "labels": (N, C), "record_id": (N,) str, "patient_id": (N,) str}.
  Features are averaged over the `crops` evaluation crops of each record.
  """
  fn = feature_fn(last_blocks)
  split = {name: nnx.split(e.encoder if isinstance(e, Loaded) else e) for name, e in encoders.items()}
  feats: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
  labels, rids, pids = [], [], []
  it = batches_of(source, contract, lead_set=lead_set, batch_size=batch_size, crops=crops)
  if progress:
    from tqdm import tqdm
    it = tqdm(it, total=-(-len(source) // batch_size), desc="features", unit="batch")
  for batch in it:
    valid = batch["valid"].reshape(-1, crops)[:, 0]
    for name, (graphdef, state) in split.items():
      out = fn(graphdef, state, batch["signal"], batch["lead_ids"], batch["lead_mask"])["pooled"]
      out = np.asarray(out).reshape(-1, crops, out.shape[-1]).mean(axis=1)
      feats[name].append(out[valid])
    labels.append(batch["labels"][::crops][valid])
    rids += [r.decode() for r in batch["record_id"][::crops][valid]]
    pids += [p.decode() for p in batch["patient_id"][::crops][valid]]
  n_labels = labels[0].shape[1] if labels else 0
  return {"features": {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in feats.items()},
          "labels": np.concatenate(labels) if labels else np.zeros((0, n_labels), np.float32),
          "record_id": np.asarray(rids, dtype=str), "patient_id": np.asarray(pids, dtype=str)}


def embed_arrays(encoder: Any, signal: np.ndarray, lead_ids: np.ndarray, lead_mask: np.ndarray | None = None,
                 batch_size: int = 32, per_patch: bool = False) -> dict[str, np.ndarray]:
  """Embeddings of model-ready inputs (signal (N, L, window), already preprocessed), without masking.

  Returns pooled (N, D), per_lead (N, L, D) and, with `per_patch`, per_patch (N, L, patches, D): exactly
  `encoder.features(...)`, computed in batches (the last one padded, the padding dropped).
  """
  signal = np.asarray(signal, np.float32)
  n = signal.shape[0]
  lead_ids = np.broadcast_to(np.asarray(lead_ids, np.int32), signal.shape[:2])
  lead_mask = np.ones(signal.shape[:2], bool) if lead_mask is None else np.broadcast_to(lead_mask, signal.shape[:2])
  fn = feature_fn(per_lead=True, per_patch=per_patch)
  graphdef, state = nnx.split(encoder.encoder if isinstance(encoder, Loaded) else encoder)
  parts: dict[str, list[np.ndarray]] = {}
  for a in range(0, n, batch_size):
    b = min(a + batch_size, n)
    pad = batch_size - (b - a)  # one batch shape, one compilation

    def padded(x):
      return np.concatenate([x[a:b], np.repeat(x[b - 1:b], pad, axis=0)]) if pad else x[a:b]

    out = fn(graphdef, state, padded(signal), padded(lead_ids), padded(lead_mask))
    for k, v in out.items():
      parts.setdefault({"tokens": "per_patch"}.get(k, k), []).append(np.asarray(v)[:b - a])
  return {k: np.concatenate(v) for k, v in parts.items()}
