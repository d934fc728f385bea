"""`stmem export --format onnx / stablehlo`: the graphs give `stmem embed`'s features (within 1e-4) for 12 leads, lead
I alone and a batch mixing lead sets, through the numpy + onnxruntime example script (launch/embed_onnx.py); their
batch is dynamic; the contract and fingerprint travel in their metadata."""
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import synthesize, tiny_checkpoint

pytest.importorskip("onnxruntime", reason="the ONNX export needs the `deploy` extra")
pytest.importorskip("jax2onnx", reason="the ONNX export needs the `deploy` extra")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "embed_onnx.py"
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@functools.lru_cache(maxsize=None)
def _script():
  """launch/embed_onnx.py as a module."""
  spec = importlib.util.spec_from_file_location("embed_onnx", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# (name, leads kept, seconds, Hz): 12-lead records at two rates, one of two windows, and records with fewer leads,
# so that a batch of the 12-lead set mixes lead sets.
RECORDS = [("a12", LEADS, 10, 500), ("b12", LEADS, 10, 250), ("c12_20s", LEADS, 20, 500),
           ("d_I_II_V2", ("I", "II", "V2"), 10, 500), ("e_limb", LEADS[:6], 10, 360), ("f_I", ("I",), 10, 500)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny checkpoint exported as ONNX and StableHLO, and the same records as WFDB (for `stmem embed`) and as the
  example script's .npz files (the values WFDB reads back)."""
  import wfdb

  from stmem.programs import export
  base = tmp_path_factory.mktemp("deploy")
  ckpt = tiny_checkpoint(base / "ckpt")
  for fmt in ("onnx", "stablehlo"):
    assert export.main(["--init_from", str(ckpt), "--out", str(base / fmt), "--format", fmt]) == 0
  wfdb_dir, npz_dir = base / "wfdb", base / "npz"
  wfdb_dir.mkdir()
  npz_dir.mkdir()
  rng = np.random.default_rng(0)
  for i, (name, leads, seconds, fs) in enumerate(RECORDS):
    full = synthesize(("sinus_rhythm", "afib", "sinus_tachy")[i % 3], seconds=seconds, fs=fs, rng=rng)
    signal = full[[LEADS.index(n) for n in leads]].astype(np.float64)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=signal.T,
                fmt=["16"] * len(leads), write_dir=str(wfdb_dir))
    r = wfdb.rdrecord(str(wfdb_dir / name), physical=True)
    np.savez(npz_dir / f"{name}.npz", signal=r.p_signal.T, leads=np.asarray(r.sig_name), fs=r.fs)
  return {"base": base, "ckpt": ckpt, "wfdb": wfdb_dir, "npz": npz_dir}


def _stmem_embed(world, name, lead_set, crops):
  from stmem.programs import embed
  prefix = world["base"] / "embed" / name
  assert embed.main(["--init_from", str(world["ckpt"]), "--records", str(world["wfdb"]), "--out", str(prefix),
                     "--lead_set", lead_set, "--crops", crops, "--per_patch", "--batch_size", "8", "--num_devices",
                     "1", "--no_progress"]) == 0
  return dict(np.load(f"{prefix}.npz"))


@pytest.fixture(scope="module")
def embedded(world):
  """`stmem embed` of the WFDB folder: the 12-lead set with the three evaluation crops, and lead I alone."""
  return {"12": _stmem_embed(world, "all12", "12", "mean3"), "I": _stmem_embed(world, "lead_I", "I", "first")}


def _assert_same_rows(got, want, lead_set):
  """Rows matched by (record, window): the features within 1e-4, the same lead mask."""
  key = lambda rid, w: list(zip([str(r) for r in rid], [int(x) for x in w]))  # noqa: E731
  want_rows = key(want["record_id"], want["window"])
  assert sorted(key(got["record_id"], got["window"])) == sorted(want_rows)
  order = [key(got["record_id"], got["window"]).index(r) for r in want_rows]
  assert list(got["lead_names"]) == list(want["lead_names"])
  np.testing.assert_array_equal(got["lead_mask"][order], want["lead_mask"])
  for name in ("pooled", "per_lead", "per_patch"):
    np.testing.assert_allclose(got[name][order], want[name], atol=1e-4, rtol=0, err_msg=f"{name}, lead set {lead_set}")


def test_onnx_features_equal_stmem_embed(world, embedded):
  script = _script()
  session, meta = script.load_model(str(world["base"] / "onnx" / "model.onnx"))
  records = script.read_folder(str(world["npz"]))
  mixed = embedded["12"]["lead_mask"]
  # One batch of the 12-lead set holds 12-lead, 6-lead, 3-lead and 1-lead ECGs.
  assert {int(m.sum()) for m in mixed} == {12, 6, 3, 1} and len(mixed) == 7
  got = script.embed(records, meta, script.onnx_runner(session), lead_set="12", crops="mean3", batch_size=32,
                     per_patch=True)
  _assert_same_rows(got, embedded["12"], "12")
  # Lead I alone: every record has it; two windows a call, so the last call holds one (batch 2, then 1).
  got = script.embed(records, meta, script.onnx_runner(session), lead_set="I", crops="first", batch_size=2,
                     per_patch=True)
  assert got["pooled"].shape == (7, 64) and got["per_patch"].shape == (7, 1, 30, 64)
  _assert_same_rows(got, embedded["I"], "I")


def test_onnx_metadata_and_dynamic_batch(world, embedded):
  import onnx
  script = _script()
  path = world["base"] / "onnx" / "model.onnx"
  session, meta = script.load_model(str(path))
  want = embedded["12"]
  assert meta["fingerprint"] == str(want["fingerprint"])
  assert meta["contract"] == json.loads(str(want["contract"]))
  assert meta["lead_ids"] == {n: i for i, n in enumerate(LEADS)}
  assert [o["shape"] for o in meta["outputs"]] == [["batch", 64], ["batch", "leads", 64], ["batch", "leads", 30, 64]]
  props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
  assert json.loads(props["stmem_fingerprint"]) == meta["fingerprint"]
  config = json.loads((path.parent / "config.json").read_text())
  assert config["fingerprint"] == meta["fingerprint"] and config["contract"] == meta["contract"]
  assert [i.name for i in session.get_inputs()] == ["signal", "lead_ids", "lead_mask"]
  assert [o.name for o in session.get_outputs()] == ["pooled", "per_lead", "per_patch"]
  signal_shape = session.get_inputs()[0].shape
  assert isinstance(signal_shape[0], str) and isinstance(signal_shape[1], str) and signal_shape[2] == 2250
  # Two batch sizes (and two lead counts) through one session: each row is the same whatever its batch.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 12, 2250)).astype(np.float32)
  ids = np.tile(np.arange(12, dtype=np.int32), (5, 1))
  mask = np.ones((5, 12), bool)
  mask[2, 6:] = False
  run = script.onnx_runner(session)
  five = run(x, ids, mask)
  assert five["pooled"].shape == (5, 64) and five["per_patch"].shape == (5, 12, 30, 64)
  for i in (0, 2):
    one = run(x[i:i + 1], ids[i:i + 1], mask[i:i + 1])
    np.testing.assert_allclose(one["pooled"][0], five["pooled"][i], atol=1e-5)
  three = run(x[:3, :4], ids[:3, :4], mask[:3, :4])
  assert three["per_lead"].shape == (3, 4, 64)


def test_stablehlo_features_equal_stmem_embed(world, embedded):
  import jax
  from jax import export as jax_export
  script = _script()
  folder = world["base"] / "stablehlo"
  meta = json.loads((folder / "config.json").read_text())  # the sidecar
  assert meta["fingerprint"] == str(embedded["12"]["fingerprint"])
  assert meta["contract"] == json.loads(str(embedded["12"]["contract"]))
  exported = jax_export.deserialize(bytearray((folder / "model.stablehlo").read_bytes()))
  assert {"cpu", "tpu"} <= set(exported.platforms)
  sizes = []

  def run(signal, lead_ids, lead_mask):
    sizes.append(len(signal))
    pooled, per_lead, per_patch = jax.device_get(exported.call(signal, lead_ids, lead_mask))
    return {"pooled": pooled, "per_lead": per_lead, "per_patch": per_patch}

  records = script.read_folder(str(world["npz"]))
  got = script.embed(records, meta, run, lead_set="12", crops="mean3", batch_size=4, per_patch=True)
  _assert_same_rows(got, embedded["12"], "12")
  got = script.embed(records, meta, run, lead_set="I", crops="first", batch_size=32, per_patch=True)
  _assert_same_rows(got, embedded["I"], "I")
  assert sizes == [12, 9, 7]  # dynamic batch: 4 windows x 3 crops, then 3 x 3; then 7 windows x 1 crop


def test_example_script_runs_without_jax_stmem_or_scipy(world, tmp_path):
  """The script's command line with jax, stmem and scipy unimportable writes what its functions compute."""
  out = tmp_path / "out"
  argv = ["--model", str(world["base"] / "onnx" / "model.onnx"), "--records", str(world["npz"]), "--out", str(out),
          "--lead_set", "I+II+V2", "--batch_size", "4"]
  code = ("import runpy, sys\n"
          "for name in ('jax', 'jaxlib', 'flax', 'stmem', 'data_pipelines', 'scipy'):\n"
          "  sys.modules[name] = None\n"
          f"sys.argv = ['embed_onnx.py'] + {argv!r}\n"
          f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "7 windows of 6 records" in r.stdout
  script = _script()
  session, meta = script.load_model(str(world["base"] / "onnx" / "model.onnx"))
  want = script.embed(script.read_folder(str(world["npz"])), meta, script.onnx_runner(session), lead_set="I+II+V2",
                      batch_size=4)
  assert not (out / "per_patch.npy").exists()
  for key in ("pooled", "per_lead", "lead_mask", "window"):
    np.testing.assert_array_equal(np.load(out / f"{key}.npy"), want[key])
  assert list(np.load(out / "record_id.npy")) == ["a12", "b12", "c12_20s", "c12_20s", "d_I_II_V2", "e_limb", "f_I"]
  assert list(np.load(out / "lead_names.npy")) == ["I", "II", "V2"]


def test_numpy_preprocessing_equals_the_pipeline():
  """The script's scipy-free resampling and zero-phase band-pass equal data_pipelines.transforms' (scipy)."""
  from data_pipelines import transforms
  from data_pipelines.contract import Contract
  from stmem import deploy
  script = _script()
  pre = json.loads(json.dumps(deploy.preprocessing(Contract())))
  x = synthesize("afib", seconds=10, fs=500)[:3].astype(np.float64)
  for n in (2500, 5001, 2499):
    np.testing.assert_allclose(script.resample(x, n), transforms.resample_to(x, n), atol=1e-9)
  crop = transforms.resample_to(x, 2500)[:, :2250]
  batch = np.stack([crop, crop[::-1] * 2.0])  # (2, 3, 2250): a batch of ECGs, as the script filters them
  np.testing.assert_allclose(script.bandpass(batch, pre), transforms.bandpass(batch, 250.0), atol=1e-12)


def test_unknown_format_is_a_usage_error(world, tmp_path, capsys):
  from stmem.programs import run
  assert run(["export", "--init_from", str(world["ckpt"]), "--out", str(tmp_path / "x"), "--format", "tflite"]) == 2
  err = capsys.readouterr().err
  assert "tflite" in err and "onnx" in err and "stablehlo" in err and "Traceback" not in err
