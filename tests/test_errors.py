"""Every failure a user can cause is one or two lines and an exit code; data is never silently wrong.

Each case runs the real command (`stmem ...`, each run its own process) and asserts its exit code (2 usage, 1
data or file), that the message names the option or file, that stderr has no `Traceback`, and that no partial output
is left. The general-rule cases are independent and run concurrently once per module; the cases that follow (duplicate leads, export -> convert, re-runs, interrupted --overwrite, NaN weights,
corrupt checkpoints) also look at the data they leave.

Fixtures are written here: WFDB records of a few seconds of sines, and a random tiny checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from benchmarks.fork_server import ForkServer
from tests.helpers import truncate_largest_array_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


@dataclasses.dataclass
class Result:
  rc: int
  out: str
  err: str


def _environment() -> dict[str, str]:
  """The test process's environment without STMEM_DEBUG (a case asks for it explicitly)."""
  return {k: v for k, v in os.environ.items() if k != "STMEM_DEBUG"}


_FORKS: ForkServer | None = None


@pytest.fixture(scope="module", autouse=True)
def forks():
  """The module's `stmem` runs are forked from one process that imported stmem once: each is still its own process
  with its own exit code and output, without a second or more of imports each."""
  global _FORKS
  with ForkServer(env=_environment()) as server:
    _FORKS = server
    yield server
  _FORKS = None


def stmem(*argv, env: dict | None = None, timeout: int = 300) -> Result:
  """`stmem ARGV` run as its own process (forked from the module's fork server unless `env` is changed)."""
  if env is None and _FORKS is not None:
    with tempfile.TemporaryDirectory(prefix="stmem-run-") as tmp:
      out, err = pathlib.Path(tmp) / "out", pathlib.Path(tmp) / "err"
      pid = _FORKS.start(list(map(str, argv)), out, ROOT, err=err)
      deadline = time.monotonic() + timeout
      while (rc := _FORKS.poll(pid)) is None:
        if time.monotonic() > deadline:
          os.kill(pid, signal.SIGKILL)
          _FORKS.wait(pid)
          raise subprocess.TimeoutExpired(["stmem", *map(str, argv)], timeout)
        time.sleep(0.05)
      return Result(rc, out.read_text(), err.read_text())
  full = {**_environment(), **(env or {})}
  p = subprocess.run([sys.executable, "-m", "stmem.cli", *map(str, argv)], capture_output=True, text=True,
                     cwd=ROOT, env=full, timeout=timeout)
  return Result(p.returncode, p.stdout, p.stderr)


def assert_user_error(r: Result, code: int, *needles: str) -> str:
  """Exit code, no traceback, a message of at most two lines (from the last `error:`, else the last line) naming
  each needle; returns the message."""
  assert "Traceback" not in r.err, r.err[-3000:]
  assert r.rc == code, (r.rc, r.err[-2000:])
  start = r.err.rfind("error:")
  if start < 0:
    start = r.err.rstrip().rfind("\n") + 1
  message = r.err[r.err.rfind("\n", 0, start) + 1:].strip()
  assert message, r.err
  assert len(message.splitlines()) <= 2, message
  for needle in needles:
    assert needle in message, (needle, message)
  return message


def write_record(folder: pathlib.Path, name: str, sig_names: list[str], seed: int, seconds: float = 10.0,
                 fs: int = 500) -> np.ndarray:
  """A WFDB record of per-lead sines (mV); returns the (T, leads) signal written."""
  import wfdb
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * fs)) / fs
  x = np.stack([rng.uniform(0.3, 1.5) * np.sin(2 * np.pi * (1.0 + 0.13 * i) * t + rng.uniform(0, 6))
                for i in range(len(sig_names))], axis=1)
  folder.mkdir(parents=True, exist_ok=True)
  wfdb.wrsamp(name, fs=fs, units=["mV"] * len(sig_names), sig_name=sig_names, p_signal=x, fmt=["16"] * len(sig_names),
              write_dir=str(folder))
  return x


