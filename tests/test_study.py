"""`stmem study` end to end on its smoke preset: three methods pretrained a few steps, held-out loss beside its
references, probes beside random encoders, one report with its figures."""
import json
import pathlib

import configs


def test_study_smoke(tmp_path, capfd):
  from stmem.programs import study
  out = tmp_path / "study"
  config = pathlib.Path(configs.__file__).parent / "study.py"
  assert study.main(["--config", f"{config}:smoke", "--workdir", str(out)]) == 0
  info = json.loads((out / "report.json").read_text())["info"]

  pre = {r["method"]: r for r in info["pretraining"]}
  assert set(pre) == {"stmem", "mtae", "mlae"}
  for method, r in pre.items():
    assert r["steps"] == 4 and r["heldout_loss"] > 0
    # Predicting zero in norm-pix units scores (n - 1) / n for tokens of n values: 75, 900, 2,250.
    n = {"stmem": 75, "mtae": 900, "mlae": 2250}[method]
    assert abs(r["patch_mean"] - (n - 1) / n) < 0.01
    assert 0 < r["clean_floor"] < r["patch_mean"]

  rows = json.loads((out / "report.json").read_text())["rows"]
  seen = {(r["model"], r["lead_set"]) for r in rows}
  assert {("ST-MEM", "12"), ("random ST-MEM", "12"), ("ST-MEM", "I"), ("MTAE", "12"), ("random MLAE", "12")} <= seen
  assert not any(r["model"] in ("MTAE", "MLAE") and r["lead_set"] != "12" for r in rows)  # 12 leads only
  assert all(r["seeds"] == 1 and r["auroc_seed_min"] == r["auroc"] == r["auroc_seed_max"] for r in rows)
  for name in ("report.md", "report.csv", "loss_curves.png", "reconstruction_stmem.png", "reconstruction_mtae.png",
               "reconstruction_mlae.png", "auroc_synthetic.png"):
    assert (out / name).stat().st_size > 0, name
  assert "clean-signal floor" in (out / "report.md").read_text()

  # Run again in the same workdir: the finished runs are left as they are and the probes are read, not rerun.
  probe_report = out / "probes" / "stmem_seed0" / "report.json"
  written = probe_report.stat().st_mtime_ns
  capfd.readouterr()
  assert study.main(["--config", f"{config}:smoke", "--workdir", str(out)]) == 0
  said = capfd.readouterr().err
  assert said.count("finished; left as it is") == 3 and said.count("read, not rerun") == 3
  assert probe_report.stat().st_mtime_ns == written
  again = json.loads((out / "report.json").read_text())["info"]
  assert [r["seconds"] for r in again["pretraining"]] == [r["seconds"] for r in info["pretraining"]]
  assert again["per_seed_rows"] == info["per_seed_rows"]

  # A probe is reused only for the same config and the same checkpoint.
  from configs import study as study_configs
  run_dir, probe_dir = out / "runs" / "stmem_seed0", out / "probes" / "stmem_seed0"
  args = study.probe_args(study_configs.get_config("smoke"), "stmem", run_dir, probe_dir, random_baseline=True)
  assert study.finished_probe(args, probe_dir, run_dir)["rows"]
  assert study.finished_probe([*args, "--config.bootstrap=7"], probe_dir, run_dir) is None
  report = json.loads(probe_report.read_text())
  report["info"]["fingerprint"] = "another checkpoint"
  probe_report.write_text(json.dumps(report))
  assert study.finished_probe(args, probe_dir, run_dir) is None

  # Runs trained under other pretraining options are refused before anything is computed, naming the option.
  from stmem import programs
  capfd.readouterr()
  assert programs.run(["study", "--config", f"{config}:smoke", "--workdir", str(out),
                       "--config.pretrain.optim.base_lr=0.05"]) == 2
  said = capfd.readouterr().err
  assert f"{run_dir} was pretrained under other options than this study gives (optim.base_lr: " in said
  assert "-> 0.05)" in said and "held-out references" not in said and "Traceback" not in said


def test_loop_seconds_sums_steps_over_their_rate_and_counts_a_repeated_segment_once():
  from stmem.programs.study import loop_seconds
  lines = [{"step": 200, "steps_per_s": 4.0}, {"step": 400, "steps_per_s": 2.0},
           {"step": 400, "steps_per_s": 8.0},  # a resumed run logs its checkpoint's step again
           {"step": 600, "steps_per_s": 4.0}]
  assert loop_seconds(lines) == 50 + 100 + 50


def _ludb_root(shared_data, root: pathlib.Path, numbers) -> pathlib.Path:
  """A data root holding ludb/ with some of LUDB's records (and its label table)."""
  import shutil
  folder = root / "ludb"
  folder.mkdir(parents=True)
  shutil.copy(shared_data / "ludb" / "ludb.csv", folder)
  for i in numbers:
    for ext in ("hea", "dat"):
      shutil.copy(shared_data / "ludb" / f"{i}.{ext}", folder)
  return root


def test_recordings_the_probes_score_are_refused_in_pretraining_before_any_run(shared_data, tmp_path, capfd):
  from stmem import configflags, programs
  from stmem.programs import study
  probed = _ludb_root(shared_data, tmp_path / "probed", range(1, 13))
  other = _ludb_root(shared_data, tmp_path / "other", range(13, 19))
  config = pathlib.Path(configs.__file__).parent / "study.py"

  def argv(records, *extra):
    return ["--config", f"{config}:smoke", "--workdir", str(tmp_path / "study"), "--config.probe.preset=shared",
            "--config.probe.tasks=ludb_af", f"--config.probe.data.records={probed}",
            "--config.pretrain.data.sources=synthetic=0.5,raw:ludb=0.5", f"--config.pretrain.data.records={records}",
            *extra]

  capfd.readouterr()
  assert programs.run(["study", *argv(probed)]) == 2
  said = capfd.readouterr().err
  assert "the probe's ludb task scores 12 record(s) that pretraining trains on (1, 10, 11, 12, 2 and 7 more)" in said
  assert "--config.pretrain.data.allow_overlap=true" in said and "Traceback" not in said
  assert not (tmp_path / "study" / "runs").exists()  # refused before any pretraining

  def check(records, *extra):
    lines = []
    parsed, workdir = configflags.parse(argv(records, *extra), "stmem study", None)
    study.refuse_probe_overlap(parsed, workdir, lines.append)
    return lines

  assert check(other) == []  # recordings the probes do not score pass
  assert check(probed, "--config.pretrain.data.allow_overlap=true") == [
    "the probe's ludb task scores 12 record(s) pretraining trains on (pretrain.data.allow_overlap)"]
