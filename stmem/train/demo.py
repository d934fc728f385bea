"""`stmem demo`: the whole path on built-in data, no download.

Pretrains the tiny ST-MEM on synthetic 12-lead ECGs (the `demo` preset of configs/pretrain.py), then runs a linear
probe of the pretrained encoder on the simulator's six classes across lead sets, beside a randomly initialised
encoder of the same architecture, and says where the checkpoint, metrics, figures and report are.
Like a shell script, it runs the `stmem pretrain` and `stmem probe` commands; it imports neither program.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import configs


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="stmem demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="workdirs/demo", help="where everything is written (default: %(default)s)")
  parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the demo preset's)")
  parser.add_argument("--lead_sets", default="12,limb6,I+II,I", help="lead sets for the probe (default: %(default)s)")
  parser.add_argument("--no_probe", action="store_true", help="pretrain only")
  args = parser.parse_args(argv)

  from stmem import cli

  workdir = pathlib.Path(args.workdir).expanduser().absolute()
  config_dir = pathlib.Path(configs.__file__).parent
  start = time.perf_counter()
  print(f"stmem demo: pretraining the tiny ST-MEM on synthetic ECGs in {workdir}", file=sys.stderr)
  pretrain_args = ["pretrain", "--config", f"{config_dir / 'pretrain.py'}:demo", "--workdir", str(workdir)]
  if args.steps:
    pretrain_args.append(f"--config.total_steps={args.steps}")
  rc = cli.main(pretrain_args)
  if rc:
    return rc
  if not args.no_probe:
    print("stmem demo: linear probe of the pretrained and a random encoder on the synthetic classes", file=sys.stderr)
    rc = cli.main(["probe", "--config", f"{config_dir / 'probe.py'}:synthetic", f"--config.checkpoint={workdir}",
                   f"--config.lead_sets={args.lead_sets}", "--config.bootstrap=200", "--workdir", str(workdir / "probe")])
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
