"""Importing the reference weights (`stmem convert`), exporting encoders (`stmem export`), restoring checkpoints into
any mesh, and loading files without executing code from them.

The reference weights are the fixture's `param/*` arrays (the authors' code, random initialisation), written to a
temporary `.npz` and, when PyTorch is installed, to a `.pth` as `{'model': state_dict}`. PyTorch is an optional extra
(`stmem[torch]`) that CI does not install, so the `.pth` tests skip without it; the `.npz` path covers the same
converter everywhere.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.errors import DataError
from stmem import checkpoint, cli, sharding
from stmem import reference_weights as convert
from data_pipelines.contract import Contract
from stmem.models import Encoder, StMem, model_config
from stmem.programs import convert as convert_prog
from stmem.programs import export as export_prog
from tests.helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4

try:
  import torch
except ImportError:
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is the optional extra stmem[torch]; not installed here")


# ------------------------------------------------------------------------------------------------ helpers


def _params(ref: dict) -> dict[str, np.ndarray]:
  return {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}


def _encoder_names(ref: dict) -> dict[str, np.ndarray]:
  return {k[len("param/encoder."):]: v for k, v in ref.items() if k.startswith("param/encoder.")}


def _stmem(*argv: str) -> int:
  return cli.main([str(a) for a in argv])


def _features(ckpt: pathlib.Path, series: np.ndarray) -> np.ndarray:
  """Pooled 12-lead features of a checkpoint, batch by batch on one device (`tests/helpers.py`'s `embed_arrays`)."""
  from tests.helpers import embed_arrays
  encoder, _ = checkpoint.load_model(ckpt, encoder_only=True)
  b, l, _ = series.shape
  lead_ids = np.tile(np.arange(l, dtype=np.int32), (b, 1))
  lead_mask = np.ones((b, l), bool)
  return np.asarray(embed_arrays(encoder, series, lead_ids, lead_mask, batch_size=2)["pooled"])


def _write_pth(path: pathlib.Path, state: dict[str, np.ndarray]) -> pathlib.Path:
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, "epoch": 799}, path)
  return path


@pytest.fixture(scope="module")
def full_npz(tmp_path_factory, reference_fixture) -> pathlib.Path:
  path = tmp_path_factory.mktemp("ref") / "st_mem_full.npz"
  np.savez(path, **{"param/" + k: v for k, v in _params(reference_fixture).items()})
  return path


@pytest.fixture(scope="module")
def converted_full(tmp_path_factory, full_npz) -> pathlib.Path:
  out = tmp_path_factory.mktemp("ckpt") / "full"
  assert _stmem("convert", "--reference", full_npz, "--out", out) == 0
  return out


# ------------------------------------------------------------------------------------------------ 1. convert


