r"""`stmem plan`: compile a pretraining config ahead of time and say whether it fits, before paying for a run.

  stmem plan --config configs/pretrain.py:base --topology v5e:4x4                 # a TPU pod slice, from any host
  stmem plan --config configs/pretrain.py:large --topology v4:2x2x1 --config.mesh=data:2,fsdp:2
  stmem plan --config configs/pretrain.py:base --topology local --config.memory_budget_gb=74.5  # one 80 GB GPU
  stmem plan --config configs/pretrain.py:tiny --topology v5e:2x2 --json plan.json --no-fit
  stmem plan --config pretrain:base --topology v5e:4x4 --programs finetune       # fine-tune what you pretrain
  stmem plan --config finetune:prepared --config.model.variant=base --config.batch_size=256 --topology v5e:2x2

Prints one table line per compiled program (per device: argument, output, temporary and total bytes against the
chip's memory or --config.memory_budget_gb; analytic FLOPs per step and XLA's per-device count; collective bytes;
the verdict) and, when the step as configured does not fit, the smallest accum_steps and remat that does, with
the flags to pass to `stmem pretrain`. TPU topologies need the TPU compiler: `pip install 'stmem[tpu]'`.
Options besides --config: --topology (local or a TPU topology name; default local), --programs (any of pretrain,
embed, finetune; default pretrain,embed for a pretraining config, finetune for a fine-tuning config: the config
file says which it is, by its PROGRAM), --classes N
(outputs of the planned fine-tuning head; default 5), --json FILE (every report), --no-fit (compile the config as
it is; no search). A pretraining config plans its fine-tuning with configs/finetune.py's defaults (batch 32,
rounded up to the devices) at its model and mesh; plan a fine-tuning config for another batch.
"""
from __future__ import annotations

import json
import sys

from stmem import memory_plan as plan_lib

USAGE = ("usage: stmem plan --config FILE:PRESET [--config.KEY=VALUE ...] [--topology local|v5e:4x4|...] "
         "[--programs pretrain,embed,finetune] [--classes N] [--json FILE] [--no-fit]")


def _take(argv: list[str], name: str, default=None):
  """Remove `--name=value` or `--name value` from argv; return the value."""
  for i, arg in enumerate(argv):
    if arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
      del argv[i:i + 2]
      return value
    if arg.startswith(f"--{name}="):
      del argv[i]
      return arg.split("=", 1)[1]
  return default


def finetune_settings(config, program: str):
  """(fine-tuning config, model config, leads) to plan. `config` itself when it is a fine-tuning config
  (configs/finetune.py: the architecture of its `init_from`, else `model.variant`); for a pretraining config, the
  fine-tuning defaults (their batch, rounded up to a multiple of the devices) applied to its model, mesh and FSDP
  threshold: "fine-tune what I pretrain here". A pretraining batch (2048) is far above any fine-tuning batch."""
  from data_pipelines import leads
  from stmem import checkpoint, models, steps
  if program == "finetune":
    if config.init_from:
      cfg = checkpoint.model_config_from_meta(checkpoint.read_meta(config.init_from)[0])
    else:
      cfg = models.model_config(config.model.variant)
    return config, cfg, len(leads.parse_lead_set(config.data.lead_set))
  from configs import finetune as finetune_configs
  ft = finetune_configs.get_config()
  ft.mesh, ft.fsdp_min_size = config.mesh, int(config.fsdp_min_size)
  ft.num_devices = int(config.get("num_devices") or 0)
  return ft, steps.model_cfg(config), 12


