"""What a new user hits, reported instead of silent: stopped training runs (Ctrl-C saves and exits 130, SIGTERM saves
and exits 75), a resume with another total_steps (said, recorded; past the end refused), counts and lists that would
run nothing, output places that cannot be (refused before any work), flat leads (in records.jsonl and prepare's
summary) and absent leads in `stmem embed`'s per-lead rows (NaN, beside `lead_mask`).

Commands run in this process through `stmem.programs.run` (exit code and stderr as the user sees them; the signals
are real ones, raised in the main thread while a step runs), the training loop on its own with a recording
checkpointer where no model is needed; a subprocess only where the exit status of the interpreter itself is checked.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from stmem import programs
from tests.helpers import tiny_checkpoint


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_terminal():
  """Python's own Ctrl-C handler, as in a terminal: a test worker process (pytest-xdist) starts with SIGINT ignored,
  which its child processes inherit and which stmem keeps (a job started in the background ignores Ctrl-C on
  purpose). A handled SIGINT becomes the default again in a child process."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
PRETRAIN = ["pretrain", "--config", "pretrain:tiny", "--config.batch_size=8", "--config.data.num_synthetic=24",
            "--config.warmup_steps=1", "--config.log_every=1", "--config.checkpoint.every=1000", "--config.evals=",
            "--config.mesh=data:-1,fsdp:1", "--config.num_devices=1"]