def test_config_is_read_off_the_shapes(reference_fixture):
  cfg, encoder_only = convert_prog.infer_config(_params(reference_fixture))
  assert not encoder_only
  assert cfg == model_config("tiny")
  cfg, encoder_only = convert_prog.infer_config(_encoder_names(reference_fixture))
  assert encoder_only and (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.num_patches) == (128, 2, 2, 75, 30)
  # The published variants, from shapes alone (zero-stride arrays: no memory), with the paper's parameter counts.
  for variant, millions in [("small", 21.3), ("base", 85.2)]:
    abstract = nnx.eval_shape(lambda: Encoder(model_config(variant), rngs=nnx.Rngs(0)))
    flat = {("encoder",) + tuple(p): np.broadcast_to(np.float32(0), v.shape)
            for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    names = convert.to_reference(flat, encoder_only=True)
    cfg, encoder_only = convert_prog.infer_config(names)
    expected = model_config(variant)
    assert encoder_only and all(getattr(cfg, f) == getattr(expected, f) for f in
                                ("width", "depth", "num_heads", "mlp_ratio", "patch_size", "num_patches", "num_lead_ids"))
    assert round(sum(v.size for v in names.values()) / 1e6, 1) == millions


def test_convert_npz_then_embed_gives_the_reference_features(converted_full, reference_fixture):
  meta, _, _ = checkpoint.read_meta(converted_full)
  assert meta["origin"] == "reference:st_mem_full.npz" and meta["encoder_only"] is False
  assert Contract.from_dict(meta["contract"]) == Contract()  # the reference's 250 Hz / 2250 / 75 / 12-lead contract
  assert checkpoint.model_config_from_meta(meta) == model_config("tiny")
  feats = _features(converted_full, reference_fixture["input/series"])
  assert np.abs(feats - reference_fixture["output/encoder_features_12lead"]).max() <= TOL
  # The decoder came along: the pretraining model reproduces the reference's masked reconstruction.
  model, _ = checkpoint.load_model(converted_full)
  out = nnx.jit(lambda m, s, i, n: m(s, i, noise=n))(model, reference_fixture["input/series"],
                                                      np.tile(np.arange(12), (2, 1)), reference_fixture["input/mask_noise"])
  assert abs(float(out["loss"]) - float(reference_fixture["output/pretrain_loss"])) <= TOL


def test_stmem_embed_on_raw_records_gives_the_reference_features(converted_full, reference_fixture, tmp_path):
  """End to end: the fixture's raw 500 Hz LUDB records as WFDB files -> `stmem embed` (the checkpoint's contract:
  FFT resampling, first 2250 samples, band-pass, z-score) -> the reference's pooled features."""
  import wfdb
  names = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
  raw = tmp_path / "raw"
  raw.mkdir()
  for i, sig in enumerate(reference_fixture["prep/raw_500hz"].astype(np.float64)):
    # 32-bit samples at 1 nV resolution: the file holds the fixture's signal, not a 16-bit rounding of it.
    wfdb.wrsamp(f"rec{i + 1}", fs=500, units=["mV"] * 12, sig_name=names, p_signal=sig.T, fmt=["32"] * 12,
                adc_gain=[1e6] * 12, baseline=[0] * 12, write_dir=str(raw))
  out = tmp_path / "emb"
  assert _stmem("embed", "--init_from", converted_full, "--records", raw, "--out", out, "--crops", "first",
                "--batch_size", 2, "--no_progress") == 0
  with np.load(f"{out}.npz", allow_pickle=False) as f:
    assert list(f["record_id"]) == ["rec1", "rec2"]
    assert np.abs(f["pooled"] - reference_fixture["output/encoder_features_12lead"]).max() <= TOL


@needs_torch
def test_convert_pth_encoder_only_with_head(reference_fixture, tmp_path, capsys):
  rng = np.random.default_rng(0)
  head_w, head_b = rng.normal(size=(5, 128)).astype(np.float32), rng.normal(size=5).astype(np.float32)
  state = dict(_encoder_names(reference_fixture), **{"head.weight": head_w, "head.bias": head_b})
  pth = _write_pth(tmp_path / "st_mem_finetuned.pth", state)
  out = tmp_path / "ckpt"
  assert _stmem("convert", "--reference", pth, "--out", out) == 0
  assert json.loads(capsys.readouterr().out)["head_classes"] == 5  # the summary on stdout
  meta, _, _ = checkpoint.read_meta(out)
  assert meta["encoder_only"] is True and meta["reference_head"]["num_classes"] == 5
  head = checkpoint.read_item(out, "head")
  np.testing.assert_array_equal(head["kernel"], head_w.T)
  np.testing.assert_array_equal(head["bias"], head_b)
  feats = _features(out, reference_fixture["input/series"])
  assert np.abs(feats - reference_fixture["output/encoder_features_12lead"]).max() <= TOL
  with pytest.raises(ValueError, match="encoder only"):
    checkpoint.load_model(out)


@needs_torch
def test_convert_full_pth(reference_fixture, tmp_path):
  pth = _write_pth(tmp_path / "st_mem_full.pth", _params(reference_fixture))
  out = tmp_path / "ckpt"
  assert _stmem("convert", "--reference", pth, "--out", out, "--config.model.variant=tiny") == 0
  feats = _features(out, reference_fixture["input/series"])
  assert np.abs(feats - reference_fixture["output/encoder_features_12lead"]).max() <= TOL


def test_unknown_and_missing_names_are_refused_with_their_list(reference_fixture, tmp_path, capsys):
  state = {"param/" + k: v for k, v in _params(reference_fixture).items()}
  state["param/encoder.block0.attn.fn.rotary.freqs"] = np.zeros(4, np.float32)
  del state["param/encoder.block1.ff.norm.bias"], state["param/decoder_head.weight"]
  path = tmp_path / "odd.npz"
  np.savez(path, **state)
  assert _stmem("convert", "--reference", path, "--out", tmp_path / "out") != 0
  err = capsys.readouterr().err
  assert "encoder.block0.attn.fn.rotary.freqs" in err
  assert "encoder.block1.ff.norm.bias" in err and "decoder_head.kernel" in err
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_named_variant_that_does_not_fit_is_refused(full_npz, tmp_path, capsys):
  assert _stmem("convert", "--reference", full_npz, "--out", tmp_path / "out",
                "--config.model.variant=base") != 0
  assert "width: file 128, variant 768" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 2. export


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_export_has_reference_names_config_and_card(converted_full, reference_fixture, tmp_path, fmt):
  out = tmp_path / "export"
  assert _stmem("export", "--init_from", converted_full, "--out", out, "--format", fmt) == 0
  weights = out / f"model.{fmt}"
  if fmt == "safetensors":
    from safetensors.numpy import load_file
    names = load_file(str(weights))
  else:
    with np.load(weights, allow_pickle=False) as f:
      names = {k: f[k] for k in f.files}
  # The authors' encoder-only names, bit for bit the tensors they came from.
  expected = _encoder_names(reference_fixture)
  assert set(names) == set(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(names[k], v)
  config = json.loads((out / "config.json").read_text())
  assert config["model"]["width"] == 128 and Contract.from_dict(config["contract"]) == Contract()
  assert config["parameter_count"] == sum(v.size for v in expected.values())
  card = (out / "README.md").read_text()
  meta, _, _ = checkpoint.read_meta(converted_full)
  for needle in [f"{config['parameter_count']:,}", config["fingerprint"], "License:", "250.0 Hz", "2250 samples",
                 "reference:st_mem_full.npz", "Checkpoint step: 0", "width 128, depth 2, 2 heads"]:
    assert needle in card, needle
  assert str(ROOT) not in card and str(tmp_path) not in json.dumps(config)  # no machine paths in a shared export
  # And back: the export converts into a checkpoint with the same features.
  again = tmp_path / "again"
  assert _stmem("convert", "--reference", weights, "--out", again) == 0
  feats = _features(again, reference_fixture["input/series"])
  assert np.abs(feats - reference_fixture["output/encoder_features_12lead"]).max() <= TOL
  assert checkpoint.read_meta(again)[0]["fingerprint"] == config["fingerprint"]


def test_model_card_reports_training_data_and_steps():
  from stmem import model_card
  meta = checkpoint.make_meta(model_config("base"), Contract(), step=40000, origin="stmem pretrain",
                              config={"steps": 100000, "data": {"source": "prepared", "name": "cinc", "split": "train"}})
  card = model_card.render(meta, parameter_count=85_150_614, fingerprint="abc", weights_file="model.safetensors",
                           weights_sha256="0" * 64, weights_format="safetensors")
  assert "# ST-MEM encoder (base)" in card and "85.2 M" in card and "Checkpoint step: 40000" in card
  assert '`name`: `"cinc"`' in card and "steps = 100000" in card and model_card.LICENSE_PLACEHOLDER in card


# ------------------------------------------------------------------------------------------------ 3. any mesh


_ONE_DEVICE = textwrap.dedent("""
  import sys
  import jax, numpy as np
  from stmem import checkpoint
  from flax import nnx
  saved8, expected, out1 = sys.argv[1:4]
  assert jax.device_count() == 1, jax.devices()
  model, meta = checkpoint.load_model(saved8)
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  with np.load(expected) as want:
    assert sorted(want.files) == sorted(flat)
    for k in want.files:
      np.testing.assert_array_equal(np.asarray(flat[k]), want[k])
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpoint.save_params(out1, params, dict(meta, origin="one device"))
  print("restored", len(flat), "arrays on", jax.devices()[0])
""")


def test_checkpoints_restore_into_any_mesh(tmp_path):
  assert jax.device_count() == 8
  cfg = model_config("tiny")
  model = StMem(cfg, rngs=nnx.Rngs(7))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 8)])
  shardings = sharding.tree_shardings(params, mesh)
  placed = jax.device_put(params, shardings)
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
  saved8 = tmp_path / "saved8"
  checkpoint.save_params(saved8, placed, checkpoint.make_meta(cfg, Contract()))
  flat = {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  np.savez(tmp_path / "expected.npz", **flat)

  # 8 devices -> 1 device (a fresh process: the device count is fixed when JAX starts), which saves again.
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _ONE_DEVICE, str(saved8), str(tmp_path / "expected.npz"),
                         str(tmp_path / "saved1")], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # 1 device -> 8 devices, FSDP-sharded on restore.
  restored, meta = checkpoint.load_model(tmp_path / "saved1", shardings=shardings)
  assert meta["origin"] == "one device"
  for path, value in nnx.to_flat_state(nnx.state(restored, nnx.Param)):
    key = ".".join(map(str, path))
    np.testing.assert_array_equal(np.asarray(value), flat[key])
    want = sharding.fsdp_spec(value.shape, 8)
    assert value.sharding.spec == want or (not any(want) and value.sharding.is_fully_replicated), key

  # An encoder-only checkpoint takes the whole model's shardings too.
  encoder, _ = checkpoint.load_model(_encoder_only_copy(tmp_path, params, cfg), encoder_only=True, shardings=shardings)
  qkv = encoder.blocks.attn.qkv.kernel[...]
  assert qkv.sharding.spec == sharding.fsdp_spec(qkv.shape, 8)


