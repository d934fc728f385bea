"""The interface can be discovered: every subcommand's --help lists its presets and its config keys with defaults and
meanings; ~ and environment variables are expanded in paths; configs are found by name from any directory; the launch
scripts run the python of the active environment."""
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from stmem import cli
from stmem import configflags

ROOT = pathlib.Path(__file__).resolve().parents[1]
# subcommand -> its config file's name under configs/
PROGRAMS = {"pretrain": "pretrain", "probe": "probe", "finetune": "finetune", "embed": "embed", "export": "export",
            "convert": "convert", "demo": "demo"}


def _help(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
  assert e.value.code in (0, None)
  return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(PROGRAMS))
def test_help_lists_presets_and_every_key_with_default_and_meaning(command, capsys):
  name = PROGRAMS[command]
  module = configflags.load_module(ROOT / "configs" / f"{name}.py")
  presets = module.PRESETS
  text = _help(capsys, command, "--config", name, "--help")
  assert f"presets: {presets[0]} (default)" in text and all(p in text for p in presets)
  lines = text.splitlines()
  for key, value in configflags.flat_items(module.get_config(presets[0])):
    at = next((i for i, l in enumerate(lines) if l.strip().startswith(f"{key} = ")), None)
    assert at is not None, f"{command} --help does not list {key}"
    assert repr(value) in lines[at]
    meaning = lines[at].split(repr(value), 1)[1].strip()
    if not meaning and lines[at + 1].startswith("    "):  # a long default: the meaning on the next line
      meaning = lines[at + 1].strip()
    assert len(meaning) > 8, f"{command}: key {key} has no one-line meaning in configs/{name}.py"
  assert (module.__doc__ or "").strip().splitlines()[0] in text  # the config's docstring, command lines included
  assert _help(capsys, command, "--config", name, "--helpfull") == text  # --helpfull does not crash


def test_help_shows_the_chosen_presets_defaults_and_works_without_config(capsys):
  text = _help(capsys, "pretrain", "--config", "pretrain:base", "--help")
  assert "batch_size = 2048" in text and "model.dtype = 'bfloat16'" in text
  assert "global batch, over all processes and devices" in text
  finetune = _help(capsys, "finetune", "--help")  # its default config
  assert "select_on = 'loss'" in finetune and '"loss" (validation loss, the reference) or "auroc"' in finetune
  assert "pretrain" in _help(capsys, "pretrain", "--help")  # no default config: says how to name one