def tree(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file under a folder, by relative path, with its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ shared inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Folders and checkpoints every case may use, written once."""
  from flax import nnx

  from data_pipelines.contract import Contract
  from stmem import checkpoint
  from stmem.models import StMem, model_config

  root = tmp_path_factory.mktemp("errors")
  w = {"root": root}
  w["records"] = root / "records"                    # three good 12-lead records
  for i in range(3):
    write_record(w["records"], f"r{i}", LEADS, seed=i)
  w["dup_only"] = root / "dup_only"                  # lead I mislabelled `ii`: two signals named II
  write_record(w["dup_only"], "dup", ["ii"] + LEADS[1:], seed=7)
  w["empty"] = root / "empty"
  w["empty"].mkdir()
  w["a_file"] = root / "a_file.txt"
  w["a_file"].write_text("not a folder\n")
  from data_pipelines import prepare
  w["prepared"] = root / "prepared"
  assert prepare.main(["generic", "--manual_dir", str(w["records"]), "--data_dir", str(w["prepared"]), "--quiet"]) == 0

  # A random tiny model under a non-default contract (offline filtering): what export -> convert must keep.
  cfg = model_config("tiny")
  params = nnx.to_pure_dict(nnx.state(StMem(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  contract = Contract(filter_stage="offline", highpass_hz=0.5)
  w["ckpt"] = root / "ckpt"
  checkpoint.save_params(w["ckpt"], params, checkpoint.make_meta(cfg, contract, step=2, origin="test"), step=2)
  w["corrupt"] = root / "corrupt"
  shutil.copytree(w["ckpt"], w["corrupt"])
  truncate_largest_array_file(w["corrupt"] / "2")
  params["encoder"]["sep_embedding"] = np.full_like(np.asarray(params["encoder"]["sep_embedding"]), np.nan)
  w["nan_ckpt"] = root / "nan_ckpt"
  checkpoint.save_params(w["nan_ckpt"], params, checkpoint.make_meta(cfg, contract, step=2, origin="test"), step=2)
  return w


def _cases(w: dict[str, pathlib.Path]) -> dict[str, tuple[tuple, int, tuple[str, ...], tuple[pathlib.Path, ...]]]:
  """id -> (argv, exit code, needles the message must hold, paths that must not exist afterwards)."""
  r, missing, f = w["root"], w["root"] / "does_not_exist", w["a_file"]
  pre = ("--config", "configs/pretrain.py:tiny", "--workdir")
  probe = ("probe", "--config", "configs/probe.py:synthetic")
  ft = ("finetune", "--config", "configs/finetune.py:synthetic")
  prep = ("prepare", "generic", "--manual_dir", w["records"], "--data_dir")
  return {
    # prepare: every option checked before anything is built
    "prepare/unknown_dataset": (("prepare", "nope", "--manual_dir", w["records"], "--data_dir", r / "p0"), 2,
                                ("'nope'", "ludb"), (r / "p0",)),
    "prepare/nonexistent_path": (("prepare", "ludb", "--manual_dir", missing, "--data_dir", r / "p1"), 2,
                                 ("--manual_dir", str(missing)), (r / "p1",)),
    "prepare/file_for_folder": ((*prep, f), 2, ("--data_dir", str(f)), ()),
    "prepare/fs_zero": ((*prep, r / "p2", "--fs", "0"), 2, ("--fs",), (r / "p2",)),
    "prepare/lowpass_at_nyquist": ((*prep, r / "p3", "--lowpass_hz", "125"), 2, ("--lowpass_hz", "Nyquist"),
                                   (r / "p3",)),
    "prepare/window_longer_than_record": ((*prep, r / "p4", "--window_seconds", "12"), 2,
                                          ("--window_seconds", "--record_seconds"), (r / "p4",)),
    "prepare/unknown_builder_option": ((*prep, r / "p5", "--array", "x.npy", "--metadata_csv", "m.csv", "--source_fs",
                                        "500", "--laeds", "12"), 2, ("does not take --laeds;",), (r / "p5",)),
    "prepare/empty_input": (("prepare", "generic", "--manual_dir", w["empty"], "--data_dir", r / "p6", "--quiet"), 1,
                            ("no record found", str(w["empty"])), (r / "p6",)),
    # overlap
    # (overlap keeps exit code 1 for "records are shared" under --fail_on_overlap: a bad argument is 2)
    "overlap/nonexistent_path": (("overlap", missing, w["prepared"]), 2, (str(missing),), ()),
    # pretrain: config file, preset, key, value type, workdir, mesh
    "pretrain/unknown_preset": (("pretrain", "--config", "configs/pretrain.py:nope", "--workdir", r / "w0"), 2,
                                ("'nope'", "tiny"), (r / "w0",)),
    "pretrain/nonexistent_config": (("pretrain", "--config", "configs/nope.py:tiny", "--workdir", r / "w1"), 2,
                                    ("configs/nope.py",), (r / "w1",)),
    "pretrain/unknown_key": (("pretrain", *pre, r / "w2", "--config.nokey=1"), 2, ("--config.nokey",), (r / "w2",)),
    "pretrain/unknown_nested_key": (("pretrain", *pre, r / "w3", "--config.checkpoint.evry=1"), 2,
                                    ("--config.checkpoint.evry",), (r / "w3",)),
    "pretrain/bad_value_type": (("pretrain", *pre, r / "w4", "--config.total_steps=many"), 2,
                                ("--config.total_steps",), (r / "w4",)),
    "pretrain/file_for_folder": (("pretrain", *pre, f), 1, (str(f),), ()),
    "pretrain/too_few_devices": (("pretrain", *pre, r / "w5", "--config.mesh=data:64"), 2,
                                 ("64 devices", "xla_force_host_platform_device_count"), ()),
    "pretrain/too_many_num_devices": (("pretrain", *pre, r / "w16", "--config.num_devices=99"), 2,
                                      ("--config.num_devices=99", "8 cpu device(s)"), (r / "w16" / "checkpoints",)),
    # probe / finetune / embed / export: checkpoints, leads, paths
    "probe/nonexistent_checkpoint": ((*probe, "--config.init_from", missing, "--workdir", r / "w6"), 1,
                                     (str(missing),), ()),
    "probe/corrupt_checkpoint": ((*probe, "--config.init_from", w["corrupt"], "--workdir", r / "w7"), 1,
                                 ("checkpoint step 2", str(w["corrupt"] / "2" / "params")), ()),
    "probe/unknown_lead": ((*probe, "--config.lead_sets=12,XX", "--workdir", r / "w8"), 2, ("'XX'",), ()),
    "probe/unknown_preset": (("probe", "--config", "configs/probe.py:nope", "--workdir", r / "w9"), 2, ("'nope'",),
                             ()),
    "probe/nonexistent_data": (("probe", "--config", "configs/probe.py:prepared", "--config.data.data_dir", missing,
                                "--workdir", r / "w10"), 1, (str(missing),), ()),
    "embed/missing_split": (("embed", "--init_from", w["ckpt"], "--data_dir", w["prepared"], "--split", "valid",
                             "--out", r / "e5" / "x"), 2, ("'valid'", "'train'"), (r / "e5" / "x.npz",)),
    "embed/file_for_prepared_folder": (("embed", "--init_from", w["ckpt"], "--data_dir", f, "--out",
                                        r / "e6" / "x"), 1, (str(f),), (r / "e6" / "x.npz",)),
    "probe/unknown_label": (("probe", "--config", "configs/probe.py:prepared", "--config.data.data_dir", w["prepared"],
                             "--config.labels=af", "--workdir", r / "w15"), 2, ("--config.labels", "'af'"), ()),
    "demo/file_for_folder": (("demo", "--workdir", f, "--total_steps", "1", "--no_probe"), 1, (str(f),), ()),
    # `--total_steps` is short for `--config.total_steps`: the message names the key it sets, and the value.
    "demo/bad_value_type": (("demo", "--total_steps", "many", "--workdir", r / "d1"), 2, ("total_steps=many",),
                            (r / "d1",)),
    "finetune/empty_split": ((*ft, "--config.data.num_synthetic=4", "--workdir", r / "w17"), 1,
                             ("split", "empty", "records per split", "stmem probe"), (r / "w17" / "checkpoints",)),
    "finetune/unknown_key": ((*ft, "--config.nokey=1", "--workdir", r / "w11"), 2, ("--config.nokey",), ()),
    "finetune/bad_value_type": ((*ft, "--config.total_steps=x", "--workdir", r / "w12"), 2,
                                ("--config.total_steps",), ()),
    "finetune/unknown_lead": ((*ft, "--config.data.lead_set=I+XX", "--workdir", r / "w13"), 2, ("'XX'",), ()),
    "finetune/nonfinite_checkpoint": ((*ft, "--config.init_from", w["nan_ckpt"], "--workdir", r / "w14"), 1,
                                      ("non-finite", "sep_embedding"), ()),
    "embed/nonexistent_checkpoint": (("embed", "--init_from", missing, "--records", w["records"], "--out",
                                      r / "e0" / "x"), 1, (str(missing),), (r / "e0" / "x.npz",)),
    "embed/file_for_folder": (("embed", "--init_from", w["ckpt"], "--records", f, "--out", r / "e1" / "x"), 2,
                              ("--records", str(f)), (r / "e1",)),
    "embed/unknown_lead": (("embed", "--init_from", w["ckpt"], "--records", w["records"], "--lead_set", "XX",
                            "--out", r / "e2" / "x"), 2, ("'XX'",), (r / "e2" / "x.npz",)),
    "embed/corrupt_checkpoint": (("embed", "--init_from", w["corrupt"], "--records", w["records"], "--out",
                                  r / "e3" / "x"), 1, ("checkpoint step 2",), (r / "e3" / "x.npz",)),
    # every record skipped (a duplicated lead) -> an error, and nothing written
    "embed/too_many_num_devices": (("embed", "--init_from", w["ckpt"], "--records", w["records"], "--num_devices",
                                   "99", "--out", r / "e7" / "x"), 2, ("--config.num_devices=99",),
                                  (r / "e7" / "x.npz",)),
    "embed/empty_input": (("embed", "--init_from", w["ckpt"], "--records", w["dup_only"], "--out", r / "e4" / "x",
                           "--no_progress"), 1, ("no usable", "duplicate_leads", str(w["dup_only"])),
                          (r / "e4" / "x.npz", r / "e4" / "x.parquet")),
    "export/nonexistent_checkpoint": (("export", "--init_from", missing, "--out", r / "x0"), 1, (str(missing),),
                                      (r / "x0",)),
    "export/corrupt_checkpoint": (("export", "--init_from", w["corrupt"], "--out", r / "x1"), 1,
                                  ("checkpoint step 2",), (r / "x1",)),
    "export/file_for_folder": (("export", "--init_from", w["ckpt"], "--out", f), 2, ("--out", str(f)), ()),
    "convert/nonexistent_path": (("convert", "--reference", missing, "--out", r / "c0"), 1, (str(missing),),
                                 (r / "c0",)),
    "convert/folder_for_file": (("convert", "--reference", w["records"], "--out", r / "c1"), 2,
                                (str(w["records"]),), (r / "c1",)),
    "forward-check/unknown_variant": (("forward-check", "--variant", "nope"), 2, ("'nope'",), ()),
    "bench/unknown_workload": (("bench", "--workloads", "nope"), 2, ("nope",), ()),
  }


CASE_IDS = list(_cases({k: pathlib.Path("/x") for k in ("root", "records", "dup_only", "empty", "a_file", "ckpt",
                                                        "corrupt", "nan_ckpt", "prepared")}))


@pytest.fixture(scope="module")
def results(world) -> dict[str, Result]:
  """Every general-rule case, run concurrently (they share nothing they write)."""
  cases = _cases(world)
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {name: pool.submit(stmem, *argv) for name, (argv, *_ ) in cases.items()}
    return {name: fut.result() for name, fut in futures.items()}


@pytest.mark.parametrize("case", CASE_IDS)
def test_user_error_is_one_message_and_an_exit_code(case, world, results):
  argv, code, needles, absent = _cases(world)[case]
  message = assert_user_error(results[case], code, *needles)
  assert "--strict" not in message  # never blames an option that was not given
  for path in absent:
    assert not path.exists(), f"{case} left {path}"
  if case == "prepare/unknown_builder_option":  # only the mistyped option is blamed, not the valid ones beside it
    blamed = message.split("does not take", 1)[1].split(";", 1)[0]
    assert blamed.strip() == "--laeds", message
  if case.startswith("embed/"):  # no staging folder left beside the output
    assert not list((world["root"]).glob("e*/.stmem-staging-*"))


def test_debug_shows_the_traceback(world):
  for env, extra in (({}, ("--debug",)), ({"STMEM_DEBUG": "1"}, ())):
    r = stmem("prepare", "generic", "--manual_dir", world["empty"], "--data_dir", world["root"] / "dbg", "--quiet",
              *extra, env=env)
    assert r.rc != 0 and "Traceback" in r.err and "DataError" in r.err and "no record found" in r.err


# ------------------------------------------------------------------------------------------ a bad record is quarantined


def test_duplicate_lead_names_quarantine_the_record(world, tmp_path):
  manual = tmp_path / "mixed"
  shutil.copytree(world["records"], manual)
  for p in world["dup_only"].iterdir():
    shutil.copy(p, manual)
  r = stmem("prepare", "generic", "--manual_dir", manual, "--data_dir", tmp_path / "out", "--quiet")
  assert r.rc == 0 and "duplicate_leads: 1" in r.out, r.err[-2000:]
  folder = tmp_path / "out" / "generic" / "1.0.0"
  written = [json.loads(x)["record_id"] for x in (folder / "records.jsonl").read_text().splitlines()]
  assert sorted(written) == ["r0", "r1", "r2"]  # the record with two II signals is not in the data
  q = [json.loads(x) for x in (folder / "quarantine.jsonl").read_text().splitlines()]
  assert [(x["record_id"], x["reason"]) for x in q] == [("dup", "duplicate_leads")] and "dup.hea" in q[0]["path"]
  from stmem import data
  prepared = data.open_prepared(tmp_path / "out", "train")
  assert sorted(prepared.source[i]["record_id"].decode() for i in range(len(prepared.source))) == ["r0", "r1", "r2"]
  # --strict stops on it, naming the file, and writes no dataset.
  r = stmem("prepare", "generic", "--manual_dir", manual, "--data_dir", tmp_path / "strict", "--quiet", "--strict")
  assert r.rc == 1 and "dup.hea" in r.err and "duplicate_leads" in r.err and "Traceback" not in r.err
  assert not (tmp_path / "strict" / "generic" / "1.0.0").exists()


# --------------------------------------------------------------------------------- export and convert keep the contract


def test_export_then_convert_keeps_the_contract_and_the_fingerprint(world, tmp_path):
  import jax.numpy as jnp

  from stmem import checkpoint
  from stmem import features
  r = stmem("export", "--init_from", world["ckpt"], "--out", tmp_path / "export")
  assert r.rc == 0, r.err[-2000:]
  config = json.loads((tmp_path / "export" / "config.json").read_text())
  r2 = stmem("convert", "--reference", tmp_path / "export" / "model.safetensors", "--out", tmp_path / "back")
  assert r2.rc == 0, r2.err[-2000:]
  original, _, _ = checkpoint.read_meta(world["ckpt"])
  back, _, _ = checkpoint.read_meta(tmp_path / "back")
  assert back["contract"] == original["contract"] and back["contract"]["filter_stage"] == "offline"
  a, b = features.load_encoder(world["ckpt"]), features.load_encoder(tmp_path / "back")
  # One fingerprint for the same weights, wherever it is printed or stored.
  assert a.fingerprint == b.fingerprint == config["fingerprint"] == back["fingerprint"]
  assert f"fingerprint {a.fingerprint}" in r.err and json.loads(r.out)["fingerprint"] == a.fingerprint
  assert checkpoint.FINGERPRINT_DEFINITION in (tmp_path / "export" / "README.md").read_text()
  rng = np.random.default_rng(0)
  signal = jnp.asarray(rng.standard_normal((2, 12, a.contract.window)), jnp.float32)
  ids, mask = jnp.tile(jnp.arange(12), (2, 1)), jnp.ones((2, 12), bool)
  fa = np.asarray(a.encoder.features(signal, ids, mask)["pooled"])
  fb = np.asarray(b.encoder.features(signal, ids, mask)["pooled"])
  np.testing.assert_array_equal(fa, fb)


# ---------------------------------------------------------------------------------------------- re-runs and --overwrite


def test_rerun_from_other_inputs_is_refused_and_overwrite_never_destroys(world, tmp_path):
  out = tmp_path / "out"
  first = ("prepare", "generic", "--manual_dir", world["records"], "--data_dir", out, "--quiet")
  assert stmem(*first).rc == 0
  folder = out / "generic" / "1.0.0"
  before = tree(folder)
  assert json.loads((folder / "inputs.json").read_text())["files"] == 6
  # The same inputs: nothing to do.
  r = stmem(*first)
  assert r.rc == 0 and "already prepared" in r.out
  # Another download folder (one more record) or another builder option: refused, naming what differs.
  more = tmp_path / "more"
  shutil.copytree(world["records"], more)
  write_record(more, "r3", LEADS, seed=3)
  r = stmem("prepare", "generic", "--manual_dir", more, "--data_dir", out, "--quiet")
  assert_user_error(r, 2, "--manual_dir", "--overwrite", "8 files")
  r = stmem(*first, "--splits", "train=0.5,test=0.5")
  assert_user_error(r, 2, "--splits", "--overwrite")
  r = stmem(*first, "--fs", "500")
  assert_user_error(r, 2, "contract fs", "--overwrite")
  assert tree(folder) == before
  # --overwrite that fails part-way (a damaged record under --strict) leaves the previous dataset as it was.
  damaged = tmp_path / "damaged"
  shutil.copytree(more, damaged)
  (damaged / "r3.dat").write_bytes((damaged / "r3.dat").read_bytes()[:100])
  r = stmem("prepare", "generic", "--manual_dir", damaged, "--data_dir", out, "--quiet", "--overwrite", "--strict")
  assert r.rc == 1 and "r3.hea" in r.err
  assert tree(folder) == before
  assert sorted(p.name for p in out.iterdir()) == ["generic"] and sorted(p.name for p in (out / "generic").iterdir()) \
    == ["1.0.0"]  # no staging or incomplete.* folder left
  # An --overwrite stopped by SIGTERM (a scheduler's kill, Ctrl-C alike) while it builds: the same.
  many = tmp_path / "many"
  for i in range(40):
    write_record(many, f"m{i}", LEADS, seed=100 + i)
  p = subprocess.Popen([sys.executable, "-m", "stmem.cli", "prepare", "generic", "--manual_dir", str(many),
                        "--data_dir", str(out), "--quiet", "--overwrite"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not list(out.glob(".generic.building-*")) and p.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  p.send_signal(signal.SIGTERM)
  err = p.communicate(timeout=120)[1]
  assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (p.returncode, err[-2000:])
  assert tree(folder) == before and sorted(p.name for p in out.iterdir()) == ["generic"]
  # Every record unusable: the build fails, the previous dataset stays, and the quarantine report is kept.
  broken = tmp_path / "broken"
  broken.mkdir()
  for p in world["dup_only"].iterdir():
    shutil.copy(p, broken)
  r = stmem("prepare", "generic", "--manual_dir", broken, "--data_dir", out, "--quiet", "--overwrite")
  message = assert_user_error(r, 1, "quarantine", str(broken))
  report = out / "generic" / "quarantine.failed-build.jsonl"
  assert str(report) in message
  assert [json.loads(x)["reason"] for x in report.read_text().splitlines()] == ["duplicate_leads"]
  assert tree(folder) == before
  # A successful --overwrite replaces it, and clears the failed build's report.
  r = stmem("prepare", "generic", "--manual_dir", more, "--data_dir", out, "--quiet", "--overwrite")
  assert r.rc == 0, r.err[-2000:]
  assert len((folder / "records.jsonl").read_text().splitlines()) == 4 and not report.exists()


# ------------------------------------------------------------------------------------------- weights that must not load


def test_convert_refuses_pickles_and_nonfinite_weights_without_writing(world, tmp_path):
  from stmem import checkpoint
  from stmem.programs import export
  encoder, _ = checkpoint.load_model(world["ckpt"], encoder_only=True)
  names = export.encoder_reference_names(encoder)
  bad = dict(names)
  bad["lead_embeddings.3"] = bad["lead_embeddings.3"].copy()
  bad["lead_embeddings.3"][0] = np.inf
  np.savez(tmp_path / "inf.npz", **bad)
  r = stmem("convert", "--reference", tmp_path / "inf.npz", "--out", tmp_path / "c_inf")
  assert_user_error(r, 1, "non-finite", "lead_embeddings.3", "inf.npz")
  assert not (tmp_path / "c_inf").exists()
  evil = dict(names)
  evil["sep_embedding"] = np.array([object()], dtype=object)
  np.savez(tmp_path / "evil.npz", **evil)
  r = stmem("convert", "--reference", tmp_path / "evil.npz", "--out", tmp_path / "c_evil")
  message = assert_user_error(r, 1, "refused", "evil.npz")
  assert "allow_pickle=True" not in r.err and "weights_only=False" not in r.err
  assert not (tmp_path / "c_evil").exists()
  torch = pytest.importorskip("torch", reason="the .pth refusal needs the optional extra stmem[torch]")
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in names.items()}, "args": _Payload()},
             tmp_path / "evil.pth")
  r = stmem("convert", "--reference", tmp_path / "evil.pth", "--out", tmp_path / "c_pth")
  message = assert_user_error(r, 1, "refused", "evil.pth", "run code")
  assert "weights_only=False" not in r.err and "torch.load" not in message
  assert not (tmp_path / "c_pth").exists()


class _Payload:
  """Any pickled object that is not a tensor (as training arguments saved beside the weights are)."""


# --------------------------------------------------------------------------------------------- an unreadable checkpoint


def test_pretrain_resumes_from_the_newest_readable_checkpoint(tmp_path):
  from configs import pretrain as pretrain_config
  from stmem.programs import pretrain
  overrides = {"batch_size": 8, "total_steps": 4, "warmup_steps": 1, "log_every": 2, "mesh": "data:-1,fsdp:1",
               "num_devices": 1}
  c = pretrain_config.get_config("tiny")
  for k, v in overrides.items():
    setattr(c, k, v)
  c.data.num_synthetic, c.checkpoint.every, c.checkpoint.async_save = 24, 2, False
  c.evals = type(c.evals)()  # no evaluators: tests/test_evaluators.py runs them
  workdir = tmp_path / "run"
  pretrain.run(c, workdir)
  ckpts = workdir / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4"]
  truncate_largest_array_file(ckpts / "4")
  flags = [f"--config.{k}={v}" for k, v in {**overrides, "total_steps": 6}.items()]
  flags += ["--config.data.num_synthetic=24", "--config.checkpoint.every=2", "--config.checkpoint.async_save=False",
            "--config.evals="]
  r = stmem("pretrain", "--config", "configs/pretrain.py:tiny", *flags, "--workdir", workdir)
  assert r.rc == 0, r.err[-3000:]
  assert "skipping unreadable checkpoint: checkpoint step 4" in r.err and str(ckpts / "4" / "params") in r.err
  assert "resuming from step 2" in r.err
  assert (ckpts / "6").is_dir() and (ckpts / "4.unreadable").is_dir()  # the bad step kept aside, never deleted


def test_a_failed_restore_leaves_the_process_hooks_as_they_were(tmp_path, monkeypatch):
  """The echoes of a failed restore's abandoned reads are silenced only around that restore: afterwards the
  process's sys.excepthook and sys.unraisablehook are the ones it had, and other errors always reach them."""
  import jax.numpy as jnp
  from data_pipelines.errors import DataError
  from stmem import checkpoint

  seen = []
  monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(("except", str(value))))
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(("unraisable", str(u.exc_value))))
  mine = sys.excepthook, sys.unraisablehook

  with checkpoint.quiet_abandoned_reads():
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)  # an echo: silenced
    sys.excepthook(ValueError, ValueError("something else"), None)            # anything else: reported
  assert (sys.excepthook, sys.unraisablehook) == mine and seen == [("except", "something else")]

  params = {"w": jnp.arange(4096.0).reshape(64, 64)}
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=1, keep=2, async_save=False)
  ckpt.save(1, params=params, meta={"step": 1}, force=True)
  ckpt.wait()
  truncate_largest_array_file(tmp_path / "ckpt" / "1")
  with pytest.raises(DataError, match="checkpoint step 1: cannot read"):
    ckpt.restore(1, params=params, data_state=False)
  assert (sys.excepthook, sys.unraisablehook) == mine
  ckpt.close()
