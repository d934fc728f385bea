"""The layering of the house is a checked contract: `lint-imports` (contracts in pyproject.toml) passes on the
project, and fails when a library module imports a program or a config file, or one program imports another."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("stmem", "data_pipelines", "configs", "benchmarks")


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
  exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
  assert exe, "lint-imports is not installed: pip install -e '.[test]'"
  env = {**os.environ, "PYTHONPATH": str(root)}
  return subprocess.run([exe, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_project_keeps_its_layers():
  done = lint_imports(ROOT)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "0 broken" in done.stdout, done.stdout


@pytest.fixture
def copy_of_project(tmp_path):
  for name in PACKAGES:
    shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
  return tmp_path


@pytest.mark.parametrize("module, line, arrow", [
  ("stmem/steps.py", "from stmem.programs import pretrain", "stmem.steps -> stmem.programs.pretrain"),
  ("stmem/data.py", "import configs.pretrain", "stmem.data -> configs.pretrain"),
  ("stmem/models/encoder.py", "from stmem import checkpoint", "stmem.models.encoder -> stmem.checkpoint"),
  ("stmem/programs/probe.py", "from stmem.programs import embed", "stmem.programs.probe -> stmem.programs.embed"),
  ("data_pipelines/leads.py", "import stmem.data", "data_pipelines.leads -> stmem.data"),
])
def test_an_import_against_the_layers_fails_the_check(copy_of_project, module, line, arrow):
  path = copy_of_project / module
  path.write_text(path.read_text() + f"\n{line}  # an arrow that must never exist\n")
  done = lint_imports(copy_of_project)
  assert done.returncode != 0, done.stdout
  broken = done.stdout.split("Broken contracts")[-1]
  assert arrow in broken, done.stdout