def _encoder_only_copy(tmp_path: pathlib.Path, params: dict, cfg) -> pathlib.Path:
  out = tmp_path / "encoder_only"
  checkpoint.save_params(out, {"encoder": params["encoder"]}, checkpoint.make_meta(cfg, Contract(), encoder_only=True))
  return out


# ------------------------------------------------------------------------------------------------ 4. no code runs


class _WritesAFile:
  """Unpickling this calls `open(marker, 'w')`: if the marker appears, a loader executed code from a file."""

  def __init__(self, marker: pathlib.Path):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


@needs_torch
def test_a_malicious_pth_is_refused(reference_fixture, tmp_path):
  import pickle
  marker = tmp_path / "pwned"
  state = {k: torch.from_numpy(np.array(v)) for k, v in _encoder_names(reference_fixture).items()}
  torch.save({"model": state, "payload": _WritesAFile(marker)}, tmp_path / "evil.pth")
  with open(tmp_path / "evil_legacy.pth", "wb") as f:  # a bare pickle, the pre-zip format
    pickle.dump({"model": _WritesAFile(marker)}, f, protocol=2)
  assert not marker.exists()
  for name in ("evil.pth", "evil_legacy.pth"):
    with pytest.raises(Exception) as err:
      convert.load_reference_file(tmp_path / name)
    assert "weights" in str(err.value).lower() or "unpickl" in str(err.value).lower(), err.value
    assert _stmem("convert", "--reference", tmp_path / name, "--out", tmp_path / f"out_{name}") != 0
    assert not marker.exists(), f"loading {name} executed code"


