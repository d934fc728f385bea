"""Encoders as graphs that run without JAX: ONNX (through jax2onnx) and serialized StableHLO (`jax.export`).

Both are the function `stmem embed` runs (`stmem.features.feature_fn`) with the encoder's parameters baked in as
constants:

  inputs   signal     float32 (batch, leads, window)   each ECG preprocessed as the checkpoint's contract says
           lead_ids   int32   (batch, leads)           canonical id of the lead in each slot (0 = I ... 11 = V6)
           lead_mask  bool    (batch, leads)           False for a slot the ECG lacks (its signal row is zeros)
  outputs  pooled     float32 (batch, width)
           per_lead   float32 (batch, leads, width)
           per_patch  float32 (batch, leads, patches, width)     (MTAE: (batch, 1, 30, width); MLAE: (batch, 12, 1, width))

`batch` is dynamic, and so is `leads` for an ST-MEM encoder (MTAE and MLAE encoders take exactly the 12 leads).
Preprocessing (resampling, band-pass, z-score) is not in the graph: what it is travels in the metadata
(`metadata`), with the filters' coefficients, so that a runtime without scipy can reproduce it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from data_pipelines import leads as leads_lib
from data_pipelines import transforms
from data_pipelines.contract import Contract

INPUTS = ("signal", "lead_ids", "lead_mask")
OUTPUTS = ("pooled", "per_lead", "per_patch")
FORMAT = "stmem-graph-1"

# The compute dtype of every exported graph. A checkpoint trained with bfloat16 products is exported computing in
# float32: CPU runtimes (onnxruntime among them) have no bfloat16 matrix product, and float32 is the exact form of
# what bfloat16 approximates.
COMPUTE_DTYPE = "float32"


def graph_encoder(encoder: Any, *, unroll: bool = False) -> Any:
  """The encoder to export: the same parameters, computing in float32 with the portable attention.

  `unroll`: the blocks as a flat sequence instead of a loop (`ModelConfig.scan_blocks`): the same function; a flat
  ONNX graph needs no Loop operator and lets a runtime optimise across blocks.
  """
  from flax import nnx

  from stmem.models import encoder_model
  cfg = encoder.cfg.replace(dtype=COMPUTE_DTYPE, attention="xla", remat="none",
                            scan_blocks=False if unroll else encoder.cfg.scan_blocks)
  if cfg == encoder.cfg:
    return encoder
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: encoder_model(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(encoder))


def encoder_function(encoder: Any) -> Callable:
  """fn(signal, lead_ids, lead_mask) -> (pooled, per_lead, per_patch): `stmem embed`'s feature function with the
  encoder's parameters closed over."""
  from flax import nnx

  from stmem import features
  fn = features.feature_fn(per_lead=True, per_patch=True)
  graphdef, state = nnx.split(encoder)

  def embed(signal, lead_ids, lead_mask):
    out = fn(graphdef, state, signal, lead_ids, lead_mask)
    return out["pooled"], out["per_lead"], out["tokens"]

  return embed


def input_specs(encoder: Any, window: int) -> tuple[Any, Any, Any]:
  """The three inputs as abstract arrays, batch (and for ST-MEM the lead count) symbolic."""
  import jax
  import jax.numpy as jnp
  from jax import export as jax_export
  if encoder.cfg.method == "stmem":
    batch, leads = jax_export.symbolic_shape("batch, leads")
  else:
    batch, = jax_export.symbolic_shape("batch")
    leads = leads_lib.NUM_LEADS
  return (jax.ShapeDtypeStruct((batch, leads, window), jnp.float32),
          jax.ShapeDtypeStruct((batch, leads), jnp.int32),
          jax.ShapeDtypeStruct((batch, leads), jnp.bool_))


# ------------------------------------------------------------------------------------------------ metadata


