"""Encoder features per ECG on this CPU: the exported ONNX graph in onnxruntime beside `stmem embed`'s jitted feature
function and, given a checkout of their code, the ST-MEM authors' PyTorch encoder, in one run, on the same machine.

  python -m benchmarks.onnx_embed                                   # tiny and base, batch 8, 5 timed runs each
  python -m benchmarks.onnx_embed --variants tiny --repeats 7 --reference_repo ../ST-MEM --output onnx_embed.json

Prints one JSON object (and writes it to --output). Each variant is a random initialisation (speed does not depend
on the weights); all three implementations run those same weights (the reference gets them under its own names,
`stmem.programs.export.encoder_reference_names`) on one batch of `--batch` preprocessed 12-lead ECGs
(synthetic, band-passed and z-scored as the default contract says), after one warm-up call. Timed: the forward pass
alone, `seconds_per_ecg` = median batch time / batch. stmem and onnxruntime compute pooled, per-lead and per-patch
features (the graph always gives all three; `stmem embed --per_patch` asks for the same); the reference computes
its pooled features only. `max_abs_diff` compares the pooled features with stmem's.

`preprocessing` times the per-crop work on the same batch (band-pass and z-score of (batch, 12, 2250) crops): the
example script's numpy version (launch/embed_onnx.py) beside stmem's input pipeline (`transforms.finish_crop`).

The reference implementation is not part of stmem (its code is CC BY-NC 4.0): clone it yourself
(`git clone https://github.com/bakqui/ST-MEM`) and pass the folder; it needs torch (`pip install 'stmem[torch]'`)
and einops. Without it, `reference` says it is missing and how to get it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import machine, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  fn()  # warm-up (and compilation)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def batch_of_ecgs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(signal (batch, 12, 2250) float32 preprocessed as the default contract says, raw crops float32)."""
  from data_pipelines import transforms
  from data_pipelines.contract import Contract
  from stmem import synthetic
  contract = Contract()
  rng = np.random.default_rng(seed)
  rhythms = synthetic.RHYTHMS
  raw = np.stack([synthetic.simulate(rhythms[i % len(rhythms)], contract.record_samples / contract.fs, contract.fs,
                                     rng)[0][:, :contract.window] for i in range(batch)])
  return transforms.finish_crop(raw.astype(np.float32), contract), raw.astype(np.float32)


def _example_script():
  spec = importlib.util.spec_from_file_location("embed_onnx", ROOT / "launch" / "embed_onnx.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def preprocessing(raw: np.ndarray, repeats: int) -> dict[str, Any]:
  from data_pipelines import transforms
  from data_pipelines.contract import Contract
  from stmem import deploy
  contract = Contract()
  script = _example_script()
  pre = json.loads(json.dumps(deploy.preprocessing(contract)))
  mask = np.ones(raw.shape[:2], bool)
  numpy_s, numpy_times = _median_time(lambda: script.zscore(script.bandpass(raw, pre), mask), repeats)
  stmem_s, stmem_times = _median_time(lambda: transforms.finish_crop(raw, contract, mask), repeats)
  return {"batch": len(raw), "example_script_numpy": {"seconds_per_ecg": numpy_s / len(raw), "times": numpy_times},
          "stmem_pipeline_scipy": {"seconds_per_ecg": stmem_s / len(raw), "times": stmem_times}}


def _stmem(encoder, signal, ids, mask, repeats):
  import jax
  from flax import nnx

  from stmem import features
  # What `stmem embed --per_patch` jits: features.feature_fn with the parameters as an argument.
  fn = features.feature_fn(per_lead=True, per_patch=True)
  graphdef, state = nnx.split(encoder)
  t = time.perf_counter()
  jax.block_until_ready(fn(graphdef, state, signal, ids, mask))
  compile_s = time.perf_counter() - t
  s, times = _median_time(lambda: jax.block_until_ready(fn(graphdef, state, signal, ids, mask)), repeats)
  pooled = np.asarray(fn(graphdef, state, signal, ids, mask)["pooled"])
  return {"seconds_per_ecg": s / len(signal), "times": times, "first_call_seconds": compile_s}, pooled


def _onnxruntime(encoder, signal, ids, mask, repeats, folder):
  import onnxruntime as ort

  from data_pipelines.contract import Contract
  from stmem import deploy
  t = time.perf_counter()
  path = deploy.to_onnx(encoder, Contract(), pathlib.Path(folder) / "model.onnx", {})
  export_s = time.perf_counter() - t
  t = time.perf_counter()
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  session_s = time.perf_counter() - t
  feed = {"signal": signal, "lead_ids": ids, "lead_mask": mask}
  s, times = _median_time(lambda: session.run(None, feed), repeats)
  pooled = session.run(["pooled"], feed)[0]
  return {"seconds_per_ecg": s / len(signal), "times": times, "export_seconds": export_s,
          "session_seconds": session_s, "file_bytes": path.stat().st_size}, pooled


def _reference(encoder, signal, repeats, repo: str | None):
  if not repo:
    return {"missing": reference.HOW_TO_GET}, None
  why = reference.problem(repo)
  if why:
    return {"missing": why}, None
  try:
    import torch
    model = reference.encoder(encoder.cfg, repo)
  except ImportError as e:
    return {"missing": f"cannot import the reference ({e}); {reference.HOW_TO_GET}"}, None
  from stmem.programs.export import encoder_reference_names
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in encoder_reference_names(encoder).items()}, strict=True)
  model.eval()
  x = torch.from_numpy(signal)

  def forward():
    with torch.no_grad():
      return model.forward_encoding(x)

  s, times = _median_time(forward, repeats)
  return {"seconds_per_ecg": s / len(signal), "times": times, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "outputs": "pooled only"}, forward().numpy()


