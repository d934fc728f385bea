"""`stmem demo`: the whole path on built-in data, no download.

Pretrains the tiny ST-MEM on synthetic 12-lead ECGs (the `demo` preset of configs/pretrain.py), then runs a linear
probe of the pretrained encoder on the simulator's six classes across lead sets, beside a randomly initialised
encoder of the same architecture, and says where the checkpoint, metrics, figures and report are.
Like a shell script, it runs the `stmem pretrain` and `stmem probe` commands; it imports neither program.
Configured by configs/demo.py (`stmem demo --help` lists its keys): `stmem demo --workdir DIR --total_steps 50`.
"""
from __future__ import annotations

import pathlib
import sys
import time


def main(argv: list[str]) -> int:
  from stmem import programs
  from stmem import configflags
  config, workdir = configflags.parse(argv, "stmem demo", "demo", workdir="optional", workdir_default="workdirs/demo")

  workdir = pathlib.Path(workdir).absolute()
  start = time.perf_counter()
  print(f"stmem demo: pretraining the tiny ST-MEM on synthetic ECGs in {workdir}", file=sys.stderr)
  pretrain_args = ["pretrain", "--config", "pretrain:demo", "--workdir", str(workdir)]
  if config.total_steps:
    pretrain_args.append(f"--config.total_steps={config.total_steps}")
  if config.data.num_synthetic:
    pretrain_args.append(f"--config.data.num_synthetic={config.data.num_synthetic}")
  if config.no_probe:  # pretraining only: its held-out loss, no probe while it trains either
    pretrain_args.append("--config.evals.probe=")
  rc = programs.run(pretrain_args)
  if rc:
    return rc
  if not config.no_probe:
    print("stmem demo: linear probe of the pretrained and a random encoder on the synthetic classes", file=sys.stderr)
    rc = programs.run(["probe", "--config", "probe:synthetic", f"--config.init_from={workdir}",
                   f"--config.lead_sets={config.lead_sets}", f"--config.bootstrap={config.bootstrap}",
                   "--workdir", str(workdir / "probe")])
    if rc:
      return rc
  report = workdir / "probe" / "report.md"
  print("\n".join([
    "",
    f"stmem demo finished in {time.perf_counter() - start:.0f} s",
    f"  checkpoint      {workdir / 'checkpoints'}",
    f"  metrics         {workdir / 'metrics.jsonl'} (and TensorBoard: tensorboard --logdir {workdir / 'tensorboard'})",
    f"  reconstruction  {workdir / 'reconstruction.png'}",
    *([f"  probe report    {report}", f"  probe figures   {workdir / 'probe'}/*.png"] if report.exists() else []),
  ]))
  if report.exists():
    print("\n" + report.read_text())
  return 0
