"""One concept, one key: every config file under configs/, with every preset, names each thing as the table below does.

The vocabulary (concept -> key) and the retired keys (old name -> new name) are held here, so that a config file
that drifts (a retired key, or a concept under another name than in the other files) fails this test; and an old
key given on the command line is a one-line usage error naming the new one (exit code 2).
"""
from __future__ import annotations

import fnmatch

import pytest

from stmem import configflags

# concept -> key, relative to a program's config (or to a block that configures one: study's `pretrain` / `probe`,
# an evaluator's `evals.NAME`, the study's `heldout`).
VOCABULARY = {
  "model architecture": "model.variant",
  "optimiser steps of a run": "total_steps",
  "warm-up steps": "warmup_steps",
  "a checkpoint to load (start from, probe, embed, export)": "init_from",
  "how often to save a checkpoint": "checkpoint.every",
  "checkpoints kept": "checkpoint.keep",
  "saving in the background": "checkpoint.async_save",
  "base learning rate": "optim.base_lr",
  "AdamW first-moment decay": "optim.b1",
  "AdamW second-moment decay": "optim.b2",
  "AdamW epsilon": "optim.eps",
  "weight decay": "optim.weight_decay",
  "gradient clipping": "optim.clip_norm",
  "layer-wise learning-rate decay": "optim.layer_decay",
  "gradient accumulation": "optim.accum_steps",
  "where examples come from": "data.source",
  "a prepared dataset's name, or a raw folder's builder": "data.name",
  "a prepared dataset (`stmem prepare` output)": "data.data_dir",
  "a folder of raw records": "data.records",
  "the split read": "data.split",
  "simulated records": "data.num_synthetic",
  "lead slots fed to the model": "data.lead_set",
  "channel renames of raw records": "data.lead_map",
  "input pipeline workers": "data.worker_count",
  "a weighted mix of sources": "data.sources",
  "evaluators scoring training records": "data.allow_overlap",
  "lead sets swept": "lead_sets",
  "encoder blocks probed (probe)": "blocks",
  "heads probed (probe)": "heads",
  "an evaluator's cadence (in its evals.NAME block)": "every",
  "seed": "seed",
  "global batch": "batch_size",
  "device mesh": "mesh",
  "devices used": "num_devices",
  "FSDP threshold": "fsdp_min_size",
  "cadence of metrics": "log_every",
  "an output file or folder": "out",
  "bootstrap resamples": "bootstrap",
}

# Retired keys -> their replacements (relative to the same block).
RETIRED = {
  "steps": "total_steps",
  "checkpoint": "init_from",      # as a value; `checkpoint.*` is how to save
  "model": "model.variant",       # as a value; `model.*` is the model block
  "variant": "model.variant",
  "synthetic_n": "data.num_synthetic",
  "synthetic": "data.num_synthetic",
  "num_records": "data.num_synthetic",
  "records": "data.records",      # demo's count of simulated ECGs: data.num_synthetic
  "data_root": "data.records",
  "data_dir": "data.data_dir",
  "split": "data.split",
  "lead_set": "data.lead_set",
  "lead_map": "data.lead_map",
  "base_lr": "optim.base_lr",
  "weight_decay": "optim.weight_decay",
  "b1": "optim.b1",
  "b2": "optim.b2",
  "clip_norm": "optim.clip_norm",
  "layer_decay": "optim.layer_decay",
  "keep": "checkpoint.keep",
  "async_save": "checkpoint.async_save",
  "last_blocks": "blocks",
}

# Blocks that configure a program or a part of one on their own: their keys are read relative to the block.
SCOPES = ("pretrain", "probe", "heldout", "evals.*")


def _configs() -> list[tuple[str, str, object]]:
  """(file, preset, config) for every config file shipped and every preset of it."""
  out = []
  for name in configflags.available():
    path, _ = configflags.resolve(name)
    module = configflags.load_module(path)
    for preset in configflags.presets(module) or (None,):
      out.append((name, preset, configflags.default_config(module, path, preset)))
  return out


CONFIGS = _configs()


def _relative(key: str, blocks: set[str]) -> str:
  """A key relative to the innermost scope block holding it (`probe.data.records` in study: `data.records`)."""
  parts = key.split(".")
  for i in range(len(parts) - 1, 0, -1):
    prefix = ".".join(parts[:i])
    # a scope matches whole names: `evals.*` is `evals.probe`, not `evals.probe.data`
    if prefix in blocks and any(fnmatch.fnmatchcase(prefix, s) and prefix.count(".") == s.count(".")
                                for s in SCOPES):
      return ".".join(parts[i:])
  return key


