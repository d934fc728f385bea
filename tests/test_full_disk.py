"""A write that finds no room ends in one line and loses nothing: checkpoint saves, `stmem prepare`, `stmem embed`.

Each case makes a good artifact, runs the command again with too little room, and checks: exit code 1, a last line
`stmem COMMAND: error: ...` naming what was being written and the folder, no traceback and none of the echoes of the
abandoned writes (orbax's and asyncio's logs), the previous checkpoint, dataset or output byte for byte as it was and
readable, no partial folder left; then the same command with room completes.

Too little room is a file-size limit (RLIMIT_FSIZE, no root needed): a write past it fails with EFBIG (SIGXFSZ
ignored), as a write to a full disk fails with ENOSPC, and both take the same path. The commands run in this process
(`stmem.programs.run`, as `stmem` runs them) with the limit set around them only; the checkpointer's own case runs in
a child, so that echoes printed as the interpreter exits would be seen too. Where an unprivileged user may mount a
small tmpfs in a user namespace (`unshare -rm`), one case also fills a real file system.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from stmem import programs
from tests.helpers import ecg_like, tiny_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


@contextlib.contextmanager
def file_size_limit(n: int):
  """While inside: no file of this process grows past `n` bytes; such a write fails with EFBIG (SIGXFSZ, which
  would kill the process, ignored)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def one_line(code: int, err: str, command: str, *needles: str) -> str:
  """Exit code 1, no traceback, no echo of the failed writes, and the error as stderr's last line, naming each
  needle; returns it."""
  assert code == 1, (code, err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  noise = [line for line in err.splitlines() if line.startswith(("ERROR:", "Exception", "RuntimeError", "future:"))]
  assert not noise, noise[:5]
  last = err.rstrip().splitlines()[-1]
  assert last.startswith(f"stmem {command}: error: "), err[-3000:]
  for needle in needles:
    assert needle in last, (needle, last)
  return last


def tree(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file under a folder, by relative path, with its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- checkpoints

N = 3
# test_pretrain_resume.py's run (the same compiled step): tiny, batch 8, 2N steps, a checkpoint every N, one device.
PRETRAIN = ("pretrain", "--config", "configs/pretrain.py:tiny", "--config.batch_size=8", f"--config.total_steps={2 * N}",
            "--config.warmup_steps=1", "--config.data.num_synthetic=24", f"--config.checkpoint.every={N}",
            "--config.log_every=1", "--config.evals=", "--config.mesh=data:-1,fsdp:1", "--config.num_devices=1")


def test_pretraining_checkpoint_that_finds_no_room(tmp_path, capfd, monkeypatch):
  """The disk fills once step N is on disk: the asynchronous save of step 2N fails in orbax's threads and is
  reported where the run awaits it; step N stays as it was, restores, and the rerun resumes from it."""
  from stmem import checkpoint
  workdir = tmp_path / "run"
  folder = workdir / "checkpoints"
  full, real_save, before = contextlib.ExitStack(), checkpoint.Checkpointer.save, {}

  def save_on_a_filling_disk(self, step, **kwargs):
    if step == 2 * N and not before:
      self.wait()  # step N is written: from here on no file may grow past 50 kB
      before.update(tree(folder / str(N)))
      full.enter_context(file_size_limit(50_000))
    return real_save(self, step, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_on_a_filling_disk)
  with full:
    code = programs.run([*PRETRAIN, "--workdir", str(workdir)])
  monkeypatch.undo()
  one_line(code, capfd.readouterr().err, "pretrain", "file too large", f"checkpoint step {2 * N}", str(folder),
           f"step {N} is intact", "run again")
  assert sorted(os.listdir(folder)) == [str(N)]          # the partial step removed, the finished one untouched
  assert before and tree(folder / str(N)) == before
  assert checkpoint.load_model(folder / str(N))[1]["step"] == N
  assert programs.run([*PRETRAIN, "--workdir", str(workdir)]) == 0
  out = capfd.readouterr()
  assert f"resuming from step {N}" in out.err
  assert json.loads(out.out)["step"] == 2 * N and sorted(os.listdir(folder)) == [str(N), str(2 * N)]
  assert checkpoint.load_model(folder / str(2 * N))[1]["step"] == 2 * N


CHECKPOINTER = textwrap.dedent("""
  import json, resource, signal, sys
  import numpy as np
  from stmem import checkpoint
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  root = sys.argv[1]
  small = {"w": np.random.default_rng(0).standard_normal((300, 300)).astype(np.float32)}
  out = {}

  def limit(n):
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))

  for mode in ("async", "sync", "next", "params"):
    folder = f"{root}/{mode}"
    limit(resource.RLIM_INFINITY)
    try:
      if mode == "params":  # a parameters-only checkpoint (fine-tuning's selected model, convert): synchronous
        checkpoint.save_params(folder, small, {"step": 1}, step=1)
        limit(100_000)
        checkpoint.save_params(folder, small, {"step": 2}, step=2)
      else:
        c = checkpoint.Checkpointer(folder, every=1, async_save=mode != "sync")
        try:
          c.save(1, params=small, meta={"step": 1}, data_state={"i": 1})
          c.wait()
          limit(100_000)
          c.save(2, params=small, meta={"step": 2}, data_state={"i": 2})
          if mode == "next":  # the failure surfaces when the next save waits for this one
            c.save(3, params=small, meta={"step": 3}, data_state={"i": 3})
          c.wait()
        finally:
          c.close()
      out[mode] = "no error"
    except checkpoint.DataError as e:
      out[mode] = str(e)
  limit(resource.RLIM_INFINITY)
  print(json.dumps(out))
""")


def test_synchronous_asynchronous_and_parameter_saves_that_find_no_room(tmp_path):
  """Every way a checkpoint is written: the error names the step that did not fit and the step left intact, and the
  folder holds only the finished step, which restores."""
  from stmem import checkpoint
  p = subprocess.run([sys.executable, "-c", CHECKPOINTER, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Traceback" not in p.stderr and "ERROR:" not in p.stderr, p.stderr[-3000:]
  messages = json.loads(p.stdout.strip().splitlines()[-1])
  for mode, message in messages.items():
    folder = tmp_path / mode
    assert message.startswith("file too large") and f"checkpoint step 2 in {folder}" in message, (mode, message)
    assert "the checkpoint of step 1 is intact" in message, message
    assert sorted(os.listdir(folder)) == ["1"], (mode, os.listdir(folder))
    c = checkpoint.Checkpointer(folder, async_save=False)
    restored = c.restore(1, params={"w": np.zeros((300, 300), np.float32)})
    c.close()
    assert restored["meta"] == {"step": 1} and restored["params"]["w"].shape == (300, 300)
    assert restored.get("data_state") == (None if mode == "params" else {"i": 1})


# ------------------------------------------------------------------------------------------------------- prepare


def write_records(folder: pathlib.Path, n: int) -> pathlib.Path:
  """`n` 10 s 12-lead WFDB records at 500 Hz."""
  import wfdb
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    wfdb.wrsamp(f"r{i}", fs=500, units=["mV"] * 12, sig_name=LEADS, p_signal=ecg_like(12, 5000, seed=i).T,
                fmt=["16"] * 12, write_dir=str(folder))
  return folder


def test_prepare_overwrite_that_finds_no_room(tmp_path, capfd):
  """An --overwrite over a good dataset hits the limit: the staging folder is removed, the dataset is the one that
  was there, and it opens; with room the same command replaces it."""
  from data_pipelines import prepare
  from stmem import data
  out = tmp_path / "prepared"
  assert prepare.main(["generic", "--manual_dir", str(write_records(tmp_path / "three", 3)), "--data_dir", str(out),
                       "--quiet"]) == 0
  folder = out / "generic" / "1.0.0"
  before = tree(folder)
  four = write_records(tmp_path / "four", 4)
  again = ["prepare", "generic", "--manual_dir", str(four), "--data_dir", str(out), "--quiet", "--overwrite"]
  capfd.readouterr()
  with file_size_limit(100_000):
    code = programs.run(again)
  one_line(code, capfd.readouterr().err, "prepare", "file too large", f"generic dataset in {out}",
           f"{folder} is intact", "run again")
  assert tree(folder) == before
  assert sorted(os.listdir(out)) == ["generic"] and os.listdir(out / "generic") == ["1.0.0"]  # no staging left
  assert len(data.open_prepared(out, "train", "generic").source) == 3
  assert programs.run(again) == 0
  assert len(data.open_prepared(out, "train", "generic").source) == 4


# --------------------------------------------------------------------------------------------------------- embed

EMBED = ("embed", "--config.data.num_synthetic=16", "--config.no_progress=True", "--config.num_devices=1")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> pathlib.Path:
  return tiny_checkpoint(tmp_path_factory.mktemp("full_disk") / "ckpt")


def _embeddings(prefix: pathlib.Path) -> tuple[np.ndarray, int]:
  """The pooled embeddings of an export and its Parquet row count (both read back)."""
  import pyarrow.parquet as pq
  with np.load(f"{prefix}.npz", allow_pickle=False) as z:
    pooled = z["pooled"]
  return pooled, pq.read_metadata(f"{prefix}.parquet").num_rows


def test_embed_export_that_finds_no_room(encoder, tmp_path, capfd):
  """The export hits the limit as its Parquet file grows (its row arrays, 74 kB each at most, fit in 100 kB): the
  earlier output is byte for byte as it was and loads, nothing staged is left; with room the rerun replaces it."""
  out = tmp_path / "emb" / "out"
  args = [*EMBED, f"--config.init_from={encoder}", f"--config.out={out}"]
  assert programs.run(args) == 0
  before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
  more = [*args[:1], "--config.data.num_synthetic=24", *args[2:]]
  capfd.readouterr()
  with file_size_limit(100_000):
    code = programs.run(more)
  one_line(code, capfd.readouterr().err, "embed", "file too large", f"embeddings {out}.npz", str(out.parent),
           "intact", "run again")
  assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # no staging folder either
  pooled, rows = _embeddings(out)
  assert pooled.shape == (16, 64) and rows == 16
  assert programs.run(more) == 0
  pooled, rows = _embeddings(out)
  assert pooled.shape == (24, 64) and rows == 24


RESERVE = textwrap.dedent("""
  import errno, sys
  from stmem.programs.embed import _reserved_memmap
  try:
    _reserved_memmap(sys.argv[1] + "/rows.npy", (100_000, 64))  # 25.6 MB on a 1 MB file system
  except OSError as e:
    print("refused", errno.errorcode[e.errno])
""")


def test_embed_rows_on_a_full_file_system_are_refused_not_a_crash(tmp_path):
  """On a real full file system: the row arrays, files mapped into memory, have their space reserved when created,
  so a full disk is an OSError (ENOSPC) there, never a SIGBUS when a row is written into a page that has no room.
  Needs a tmpfs mounted in a user namespace (`unshare -rm`); skipped where the machine does not allow one."""
  mount = tmp_path / "small"
  mount.mkdir()
  if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
    pytest.skip("no `unshare -rm`: this machine does not let an unprivileged user mount a small file system")
  script = f"mount -t tmpfs -o size=1m tmpfs {mount} && exec {sys.executable} -c '{RESERVE}' {mount}"
  p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert p.returncode == 0 and p.stdout.strip() == "refused ENOSPC", (p.returncode, p.stdout, p.stderr[-2000:])
