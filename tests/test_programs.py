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


def test_demo_prints_the_report_once_and_ends_on_its_summary(tmp_path, monkeypatch, capsys):
  """The probe's report is printed by the probe alone; the demo's last lines are its summary: where things are and
  the macro AUROC by lead set, pretrained beside random init (the programs themselves are stood in for here)."""
  from stmem import programs
  from stmem.programs import demo
  from stmem.report import markdown
  rows = [{"task": "synthetic", "model": model, "lead_set": ls, "n_records": 240, "n_patients": 96,
           "n_positive": "40/40/40/40/40/40", "auroc": a, "auroc_lo": a - 0.01, "auroc_hi": min(a + 0.01, 1.0)}
          for ls, a in (("12", 0.99), ("I", 0.9)) for model in ("checkpoint", "random init")]
  calls = []

  def fake_run(argv):
    calls.append(argv[0])
    if argv[0] == "pretrain":  # the evaluators' figures, as pretraining logs them
      (tmp_path / "demo").mkdir()
      (tmp_path / "demo" / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"step": 50, "loss": 0.99},
        {"step": 100, "eval/heldout/loss": 0.98, "eval/heldout/seconds": 2.0, "eval/probe/12/auroc": 0.95,
         "eval/probe/12/auroc_lo": 0.9, "eval/probe/12/auroc_hi": 0.97, "eval/probe/12/random_auroc": 0.94}]) + "\n")
    if argv[0] == "probe":
      out = tmp_path / "demo" / "probe"
      out.mkdir()
      (out / "report.md").write_text(markdown(rows, "Linear probe"))
      (out / "report.json").write_text(json.dumps({"rows": rows}))
      print((out / "report.md").read_text())
    return 0

  monkeypatch.setattr(programs, "run", fake_run)
  assert demo.main(["--workdir", str(tmp_path / "demo")]) == 0
  assert calls == ["pretrain", "probe"]
  out = capsys.readouterr().out
  assert out.count("# Linear probe") == 1
  *before, evals, tail = out.rstrip().split("\n\n")
  assert "stmem demo finished" in before[-1] and before[-1].splitlines()[-1].startswith("  probe figures")
  assert evals.splitlines() == ["evaluators during pretraining (metrics.jsonl, TensorBoard):",
                                "  step 100: heldout/loss 0.980, probe/12/auroc 0.950, probe/12/random_auroc 0.940"]
  tail = tail.splitlines()
  assert len(tail) == 4 and tail[0] == "linear probe on synthetic, 240 records of 96 patients, macro AUROC [95 % CI]:"
  assert tail[1].split() == ["lead", "set", "checkpoint", "random", "init"]
  assert tail[2].split()[:2] == ["12", "0.990"] and tail[3].split()[:2] == ["I", "0.900"]