def run(variants=("tiny", "base"), batch: int = 8, repeats: int = 5, reference_repo: str | None = None
        ) -> dict[str, Any]:
  import jax
  import onnxruntime as ort
  from flax import nnx

  from stmem.models import encoder_model, model_config
  out: dict[str, Any] = {
    "benchmark": "onnx_embed",
    "machine": {**machine.describe(), "jax": jax.__version__, "onnxruntime": ort.__version__,
                "backend": jax.default_backend()},
    "settings": {"variants": list(variants), "batch": batch, "repeats": repeats, "leads": 12,
                 "reference_repo": reference_repo},
    "results": [],
  }
  signal, raw = batch_of_ecgs(batch)
  ids = np.tile(np.arange(12, dtype=np.int32), (batch, 1))
  mask = np.ones((batch, 12), bool)
  for variant in variants:
    encoder = encoder_model(model_config(variant), rngs=nnx.Rngs(0))
    row: dict[str, Any] = {"variant": variant,
                           "parameters": int(sum(np.size(v) for v in jax.tree.leaves(nnx.state(encoder, nnx.Param))))}
    row["stmem"], pooled = _stmem(encoder, signal, ids, mask, repeats)
    with tempfile.TemporaryDirectory() as folder:
      row["onnxruntime"], onnx_pooled = _onnxruntime(encoder, signal, ids, mask, repeats, folder)
    row["reference"], ref_pooled = _reference(encoder, signal, repeats, reference_repo)
    row["max_abs_diff"] = {"onnxruntime_vs_stmem": float(np.abs(onnx_pooled - pooled).max())}
    if ref_pooled is not None:
      row["max_abs_diff"]["reference_vs_stmem"] = float(np.abs(ref_pooled - pooled).max())
    row["onnxruntime_over_stmem_time"] = row["onnxruntime"]["seconds_per_ecg"] / row["stmem"]["seconds_per_ecg"]
    out["results"].append(row)
  out["preprocessing"] = preprocessing(raw, repeats)
  out["machine"]["loadavg_end"] = list(os.getloadavg())
  out["summary"] = {r["variant"]: {k: r[k].get("seconds_per_ecg") for k in ("onnxruntime", "stmem", "reference")}
                    for r in out["results"]}
  return out


def main(argv=None) -> int:
  from stmem import platforms
  platforms.apply()  # as `stmem` does: on a host without TPU chips, JAX on the CPU without loading libtpu
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="tiny,base", help="comma-separated model variants (tiny, small, base)")
  parser.add_argument("--batch", type=int, default=8, help="ECGs per forward pass")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up; the median is reported")
  parser.add_argument("--reference_repo", default=None, help="a checkout of the ST-MEM authors' code")
  parser.add_argument("--output", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  result = run(tuple(v for v in args.variants.split(",") if v), args.batch, args.repeats, args.reference_repo)
  result["command"] = "python -m benchmarks.onnx_embed " + " ".join(argv if argv is not None else sys.argv[1:])
  text = json.dumps(result, indent=2)
  print(text)
  if args.output:
    pathlib.Path(args.output).write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
