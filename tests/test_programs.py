"""Every program runs from its config file (by name, from another working directory) with --config.KEY overrides:
demo (which runs pretrain), probe, export, convert, embed and finetune, one feeding the next."""
import json
import shutil

import numpy as np

from stmem import cli


def test_every_program_runs_from_its_config_file_with_overrides(shared_data, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the repository: configs are found by name inside the package
  run = tmp_path / "demo"
  assert cli.main(["demo", "--workdir", str(run), "--config.total_steps=2", "--config.data.num_synthetic=32",
                   "--config.no_probe=True"]) == 0
  assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2  # the override reached it

  assert cli.main(["probe", "--config", "probe:test", f"--config.init_from={run}", "--config.tasks=synthetic",
                   "--config.lead_sets=I", "--config.data.num_synthetic=40", "--config.bootstrap=20",
                   "--workdir", str(tmp_path / "probe")]) == 0
  rows = json.loads((tmp_path / "probe" / "report.json").read_text())["rows"]
  assert {r["lead_set"] for r in rows} == {"I"}

  assert cli.main(["export", "--config", "export", f"--config.init_from={run}", "--config.format=npz",
                   f"--config.out={tmp_path / 'exported'}"]) == 0
  assert (tmp_path / "exported" / "model.npz").is_file()
  assert cli.main(["convert", "--config", "convert", f"--config.reference={tmp_path / 'exported' / 'model.npz'}",
                   f"--config.out={tmp_path / 'converted'}", "--config.model.variant=auto"]) == 0

  raw = tmp_path / "raw"
  raw.mkdir()
  for ext in ("hea", "dat"):
    shutil.copy(shared_data / "ludb" / f"1.{ext}", raw)
  assert cli.main(["embed", "--config", "embed:test", f"--config.init_from={tmp_path / 'converted'}",
                   f"--config.data.records={raw}", f"--config.out={tmp_path / 'emb' / 'ludb'}",
                   "--config.data.lead_set=I+II", "--config.no_progress=True"]) == 0
  z = np.load(tmp_path / "emb" / "ludb.npz")
  assert list(z["record_id"]) == ["1"] and list(z["lead_names"]) == ["I", "II"]

  assert cli.main(["finetune", "--config", "finetune:test", f"--config.init_from={run}", "--config.total_steps=2",
                   "--config.eval_every=2", "--config.bootstrap=10", "--workdir", str(tmp_path / "ft")]) == 0
  assert json.loads((tmp_path / "ft" / "report.json").read_text())["info"]["best_step"] == 2