def main(argv: list[str]) -> int:
  argv = list(argv)
  if any(a in ("-h", "--help", "-help") for a in argv):
    print(__doc__.strip() + "\n\n" + USAGE)
    return 0
  topology = _take(argv, "topology", "local")
  programs = _take(argv, "programs")
  classes = _take(argv, "classes", "5")
  json_path = _take(argv, "json")
  search = "--no-fit" not in argv
  argv = [a for a in argv if a != "--no-fit"]
  from stmem import configflags
  config, _ = configflags.parse(argv, "stmem plan", None, workdir=None, programs=("pretrain", "finetune"))
  program = configflags.program(argv)  # which program the config file is for: its PROGRAM, or the file's name
  if program not in ("pretrain", "finetune"):
    print(f"stmem plan: the config is for `stmem {program}` (its PROGRAM, or its file's name); plan a pretraining or "
          f"a fine-tuning config (a file of your own: declare PROGRAM = \"pretrain\" or \"finetune\" in it)",
          file=sys.stderr)
    return 2
  is_pretrain_config = program == "pretrain"
  programs = [p for p in (programs or ("pretrain,embed" if is_pretrain_config else "finetune")).split(",") if p]
  known = ("pretrain", "embed", "finetune") if is_pretrain_config else ("finetune",)
  unknown = sorted(set(programs) - set(known))
  if unknown:
    print(f"stmem plan: cannot plan {unknown} from this config; choose from {', '.join(known)}"
          + ("" if is_pretrain_config else " (a fine-tuning config; pass a pretraining config for the others)"),
          file=sys.stderr)
    return 2
  if not classes.isdigit() or int(classes) < 1:
    print(f"stmem plan: --classes {classes!r} is not a positive number of outputs", file=sys.stderr)
    return 2
  budget_gb = float(config.get("memory_budget_gb", 0.0) or 0.0)
  try:
    devices = plan_lib.devices_for(topology)
  except ValueError as e:
    print(f"stmem plan: {e}", file=sys.stderr)
    return 2

  reports, chosen, others = [], None, []
  log = lambda r: print(plan_lib.table([r]).splitlines()[1], file=sys.stderr, flush=True)  # noqa: E731
  if "pretrain" in programs:
    if search:
      chosen, tried = plan_lib.fit(config, devices, topology=topology, budget_gb=budget_gb, log=log)
      reports += tried
    else:
      chosen = plan_lib.pretrain_report(config, devices, topology=topology, budget_gb=budget_gb)
      reports.append(chosen)
  if "embed" in programs:
    others.append(plan_lib.embed_report(config, devices, topology=topology, budget_gb=budget_gb))
  if "finetune" in programs:
    ft, cfg, leads = finetune_settings(config, program)
    if is_pretrain_config:  # the fine-tuning batch, rounded up to a multiple of the devices it is split over
      n = min(int(ft.num_devices) or len(devices), len(devices))
      ft.batch_size = -(-int(ft.batch_size) // n) * n
    others.append(plan_lib.finetune_report(ft, cfg, leads, devices, topology=topology, budget_gb=budget_gb,
                                           num_classes=int(classes)))
  reports += others
  print(plan_lib.table(reports))
  if chosen is not None:
    print(_advice(config, chosen))
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"topology": topology, "reports": [r.to_dict() for r in reports],
                 "chosen": None if chosen is None else chosen.to_dict()}, f, indent=2)
  for r in others:
    if r.fits is False:
      print(f"{r.program} does not fit in {r.budget_bytes / plan_lib.GiB:.2f} GiB per device at batch "
            f"{r.batch_size}: use more devices, FSDP (--config.mesh=data:-1,fsdp:N) or a smaller batch")
  return 1 if any(r is not None and r.fits is False for r in [chosen, *others]) else 0


def _advice(config, chosen: plan_lib.Report) -> str:
  gib = lambda v: f"{v / plan_lib.GiB:.2f} GiB"  # noqa: E731
  if chosen.fits is None:
    return (f"pretrain: {gib(chosen.total_bytes)} per device; no device memory is known here (a CPU), so no verdict: "
            f"state one with --config.memory_budget_gb")
  if not chosen.fits:
    return (f"pretrain does not fit in {gib(chosen.budget_bytes)} per device even with accum_steps "
            f"{chosen.accum_steps} and remat {chosen.remat}: use more devices (--topology), FSDP "
            f"(--config.mesh=data:-1,fsdp:N) or a smaller batch")
  flags = []
  if chosen.accum_steps != int(config.optim.accum_steps or 1):
    flags.append(f"--config.optim.accum_steps={chosen.accum_steps}")
  if chosen.remat != config.model.get("remat", "none"):
    flags.append(f"--config.model.remat={chosen.remat}")
  return (f"pretrain fits: {gib(chosen.total_bytes)} of {gib(chosen.budget_bytes)} per device with accum_steps "
          f"{chosen.accum_steps}, remat {chosen.remat}" + (f"; pass {' '.join(flags)}" if flags else ""))
