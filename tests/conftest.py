"""Test session set-up: 8 fake CPU devices, quick compiles, a persistent compilation cache, and the shared data folder.

The environment is set here, before anything imports JAX, so that multi-device tests see 8 devices and every
test process reuses compiled programs from earlier runs.
"""
import os
import pathlib

from tests.helpers import xla_flags  # imports no JAX: the environment below is still set before JAX starts

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = pathlib.Path(os.environ.get("STMEM_TEST_CACHE", pathlib.Path.home() / ".cache" / "stmem-tests" / "jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("STMEM_SHARED", ROOT.parent / "shared"))


def _need(path: pathlib.Path) -> pathlib.Path:
  """A path under ../shared; under CI=true a missing one fails the test instead of skipping it."""
  if not path.exists():
    msg = f"{path} is missing (tests read the shared data and fixtures from ../shared)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  return _need(SHARED / "data")


@pytest.fixture(scope="session")
def reference_fixture():
  import numpy as np
  path = _need(SHARED / "fixtures" / "stmem_reference_tiny.npz")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture
def opened(monkeypatch):
  """The `stmem.data.DatasetSpec`s that every `stmem.data.open_pool` call of the test asked for, in order."""
  from stmem import data
  calls = []
  real = data.open_pool

  def spy(spec, contract=None):
    calls.append(spec)
    return real(spec, contract)

  monkeypatch.setattr(data, "open_pool", spy)
  return calls


# The files that take longest, first: pytest-xdist hands whole files (`--dist=loadfile`) to its workers in collection
# order, so a long file collected last would leave the other workers idle while it runs alone.
LONGEST_FIRST = ("test_faults.py", "test_study.py", "test_multihost.py", "test_errors.py", "test_pretrain_resume.py",
                 "test_plan.py", "test_bench.py", "test_sharding.py", "test_programs_data.py", "test_evaluators.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