def _keys(config) -> list[str]:
  """Every key of a config relative to its scope: the leaves, and blocks given as a value would be leaves too."""
  leaves = [k for k, _ in configflags.flat_items(config)]
  blocks = {".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 1)}
  return [_relative(k, blocks) for k in leaves]


def vocabulary_problems(configs) -> list[str]:
  """What breaks the vocabulary in [(file, preset, config)]: retired keys, and a key name used at two places."""
  problems = []
  where: dict[str, dict[str, set[str]]] = {}  # leaf name -> {relative key: {file:preset}}
  for name, preset, config in configs:
    for key in _keys(config):
      if key in RETIRED:
        problems.append(f"configs/{name}.py:{preset}: {key} is retired; use {RETIRED[key]}")
      where.setdefault(key.rsplit(".", 1)[-1], {}).setdefault(key, set()).add(f"{name}:{preset}")
  for leaf, keys in sorted(where.items()):
    allowed = {k for k in VOCABULARY.values() if k.rsplit(".", 1)[-1] == leaf}
    named = set(keys) - set(RETIRED)  # retired ones are reported above
    if allowed and named - allowed:
      problems += [f"{k} ({', '.join(sorted(keys[k]))}): the vocabulary's key is {' or '.join(sorted(allowed))}"
                   for k in sorted(named - allowed)]
    elif not allowed and len(named) > 1:
      problems.append(f"{leaf!r} names one concept under several keys: "
                      + "; ".join(f"{k} in {', '.join(sorted(v))}" for k, v in sorted(keys.items())))
  return problems


def test_every_config_file_loads_with_every_preset_and_names_its_program():
  from stmem.programs import COMMANDS
  names = {name for name, _, _ in CONFIGS}
  assert {"pretrain", "finetune", "probe", "embed", "export", "convert", "demo", "study"} <= names
  for name in names:
    path, _ = configflags.resolve(name)
    module = configflags.load_module(path)
    assert getattr(module, "PROGRAM", None) in COMMANDS, f"configs/{name}.py declares no PROGRAM of a command"
    assert configflags.program(["--config", name]) == module.PROGRAM


def test_every_config_file_uses_the_vocabulary():
  assert vocabulary_problems(CONFIGS) == []


def test_the_vocabulary_check_fails_on_drift():
  import ml_collections
  old = ml_collections.ConfigDict({"steps": 10, "data": {"records": "x"}})
  other = ml_collections.ConfigDict({"optim": {"lr": 0.1}, "lr": 0.2, "data": {"num_synthetic": 3},
                                     "num_synthetic": 4})
  problems = vocabulary_problems([("a", None, old), ("b", None, other)])
  assert any("steps is retired; use total_steps" in p for p in problems)
  assert any(p.startswith("num_synthetic (b:None)") for p in problems)  # a concept's key differs between files
  assert any(p.startswith("'lr' names one concept under several keys") for p in problems)
  assert not any("data.records" in p for p in problems)


def test_the_command_line_table_of_renamed_keys_agrees_with_this_one():
  assert set(configflags.RENAMED) == set(RETIRED)
  for old, new in RETIRED.items():
    assert new in configflags.RENAMED[old], old
  keys = {k for _, _, c in CONFIGS for k in _keys(c)}
  for old, news in configflags.RENAMED.items():  # every replacement is a key some config has
    assert any(new in keys for new in news), (old, news)


@pytest.mark.parametrize("argv,new", [
  (["finetune", "--config", "finetune:test", "--config.steps=3"], "--config.total_steps"),
  (["finetune", "--config", "finetune:test", "--config.checkpoint=CKPT"], "--config.init_from"),
  (["finetune", "--config", "finetune:test", "--config.base_lr=0.1"], "--config.optim.base_lr"),
  (["finetune", "--config", "finetune:test", "--config.keep=3"], "--config.checkpoint.keep"),
  (["probe", "--config", "probe:test", "--config.synthetic_n=40"], "--config.data.num_synthetic"),
  (["probe", "--config", "probe:test", "--config.data_root=/data"], "--config.data.records"),
  (["probe", "--config", "probe:test", "--config.data_dir=/data"], "--config.data.data_dir"),
  (["probe", "--config", "probe:test", "--config.last_blocks=2"], "--config.blocks"),
  (["pretrain", "--config", "pretrain:tiny", "--config.model=base"], "--config.model.variant"),
  (["study", "--config", "study:smoke", "--config.probe.data_root=/data"], "--config.probe.data.records"),
  (["embed", "--checkpoint", "CKPT", "--records", "DIR", "--out", "F"], "--init_from"),
  (["embed", "--init_from", "CKPT", "--synthetic", "3", "--out", "F"], "--num_synthetic"),
  (["export", "--config.checkpoint=CKPT", "--out", "F"], "--config.init_from"),
  (["convert", "--reference", "R", "--out", "F", "--variant", "base"], "--config.model.variant"),
  (["demo", "--steps", "5"], "--total_steps"),
  (["demo", "--config.records=64"], "--config.data.num_synthetic"),
])
def test_an_old_key_on_the_command_line_is_a_usage_error_naming_the_new_one(argv, new, capsys, tmp_path):
  from stmem import programs
  workdir = [] if argv[0] in ("embed", "export", "convert") else ["--workdir", str(tmp_path / "w")]
  assert programs.run(argv + workdir) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"stmem {argv[0]}: error: ") and f"is now {new}" in err, err
  assert not (tmp_path / "w").exists()


def test_shorthands_work_for_top_level_and_data_keys():
  config, _ = configflags.parse(["--init_from", "CKPT", "--records", "DIR", "--lead_set=I", "--out", "F"],
                                "stmem embed", "embed", workdir=None)
  assert (config.init_from, config.data.records, config.data.lead_set, config.out) == ("CKPT", "DIR", "I", "F")
  config, _ = configflags.parse(["--total_steps", "5", "--num_synthetic", "64", "--workdir", "w"], "stmem demo",
                                "demo")
  assert (config.total_steps, config.data.num_synthetic) == (5, 64)


def test_a_config_file_of_another_program_is_refused(capsys, tmp_path):
  from stmem import programs
  assert programs.run(["finetune", "--config", "pretrain:tiny", "--workdir", str(tmp_path)]) == 2
  assert "configures `stmem pretrain`, not `stmem finetune`" in capsys.readouterr().err