def run(capsys, *argv) -> tuple[int, str, str]:
  """`stmem ARGV...` in this process: (exit code, stdout, stderr)."""
  capsys.readouterr()
  rc = programs.run([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if ": error: " in line]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  return lines[0]


def write_record(folder: pathlib.Path, name: str, leads: list[str], seed: int, flat: tuple[str, ...] = ()) -> None:
  """A 10 s WFDB record of per-lead sines at 500 Hz (mV); the leads in `flat` constant."""
  import wfdb
  rng = np.random.default_rng(seed)
  t = np.arange(5000) / 500
  x = np.stack([np.full_like(t, 0.2) if n in flat else rng.uniform(0.3, 1.5) * np.sin(2 * np.pi * (1 + 0.1 * i) * t)
                for i, n in enumerate(leads)], axis=1)
  folder.mkdir(parents=True, exist_ok=True)
  wfdb.wrsamp(name, fs=500, units=["mV"] * len(leads), sig_name=leads, p_signal=x, fmt=["16"] * len(leads),
              write_dir=str(folder))


# ------------------------------------------------------------------------------------------------ stopped runs


def _signal_at(monkeypatch, calls: dict[int, list[int]]):
  """Raise the given signals (really, in this process) while the n-th training step's batch is being placed."""
  from stmem.programs import pretrain
  real, seen = pretrain.data_lib.to_global, {"n": 0}

  def placed(batch, sharding):
    seen["n"] += 1
    for sig in calls.get(seen["n"], ()):
      signal.raise_signal(sig)
    return real(batch, sharding)

  monkeypatch.setattr(pretrain.data_lib, "to_global", placed)


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_ctrl_c_in_pretraining_saves_the_step_and_exits_130(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "run"
  _signal_at(monkeypatch, {3: [signal.SIGINT]})  # Ctrl-C during step 3: step 3 is saved (it saved nothing before)
  rc, out, err = run(capsys, *PRETRAIN, "--config.total_steps=500", "--workdir", workdir)
  assert rc == 130, err[-2000:]
  assert "interrupted (Ctrl-C) at step 3: checkpoint saved" in err and _steps(workdir) == [3]
  assert json.loads(out)["preempted"] and json.loads(out)["signal"] == "SIGINT"
  from stmem import checkpoint as ckpt_lib
  assert ckpt_lib.read_meta(workdir / "checkpoints" / "3")[0]["total_steps"] == 500  # the plan it was saved under
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(x["step"], x.get("total_steps")) for x in lines] == [(1, 500), (2, None), (3, None)]
  # the command put Python's own handlers back
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class _Checkpointer:
  """Records saves (train_loop on its own: no model, no devices)."""

  def __init__(self, directory, restored=None):
    self.directory, self.every, self.saved, self.restored = pathlib.Path(directory), 1000, [], restored

  def restore_latest_readable(self, log=None, **kwargs):
    return self.restored

  def save(self, step, **kwargs):
    self.saved.append(step)
    return True

  def wait(self):
    pass

  def close(self):
    pass


class _Batches:
  def __next__(self):
    return {"record_id": ["r"]}

  def get_state(self):
    return {}


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
  from data_pipelines import errors
  from stmem import train_loop

  def update(params, opt_state, batch, step, ok):
    if step == 2:  # Ctrl-C twice during the third step
      signal.raise_signal(signal.SIGINT)
      signal.raise_signal(signal.SIGINT)
    return params + 1, opt_state, {"loss": 1.0}, True

  ckpt = _Checkpointer(tmp_path / "ckpt")
  loop = train_loop.Loop(tmp_path, ckpt, log=lambda _: None, total_steps=10, log_every=5, meta={})
  with pytest.raises(errors.Interrupted):
    loop.run(update, 0, None, _Batches(), 0, True)
  assert ckpt.saved == [] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigterm_saves_the_step_and_the_run_exits_75(tmp_path):
  """A preempted run exits 75, not 0: a scheduler tells it from a finished run and requeues it (a real SIGTERM to
  `stmem pretrain`, and its exit code, in tests/test_pretrain_resume.py and tests/test_multihost.py)."""
  from stmem import entry, train_loop

  def update(params, opt_state, batch, step, ok):
    if step == 2:
      signal.raise_signal(signal.SIGTERM)
    return params + 1, opt_state, {"loss": 1.0}, True

  ckpt = _Checkpointer(tmp_path / "ckpt")
  loop = train_loop.Loop(tmp_path, ckpt, log=lambda _: None, total_steps=10, log_every=5, meta={})
  result = loop.run(update, 0, None, _Batches(), 0, True)
  assert (result.step, result.preempted, result.signal, ckpt.saved) == (3, True, "SIGTERM", [3])
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  assert [entry.stopped_exit_code(s) for s in ({"preempted": True, "signal": "SIGTERM"},
                                               {"preempted": True, "signal": "SIGINT"}, {"step": 10}, None)] \
    == [75, 130, 0, 0]


def test_a_checkpoint_past_total_steps_is_refused_and_one_at_it_is_complete(tmp_path):
  from data_pipelines import errors
  from stmem import train_loop
  lines = []
  ckpt = _Checkpointer(tmp_path / "checkpoints", restored=(5, {"meta": {"step": 5, "total_steps": 400}}))
  with pytest.raises(errors.UsageError, match=r"--config.total_steps=4, but the checkpoint in .* is already at step 5 "
                                              r"of the 400 its run planned: that run is complete"):
    train_loop.restore(ckpt, lines.append, total_steps=4)
  assert train_loop.restore(ckpt, lines.append, total_steps=5)[0] == 5
  assert lines[-2:] == [f"total_steps changed from 400 to 5, resuming at step 5: the learning-rate schedule is "
                        f"re-planned for 5 steps from step 5 on (recorded in config.json, metrics.jsonl and the next "
                        f"checkpoints)", "already complete: step 5 of 5; nothing to train"]
  # the resumed run's first metrics line records the plan it trains under, and so does every checkpoint
  ckpt.saved.clear()
  train_loop.Loop(tmp_path, ckpt, log=lambda _: None, total_steps=7, log_every=1, meta={}).run(
    lambda p, o, b, step, ok: (p + 1, o, {"loss": 1.0}, True), 5, None, _Batches(), 5, True)
  written = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(x["step"], x.get("total_steps")) for x in written] == [(6, 7), (7, None)] and ckpt.saved == [7]
  # a checkpoint written before the loop recorded total_steps: its config says what was planned
  ckpt.restored = (5, {"meta": {"step": 5, "config": {"total_steps": 400}}})
  lines.clear()
  train_loop.restore(ckpt, lines.append, total_steps=400)
  assert len(lines) == 1 and lines[0].startswith("resuming from step 5")


MODULE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from stmem import programs
from data_pipelines import prepare