def test_a_pickled_object_array_in_npz_is_refused(reference_fixture, tmp_path, capsys):
  marker = tmp_path / "pwned"
  state = {"param/" + k: v for k, v in _params(reference_fixture).items()}
  state["param/encoder.sep_embedding"] = np.array([_WritesAFile(marker)], dtype=object)
  np.savez(tmp_path / "evil.npz", **state)
  assert not marker.exists()
  with pytest.raises(DataError, match="refused"):
    convert.load_reference_file(tmp_path / "evil.npz")
  assert _stmem("convert", "--reference", tmp_path / "evil.npz", "--out", tmp_path / "out") != 0
  assert "pickle" in capsys.readouterr().err.lower()
  assert not marker.exists()


_PICKLE_HEADERS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_KNOWN_HEADERS = (b"\x0c\xdb",        # tensorstore OCDBT manifest / b-tree node
                  b"\x28\xb5\x2f\xfd")  # zstd frame: tensorstore chunk data


def test_orbax_checkpoints_hold_json_and_tensorstore_only(converted_full):
  files = [p for p in converted_full.rglob("*") if p.is_file()]
  assert files
  for path in files:
    head = path.read_bytes()[:8]
    assert not head.startswith(_PICKLE_HEADERS), f"{path.relative_to(converted_full)} looks like a pickle"
    assert path.suffix not in (".pkl", ".pickle", ".pt", ".pth")
    if head.startswith(_KNOWN_HEADERS):
      continue
    text = path.read_text()
    if path.name.startswith("commit_success"):
      continue
    json.loads(text)  # everything else is JSON