@pytest.mark.parametrize("command,keys", [
  ("probe", ("init_from", "data.data_dir", "data.records")),
  ("finetune", ("init_from", "data.data_dir", "data.records")),
  ("embed", ("init_from", "data.data_dir", "data.records", "out")),
  ("pretrain", ("data.data_dir", "data.records")),
])
def test_tilde_and_environment_variables_expanded_in_paths(command, keys, monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("STMEM_TEST_RUNS", str(tmp_path / "runs"))
  argv = ["--config", command]
  for i, key in enumerate(keys):
    argv.append(f"--config.{key}=" + ("~/k" if i % 2 == 0 else "$STMEM_TEST_RUNS/k") + str(i))
  config, workdir = configflags.parse(argv + ["--workdir", "~/wd"], f"stmem {command}", None)
  assert workdir == str(tmp_path / "home" / "wd")
  for i, key in enumerate(keys):
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == str(tmp_path / ("home" if i % 2 == 0 else "runs") / f"k{i}"), key
  with pytest.raises(configflags.ConfigError, match="STMEM_TEST_UNSET"):
    configflags.parse(argv[:2] + ["--config.data.data_dir=$STMEM_TEST_UNSET/x"], f"stmem {command}", None, workdir=None)


def test_configs_found_by_name_and_path_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  by_name, _ = configflags.parse(["--config", "pretrain:demo", "--workdir", "w"], "stmem pretrain", None)
  by_repo_path, _ = configflags.parse(["--config", "configs/pretrain.py:demo", "--workdir", "w"], "stmem pretrain",
                                      None)
  assert by_name.batch_size == by_repo_path.batch_size == 32
  mine = tmp_path / "mine" / "my_config.py"  # a user's own file, by a path relative to the working directory
  mine.parent.mkdir()
  mine.write_text("import ml_collections\n\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict()\n"
                  "  c.seed = 7  # a seed\n  return c\n")
  assert configflags.parse(["--config", "mine/my_config.py", "--workdir", "w"], "x", None)[0].seed == 7
  with pytest.raises(configflags.ConfigError, match="pretrain.py has tiny, demo"):
    configflags.parse(["--config", "pretrain:nope", "--workdir", "w"], "stmem pretrain", None)
  with pytest.raises(configflags.ConfigError, match="no such config file"):
    configflags.parse(["--config", "configs/nope.py", "--workdir", "w"], "stmem pretrain", None)
  # the stmem command itself, started from that directory
  out = subprocess.run([sys.executable, "-m", "stmem.cli", "finetune", "--config", "finetune:test", "--help"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "total_steps = 6" in out.stdout, out.stderr[-2000:]


def test_shorthand_options_are_config_keys():
  config, _ = configflags.parse(["--init_from", "c", "--records=r", "--per_patch", "--batch_size", "16"],
                                "stmem embed", "embed", workdir=None)
  assert (config.init_from, config.data.records, config.per_patch, config.batch_size) == ("c", "r", True, 16)
  with pytest.raises(configflags.ConfigError, match="--config.nokey"):
    configflags.parse(["--config.nokey=1"], "stmem embed", "embed", workdir=None)


def _fake_venv(path: pathlib.Path) -> pathlib.Path:
  """A fresh virtual environment whose bin/python is this test's interpreter (which has stmem's dependencies), and
  which records every call, so the test can see that the script used it."""
  (path / "bin").mkdir(parents=True)
  (path / "pyvenv.cfg").write_text(f"home = {pathlib.Path(sys.executable).parent}\n")
  python = path / "bin" / "python"
  python.write_text(f'#!/bin/sh\necho "$$ $*" >> "{path}/calls"\nexec "{sys.executable}" "$@"\n')
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  return python


def test_local_multiprocess_uses_the_active_virtual_environment(tmp_path):
  """Two processes started by the script inside the environment (no PYTHON set, the system python3 on PATH after
  it) run launch/pretrain.py on the environment's python. They run it with --help: what failed in a virtual
  environment was the import (`No module named 'absl'`), and tests/test_multihost.py trains through the same
  launch/pretrain.py on two processes; a training run here would add a minute."""
  venv = tmp_path / "venv"
  _fake_venv(venv)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "CONDA_PREFIX") and not k.startswith("STMEM_")}
  env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{env['PATH']}", WORKDIR=str(tmp_path / "run"),
             CONFIG="pretrain:tiny")
  out = subprocess.run([str(ROOT / "launch" / "local_multiprocess.sh"), "--help"], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  calls = (venv / "calls").read_text().splitlines()
  assert sum("launch/pretrain.py --config pretrain:tiny" in c for c in calls) == 2, calls  # both processes
  for i in range(2):
    log = (tmp_path / "run" / "logs" / f"process_{i}.log").read_text()
    assert "presets: tiny (default)" in log and "batch_size = 16" in log, log[-2000:]


def test_launch_scripts_say_how_to_choose_python(tmp_path):
  bad = tmp_path / "python"  # an interpreter without stmem
  bad.write_text("#!/bin/sh\nexit 1\n")
  bad.chmod(0o755)
  for script in ("local_multiprocess.sh", "local_single.sh"):
    env = {**os.environ, "PYTHON": str(bad), "WORKDIR": str(tmp_path / "run")}
    out = subprocess.run([str(ROOT / "launch" / script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"PYTHON={bad} cannot import stmem" in out.stderr, (script, out.stderr)