def main(argv):
  # A signal that lands while a string is exec'd (a dataclass being defined during a lazy import): the
  # KeyboardInterrupt a handler raises there is marked unhandled by CPython unless it is stmem's own subclass.
  if argv[0] == "SIGTERM":
    signal.signal(signal.SIGTERM, prepare._terminate)
  exec("os.kill(os.getpid(), getattr(signal, name))\\nfor _ in range(1000): pass",
       {"os": os, "signal": signal, "name": argv[0]})
  return 0


sys.modules["signal_in_exec"] = sys.modules[__name__]
programs.COMMANDS["signal-in-exec"] = ("signal_in_exec", "")
sys.exit(programs.run(["signal-in-exec", sys.argv[2]]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_an_interrupt_inside_a_string_exec_still_exits_130(sig, tmp_path):
  """`prepare --overwrite` stopped by SIGTERM once exited -2 (killed by SIGINT) after printing `interrupted`: Python
  run as `python -m` kills itself with SIGINT at exit when a bare KeyboardInterrupt passed through a string exec."""
  (tmp_path / "interrupt_in_exec.py").write_text(MODULE)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  p = subprocess.run([sys.executable, "-m", "interrupt_in_exec", str(ROOT), sig], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 130 and "stmem signal-in-exec: interrupted" in p.stderr, (p.returncode, p.stderr[-2000:])


# ------------------------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("argv, needle", [
  (PRETRAIN + ["--config.total_steps=0"], "--config.total_steps=0"),
  (PRETRAIN + ["--config.total_steps=-5"], "--config.total_steps=-5"),
  (PRETRAIN + ["--config.checkpoint.every=0"], "--config.checkpoint.every=0"),
  (["finetune", "--config", "finetune:synthetic", "--config.total_steps=0"], "--config.total_steps=0"),
  (["finetune", "--config", "finetune:synthetic", "--config.eval_every=0"], "--config.eval_every=0"),
  (["probe", "--config", "probe:synthetic", "--config.lead_sets="], "--config.lead_sets is empty"),
  (["probe", "--config", "probe:synthetic", "--config.tasks=,"], "--config.tasks is empty"),
  (["study", "--config", "study:smoke", "--config.seeds="], "--config.seeds is empty"),
  (["study", "--config", "study:smoke", "--config.pretrain.total_steps=0"], "--config.pretrain.total_steps=0"),
  (["demo", "--config.lead_sets="], "--config.lead_sets is empty"),
  (["demo", "--config.total_steps=-1"], "--config.total_steps=-1"),
  (["embed", "--init_from", "nowhere", "--num_synthetic", "4", "--out", "OUT", "--batch_size", "0"],
   "--config.batch_size=0"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[:1] + v[-1:]))
def test_counts_and_lists_of_nothing_are_usage_errors_before_any_work(argv, needle, tmp_path, capsys):
  workdir = tmp_path / "w"
  rc, out, err = run(capsys, *argv, *(["--workdir", workdir] if argv[0] != "embed" else []))
  assert rc == 2 and needle in error_line(err), err[-2000:]
  assert not workdir.exists() and not out  # nothing started: no workdir, no report, no summary


def test_output_places_are_checked_before_anything_is_loaded(tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder\n")
  missing = tmp_path / "no_such_checkpoint"  # loading it would fail: the output place must be refused first
  cases = [  # (a workdir in the way is a file error, exit 1, as it was when found making the folder)
    (["embed", "--init_from", missing, "--num_synthetic", "4", "--out", a_file / "x"], "--out", 2),
    (["export", "--init_from", missing, "--out", a_file / "x"], "--out", 2),
    (["convert", "--reference", missing, "--out", a_file / "x" / "y"], "--out", 2),
    (["probe", "--config", "probe:synthetic", f"--config.init_from={missing}", "--workdir", a_file / "x"],
     "--workdir", 1),
    (PRETRAIN + ["--workdir", a_file / "x"], "--workdir", 1),
  ]
  for argv, option, code in cases:
    rc, out, err = run(capsys, *argv)
    line = error_line(err)
    assert rc == code and option in line and f"{a_file} is a file" in line, (argv[0], err[-2000:])
    assert str(missing) not in line
  rc, out, err = run(capsys, "export", "--init_from", missing, "--out", a_file)
  assert rc == 2 and "a file is in the way" in error_line(err)
  assert a_file.read_text() == "not a folder\n"


def test_a_missing_folder_of_recordings_names_the_option_to_set(tmp_path, capsys):
  """In `stmem pretrain` the option is data.records; in `stmem study` the same option sits under pretrain."""
  missing = tmp_path / "no_recordings"
  rc, _, err = run(capsys, *PRETRAIN, "--workdir", tmp_path / "run",
                   "--config.data.sources=synthetic=0.5,raw:generic=0.5", f"--config.data.records={missing}")
  assert rc == 2 and error_line(err).endswith(f"{missing} does not exist: set --config.data.records to the folder "
                                               f"of your generic records")
  rc, _, err = run(capsys, "study", "--config", "study:smoke", "--workdir", tmp_path / "study",
                   "--config.pretrain.data.sources=synthetic=0.5,raw:generic=0.5",
                   f"--config.pretrain.data.records={missing}")
  assert rc == 2 and error_line(err).endswith(f"{missing} does not exist: set --config.pretrain.data.records to the "
                                               f"folder of your generic records")
  assert not (tmp_path / "study" / "runs").exists()


# ------------------------------------------------------------------------------------------------ flat and absent leads


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> pathlib.Path:
  """Three 12-lead records, one with a flat V3 and one with flat V3 and aVL, and a record of leads I and II only."""
  folder = tmp_path_factory.mktemp("flat") / "records"
  write_record(folder, "r0", LEADS, seed=0)
  write_record(folder, "r1", LEADS, seed=1, flat=("V3",))
  write_record(folder, "r2", LEADS, seed=2, flat=("V3", "aVL"))
  write_record(folder, "r3", ["I", "II"], seed=3)
  return folder


def test_flat_leads_are_listed_per_record_and_counted_in_the_summary(records, tmp_path, capsys):
  out = tmp_path / "prepared"
  rc, stdout, err = run(capsys, "prepare", "generic", "--manual_dir", records, "--data_dir", out, "--quiet",
                        "--splits", "train=1.0")
  assert rc == 0, err[-2000:]
  folder = next(out.glob("generic/*"))
  index = {r["record_id"]: r for r in map(json.loads, (folder / "records.jsonl").read_text().splitlines())}
  assert {k: r.get("flat_leads") for k, r in index.items()} == {"r0": None, "r1": ["V3"], "r2": ["aVL", "V3"],
                                                                   "r3": None}
  summary = json.loads((folder / "summary.json").read_text())
  assert summary["records_with_flat_leads"] == 2 and summary["flat_leads_by_lead"] == {"V3": 2, "aVL": 1}
  assert "flat leads masked: 2 record(s) written with a constant lead marked absent (V3 2, aVL 1" in stdout


def test_embed_rows_of_absent_leads_are_nan_beside_the_lead_mask(records, tmp_path, capsys):
  ckpt = tiny_checkpoint(tmp_path / "ckpt")
  prefix = tmp_path / "emb" / "x"
  rc, out, err = run(capsys, "embed", "--init_from", ckpt, "--records", records, "--out", prefix, "--per_patch",
                     "--num_devices", "1", "--no_progress")
  assert rc == 0, err[-2000:]
  z = np.load(f"{prefix}.npz")
  names, rows = list(z["lead_names"]), list(z["record_id"])
  mask = z["lead_mask"]
  absent = {r: sorted(n for n, m in zip(names, mask[rows.index(r)]) if not m) for r in rows}
  assert absent == {"r0": [], "r1": ["V3"], "r2": ["V3", "aVL"], "r3": sorted(set(LEADS) - {"I", "II"})}
  for key in ("per_lead", "per_patch"):
    rows_of = z[key]
    assert np.isnan(rows_of[~mask]).all() and np.isfinite(rows_of[mask]).all(), key
  assert np.isfinite(z["pooled"]).all()
  import pyarrow.parquet as pq
  table = pq.read_table(f"{prefix}.parquet").to_pydict()
  r1 = table["record_id"].index("r1")
  assert np.isnan(table["per_lead"][r1][names.index("V3")]).all()
  assert not np.isnan(table["per_lead"][r1][names.index("V2")]).any()
