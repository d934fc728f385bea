"""`stmem demo`: the whole path on built-in data, no download.

Pretrains the tiny ST-MEM on synthetic 12-lead ECGs (the `demo` preset of configs/pretrain.py), then runs a linear
probe of the pretrained encoder on the simulator's six classes across lead sets, beside a randomly initialised
encoder of the same architecture. The probe prints its report once; the demo ends on its summary: where the
checkpoint, metrics, figures and report are, and the probe's macro AUROC by lead set for both encoders.
Like a shell script, it runs the `stmem pretrain` and `stmem probe` commands; it imports neither program.
Configured by configs/demo.py (`stmem demo --help` lists its keys): `stmem demo --workdir DIR --total_steps 50`.
"""
from __future__ import annotations

import pathlib
import time


def run(config, workdir) -> dict:
  """Pretrain then probe in `workdir` as `config` (configs/demo.py) says; returns where the outputs are."""
  from stmem import console, entry, programs
  log = console.Log("demo")
  workdir = pathlib.Path(workdir).absolute()
  start = time.perf_counter()
  log(f"pretraining the tiny ST-MEM on synthetic ECGs in {workdir}")
  pretrain_args = ["pretrain", "--config", "pretrain:demo", "--workdir", str(workdir)]
  if config.total_steps:
    pretrain_args.append(f"--config.total_steps={config.total_steps}")
  if config.data.num_synthetic:
    pretrain_args.append(f"--config.data.num_synthetic={config.data.num_synthetic}")
  if config.no_probe:  # pretraining only: its held-out loss, no probe while it trains either
    pretrain_args.append("--config.evals.probe=")
  rc = programs.run(pretrain_args)
  if rc:
    raise entry.CommandFailed("pretrain", rc)
  if not config.no_probe:
    log("linear probe of the pretrained and a random encoder on the synthetic classes")
    rc = programs.run(["probe", "--config", "probe:synthetic", f"--config.init_from={workdir}",
                       f"--config.lead_sets={config.lead_sets}", f"--config.bootstrap={config.bootstrap}",
                       "--workdir", str(workdir / "probe")])
    if rc:
      raise entry.CommandFailed("probe", rc)
  report = workdir / "probe" / "report.md"
  print("\n".join([  # on stdout, last: the demo's summary, for a person (no JSON after it)
    "",
    f"stmem demo finished in {time.perf_counter() - start:.0f} s",
    f"  checkpoint      {workdir / 'checkpoints'}",
    f"  metrics         {workdir / 'metrics.jsonl'} (and TensorBoard: tensorboard --logdir {workdir / 'tensorboard'})",
    f"  reconstruction  {workdir / 'reconstruction.png'}",
    *([f"  probe report    {report}", f"  probe figures   {workdir / 'probe'}/*.png"] if report.exists() else []),
    *eval_summary(workdir / "metrics.jsonl"),
    *probe_summary(workdir / "probe" / "report.json"),
  ]))
  summary = {"workdir": str(workdir), "checkpoints": str(workdir / "checkpoints"),
             "metrics": str(workdir / "metrics.jsonl"), "reconstruction": str(workdir / "reconstruction.png")}
  if report.exists():
    summary["probe_report"] = str(report)
  return summary


def eval_summary(path: pathlib.Path) -> list[str]:
  """The evaluators' figures by step, as pretraining logged them to metrics.jsonl (`eval/NAME/...`), without their
  intervals and costs; none when pretraining ran no evaluator."""
  if not path.exists():
    return []
  import json
  lines = []
  for text in path.read_text().splitlines():
    record = json.loads(text)
    shown = {k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")
             and not k.endswith(("_lo", "_hi", "/seconds")) and isinstance(v, (int, float))}
    if shown:
      lines.append(f"  step {record.get('step', '?')}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
  return ["", "evaluators during pretraining (metrics.jsonl, TensorBoard):", *lines] if lines else []


def probe_summary(path: pathlib.Path) -> list[str]:
  """The probe's macro AUROC by lead set, pretrained beside random init, from its report.json (none without one)."""
  if not path.exists():
    return []
  import json
  rows = json.loads(path.read_text())["rows"]
  if not rows:
    return []
  first = rows[0]
  models = list(dict.fromkeys(r["model"] for r in rows))
  by = {(r["lead_set"], r["model"]): r for r in rows}
  fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731 -- None: no figure (report.json writes NaN so)
  lines = ["", f"linear probe on {first['task']}, {first['n_records']} records of {first['n_patients']} patients, "
               f"macro AUROC [95 % CI]:",
           "  lead set  " + "".join(f"{m:<24}" for m in models)]
  for lead_set in dict.fromkeys(r["lead_set"] for r in rows):
    cells = [by.get((lead_set, m)) for m in models]
    lines.append(f"  {lead_set:<10}" + "".join(
      (f"{fmt(r['auroc'])} [{fmt(r['auroc_lo'])}, {fmt(r['auroc_hi'])}]" if r else "").ljust(24) for r in cells))
  return [line.rstrip() for line in lines]


def check(config) -> None:
  """The command line's usage errors, before pretraining starts (0 steps or records: the preset's)."""
  from stmem import configflags
  configflags.require_positive(config, "stmem demo", "total_steps", "data.num_synthetic", "bootstrap",
                               zero_ok=("total_steps", "data.num_synthetic", "bootstrap"))
  if not config.no_probe:
    configflags.require_items(config, "stmem demo", "lead_sets")


def main(argv: list[str]) -> int:
  from stmem import entry
  return entry.main(argv, run, program="demo", config="demo", workdir="optional", workdir_default="workdirs/demo",
                    check=check, print_summary=False)
