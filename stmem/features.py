"""Shared by the probe, fine-tune and embed programs: loading an encoder, checking (and adapting) the data's
preprocessing contract against the checkpoint's, and frozen-encoder features over an evaluation pipeline.

Where examples come from is not here: programs get them from `stmem.data` (`open_pool`, `task_pools`).

Features of an example are the encoder's pooled features averaged over its evaluation crops (the reference averages
predictions over 3 crops at 0, 0.5 and 1 s; averaging the features is the linear-probe equivalent); evaluation
batches carry the crop axis (B, K, L, T) and `crop_mean` averages over it. With `last_blocks=k` they are instead
the mean over the last k blocks of each block's pooled patch tokens, each put through the final LayerNorm (k=1 is
exactly the usual pooled feature).
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

from data_pipelines import contract as contract_lib
from data_pipelines import leads as leads_lib
from data_pipelines import transforms
from data_pipelines.contract import Contract


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
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """One batched read of the underlying source, each example resampled (and where its zero padding starts)."""
    from stmem import data
    out = []
    for ex in data.read_many(self.source, indices):
      ex = dict(ex)
      length = np.shape(ex["signal"])[-1]
      ex["signal"] = transforms.resample_to(np.asarray(ex["signal"], np.float32), self.record_samples)
      if "valid_samples" in ex:  # where zero padding starts, at the new rate
        ex["valid_samples"] = int(round(int(ex["valid_samples"]) * self.record_samples / length))
      out.append(ex)
    return out


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
  if checkpoint.window > record_samples:
    raise contract_lib.ContractMismatch(f"records of {record_samples} samples are shorter than the checkpoint's "
                                        f"window of {checkpoint.window}")
  return source, pipeline, notes


# ------------------------------------------------------------------------------------------------ features


def _pool_tokens(encoder, tokens: jax.Array, lead_mask: jax.Array) -> jax.Array:
  """(B, L, S, D) block output (SEPs included) -> (B, D): mean over present leads' patch tokens, final LayerNorm."""
  patch = tokens[:, :, 1:-1].astype(jnp.float32)
  present = lead_mask.astype(jnp.float32)
  summed = jnp.einsum("blnd,bl->bd", patch, present)
  return encoder.norm(summed / (jnp.maximum(present.sum(axis=1, keepdims=True), 1.0) * patch.shape[2]))


def crop_mean(fn):
  """`fn(signal (B, L, T), lead_ids, lead_mask) -> pytree of (B, ...)` as a function of evaluation batches
  (signal (B, K, L, T)): the K crops of each example go through `fn` together and their outputs are averaged.

  Traceable (use it inside a jit); the crop axis is folded into the batch here, once, so no program regroups rows.
  """

  def over_crops(signal, lead_ids, lead_mask):
    b, k = signal.shape[:2]
    out = fn(signal.reshape(b * k, *signal.shape[2:]), jnp.repeat(lead_ids, k, axis=0),
             jnp.repeat(lead_mask, k, axis=0))
    return jax.tree.map(lambda x: jnp.mean(x.reshape(b, k, *x.shape[1:]).astype(jnp.float32), axis=1), out)

  return over_crops


def feature_fn(last_blocks: int = 0, per_lead: bool = False, per_patch: bool = False):
  """A jitted pure function (graphdef, state, signal, lead_ids, lead_mask) -> dict of features.

  signal (B, L, T) gives features per ECG; an evaluation batch's (B, K, L, T) gives them averaged over the K crops.
  Parameters are an argument, not a constant: encoders of one architecture (a checkpoint and its random twin)
  share one compilation.
  """
  blocks = tuple(range(-last_blocks, 0)) if last_blocks > 0 else ()

  @jax.jit
  def fn(graphdef, state, signal, lead_ids, lead_mask):
    encoder = nnx.merge(graphdef, state)

    def features(signal, lead_ids, lead_mask):
      f = encoder.features(signal, lead_ids, lead_mask, blocks=blocks)
      out = {"pooled": f["pooled"]}
      if blocks:
        out["pooled"] = jnp.mean(jnp.stack([_pool_tokens(encoder, t, lead_mask) for t in f["blocks"].values()]),
                                 axis=0)
      if per_lead:
        out["per_lead"] = f["per_lead"]
      if per_patch:
        out["tokens"] = f["tokens"]
      return out

    return (crop_mean(features) if signal.ndim == 4 else features)(signal, lead_ids, lead_mask)

  return fn


def eval_batches(source: Any, contract: Contract, *, lead_set: Any, batch_size: int,
                 crops: int = transforms.EVAL_CROPS):
  """The evaluation pipeline (`stmem.data`) over a source: every example once, in order, `crops` crops each."""
  from stmem import data
  starts = transforms.eval_starts(contract.record_samples, contract.window, crops)
  return data.make_iterator(source, contract, batch_size=batch_size, train=False, lead_set=lead_set,
                            eval_starts=starts, process_index=0, process_count=1)


def extract(encoders: Mapping[str, Loaded | Any], source: Any, contract: Contract, *, lead_set: Any = None,
            batch_size: int = 32, last_blocks: int = 0, crops: int = transforms.EVAL_CROPS, progress: bool = False
            ) -> dict[str, Any]:
  """Features of every example of `source`, in source order, for each encoder (one data pass feeds them all).

  Returns {"features": {name: (N, D) float32}, "labels": (N, C), "record_id": (N,) str, "patient_id": (N,) str}.
  Features are averaged over the `crops` evaluation crops of each example.
  """
  fn = feature_fn(last_blocks)
  split = {name: nnx.split(e.encoder if isinstance(e, Loaded) else e) for name, e in encoders.items()}
  feats: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
  labels, rids, pids = [], [], []
  it = eval_batches(source, contract, lead_set=lead_set, batch_size=batch_size, crops=crops)
  if progress:
    from tqdm import tqdm
    it = tqdm(it, total=-(-len(source) // batch_size), desc="features", unit="batch")
  for batch in it:
    valid = batch["valid"]
    for name, (graphdef, state) in split.items():
      out = fn(graphdef, state, batch["signal"], batch["lead_ids"], batch["lead_mask"])["pooled"]
      feats[name].append(np.asarray(out)[valid])
    labels.append(batch["labels"][valid])
    rids += [r.decode() for r in batch["record_id"][valid]]
    pids += [p.decode() for p in batch["patient_id"][valid]]
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
