"""Crash anywhere, resume exactly: three trials of `stmem pretrain`, `finetune` and `prepare` killed with SIGKILL at
random instants (benchmarks/faults.py) complete, equal an uninterrupted run and leave nothing behind; and what a
killed `stmem prepare` leaves is cleared by the next one without ever hiding the previous dataset."""
import os
import shutil
import subprocess

import pytest

from benchmarks import faults
from benchmarks.fork_server import ForkServer


@pytest.fixture(scope="module")
def forks():
  with ForkServer() as forks:
    yield forks


def _clean(row):
  assert row["failed_trials"] == [], row["failed_trials"]
  assert row["completed"] == row["equal"] == row["trials"] == 3
  assert row["left_behind"] == []
  assert row["kills"] >= 1  # at least one trial was really interrupted


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, forks):
  root = tmp_path_factory.mktemp("pretrain")
  return root, faults.run_program("pretrain", 3, root, forks, seed=1, steps=4, every=2, max_kills=1)


def test_pretrain_killed_anywhere_resumes_exactly(pretrained):
  _, row = pretrained
  _clean(row)
  assert row["max_abs_diff"] <= 1e-6 and row["max_steps_recomputed"] >= 0


def test_finetune_killed_anywhere_resumes_exactly(tmp_path, forks, pretrained):
  root, _ = pretrained  # fine-tuning starts from the uninterrupted pretraining's checkpoint
  row = faults.run_program("finetune", 3, tmp_path, forks, seed=1, steps=4, every=2, max_kills=1,
                           base=root / "reference")
  _clean(row)
  assert row["max_abs_diff"] <= 1e-6


@pytest.fixture(scope="module")
def prepared_row(tmp_path_factory, forks):
  root = tmp_path_factory.mktemp("prepare")
  return root, faults.run_program("prepare", 3, root, forks, seed=1, max_kills=1, records=12)


def test_prepare_killed_anywhere_keeps_the_previous_dataset(prepared_row):
  _, row = prepared_row
  _clean(row)
  assert row["previous_readable"] == 3


def _ended_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def test_a_killed_builds_staging_folder_hides_nothing_and_is_cleared(prepared_row, tmp_path):
  """A build killed after it finished in its staging folder leaves a whole dataset there: readers of --data_dir
  still find the one dataset in place (a hidden folder is never a dataset), and the next build removes the folder
  of the ended process, not that of a running one."""
  import socket

  from data_pipelines import builder_base
  root, _ = prepared_row
  data_dir = tmp_path / "out"
  shutil.copytree(root / "reference", data_dir)
  dead = data_dir / f".generic.building-{socket.gethostname()}-{_ended_pid()}-abc123"
  alive = data_dir / f".generic.building-{socket.gethostname()}-{os.getpid()}-def456"
  for staging in (dead, alive):
    shutil.copytree(root / "reference" / "generic", staging / "generic")
  want = faults.read_prepared(root / "reference")
  assert faults.same_records(faults.read_prepared(data_dir), want)
  done = builder_base.clear_interrupted(data_dir, "generic")
  assert len(done) == 1 and not dead.exists() and alive.exists()


def test_a_build_killed_between_the_two_renames_loses_no_dataset(prepared_row, tmp_path):
  """Killed after moving the old dataset aside and before moving the new one in: readers still find the old one,
  and the next build puts it back; an aside whose replacement had moved in is deleted."""
  import socket

  from data_pipelines import builder_base
  root, _ = prepared_row
  data_dir = tmp_path / "out"
  shutil.copytree(root / "reference", data_dir)
  version = builder_base.prepared_dir(data_dir)
  aside = version.parent / f"{version.name}.replaced-{socket.gethostname()}-{_ended_pid()}"
  os.rename(version, aside)
  want = faults.read_prepared(root / "reference")
  assert faults.same_records(faults.read_prepared(data_dir), want)
  assert builder_base.clear_interrupted(data_dir, "generic") == [f"put {version} back: an interrupted build had "
                                                                 "moved it aside"]
  assert version.is_dir() and not aside.exists()
  shutil.copytree(version, aside)
  builder_base.clear_interrupted(data_dir, "generic")
  assert not aside.exists() and faults.same_records(faults.read_prepared(data_dir), want)