def preprocessing(contract: Contract) -> dict[str, Any]:
  """What a runtime must do to a record before the graph, as numbers: the band-pass's second-order sections and
  their initial states (`scipy.signal.butter(..., output="sos")`, `sosfilt_zi`, applied forward and backward as
  `sosfiltfilt` does), and the evaluation crop starts."""
  import scipy.signal

  def sections(hz, btype):
    if not hz:
      return None
    sos = scipy.signal.butter(contract.filter_order, float(hz), btype=btype, fs=float(contract.fs), output="sos")
    return {"sos": sos.tolist(), "zi": scipy.signal.sosfilt_zi(sos).tolist()}

  return {
    "steps": ["skip a record holding NaN or inf; a constant lead is absent",
              "cut each record into windows of record_samples / fs seconds at its own rate",
              "FFT-resample each window to record_samples (scipy.signal.resample)",
              "band-pass once per window if filter_stage is 'offline'", "put leads in slots; absent slots are zeros",
              "cut crops of `window` samples at crop_starts ([0] alone: the first crop)",
              "band-pass each crop if filter_stage is 'per_crop' (float64: high-pass then low-pass, each zero phase "
              "as scipy.signal.sosfiltfilt with its default odd padding)",
              "z-score each ECG over its present slots (one mean and std over leads and time; absent slots stay 0)",
              "features of several crops of one window are averaged"],
    "highpass": sections(contract.highpass_hz, "highpass"),
    "lowpass": sections(contract.lowpass_hz, "lowpass"),
    "crop_starts": list(transforms.eval_starts(contract.record_samples, contract.window)),
  }


def metadata(encoder: Any, contract: Contract, meta: dict, fingerprint: str, source: dict) -> dict[str, Any]:
  """The description every graph carries (ONNX metadata_props, the StableHLO sidecar, config.json)."""
  cfg = encoder.cfg
  lead_dim = "leads" if cfg.method == "stmem" else leads_lib.NUM_LEADS
  # ST-MEM's tokens are (leads, patches); MTAE's time tokens span every lead, MLAE's lead tokens all of time.
  tokens = {"stmem": [lead_dim, cfg.num_patches], "mtae": [1, cfg.num_patches], "mlae": [leads_lib.NUM_LEADS, 1]}
  return {
    "format": FORMAT,
    "producer": "stmem export",
    "fingerprint": fingerprint,
    "contract": contract.to_dict(),
    "model": dict(meta["model"]),
    "compute_dtype": COMPUTE_DTYPE,
    "inputs": [
      {"name": "signal", "dtype": "float32", "shape": ["batch", lead_dim, contract.window],
       "meaning": "ECGs preprocessed as `contract` and `preprocessing` say, one row per lead slot"},
      {"name": "lead_ids", "dtype": "int32", "shape": ["batch", lead_dim],
       "meaning": "canonical id of each slot's lead (see lead_ids)"},
      {"name": "lead_mask", "dtype": "bool", "shape": ["batch", lead_dim],
       "meaning": "True where the ECG has the slot's lead; an absent slot's signal row is zeros"}],
    "outputs": [
      {"name": "pooled", "dtype": "float32", "shape": ["batch", cfg.width],
       "meaning": "mean of the present leads' patch tokens after the last block, then the final LayerNorm"},
      {"name": "per_lead", "dtype": "float32", "shape": ["batch", lead_dim, cfg.width],
       "meaning": "each slot's patch tokens averaged, then the final LayerNorm (meaningless for absent slots)"},
      {"name": "per_patch", "dtype": "float32", "shape": ["batch", *tokens[cfg.method], cfg.width],
       "meaning": "every patch token after the final LayerNorm"}],
    "lead_ids": dict(leads_lib.LEAD_ID),
    "preprocessing": preprocessing(contract),
    "source": source,
  }


# ------------------------------------------------------------------------------------------------ ONNX


@contextlib.contextmanager
def _converter_quiet() -> Iterator[None]:
  """jax2onnx's plugin loading and serialisation without their log lines (a warning with a traceback for every
  optional plugin whose library is absent; "value type not known" for values it leaves untyped)."""
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _load_converter_plugins() -> None:
  """jax2onnx imports every plugin it ships on its first conversion; its Equinox plugins build example models as
  they are imported (about 35 s on a 2-core CPU). An stmem encoder uses none of them, so Equinox is hidden while the
  plugins load (its plugins are then skipped) where nothing has imported it yet."""
  try:
    from jax2onnx.plugins import plugin_system
  except ImportError:  # another layout of jax2onnx: it loads its plugins itself, only slower
    return
  hidden = "equinox" not in sys.modules
  if hidden:
    sys.modules["equinox"] = None  # type: ignore[assignment]  # `import equinox` raises ImportError
  try:
    plugin_system.import_all_plugins()
  finally:
    if hidden:
      del sys.modules["equinox"]


def to_onnx(encoder: Any, contract: Contract, path: str | pathlib.Path, meta: dict[str, Any]) -> pathlib.Path:
  """Write the encoder as one ONNX file with `meta` in its metadata_props (`onnx_metadata`); weights over 1.5 GB go
  to `<file>.data` beside it (protobuf's 2 GB limit)."""
  try:
    import jax2onnx
    import onnx_ir as ir
  except ImportError:
    from data_pipelines.errors import UsageError
    raise UsageError("--format onnx needs jax2onnx: pip install 'stmem[deploy]'") from None
  path = pathlib.Path(path)
  encoder = graph_encoder(encoder, unroll=True)
  with _converter_quiet():
    _load_converter_plugins()
    model = jax2onnx.to_onnx(encoder_function(encoder), list(input_specs(encoder, contract.window)),
                             model_name="stmem_encoder", input_names=list(INPUTS), output_names=list(OUTPUTS),
                             return_mode="ir")
  model.producer_name = "stmem"
  model.doc_string = ("ST-MEM ECG encoder exported by `stmem export`: inputs signal, lead_ids, lead_mask; outputs "
                      "pooled, per_lead, per_patch. The stmem_* metadata give the preprocessing contract.")
  model.metadata_props.update(onnx_metadata(meta))
  weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
  external = path.name + ".data" if weights > 1.5e9 else None
  with _converter_quiet():
    ir.save(model, path, external_data=external)
  return path


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
  """`meta` as ONNX metadata_props: `stmem_<key>` -> JSON text, strings included (one rule for every reader: a
  fingerprint of hex digits alone must not read back as a number)."""
  return {f"stmem_{k}": json.dumps(v, sort_keys=True) for k, v in meta.items()}


# ------------------------------------------------------------------------------------------------ StableHLO


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def to_stablehlo(encoder: Any, contract: Contract, path: str | pathlib.Path,
                 platforms: tuple[str, ...] = PLATFORMS) -> pathlib.Path:
  """Write the encoder as `jax.export` serialized bytes (StableHLO with its calling convention), lowered for every
  platform of `platforms`; `jax.export.deserialize(bytearray(data)).call(signal, lead_ids, lead_mask)` runs it."""
  import jax
  from jax import export as jax_export
  encoder = graph_encoder(encoder)
  exported = jax_export.export(jax.jit(encoder_function(encoder)), platforms=platforms)(
    *input_specs(encoder, contract.window))
  path = pathlib.Path(path)
  path.write_bytes(exported.serialize())
  return path


def write_graph(fmt: str, encoder: Any, contract: Contract, folder: pathlib.Path, meta: dict[str, Any]) -> pathlib.Path:
  """The graph file of format `fmt` ("onnx" or "stablehlo") in `folder`; returns its path."""
  if fmt == "onnx":
    return to_onnx(encoder, contract, folder / "model.onnx", meta)
  if fmt == "stablehlo":
    return to_stablehlo(encoder, contract, folder / "model.stablehlo")
  raise ValueError(f"unknown graph format {fmt!r}")
