"""The `stmem` command: parses the subcommand, then hands the rest of the command line to a program.

No logic lives here; each subcommand is a `main(argv) -> int` somewhere else, imported only when asked for so that
`stmem --help` stays fast.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
  "demo": ("stmem.train.demo", "pretrain a tiny model on built-in synthetic ECGs, then probe it (no download)"),
  "prepare": ("data_pipelines.prepare", "build a sharded ArrayRecord dataset from downloaded ECG files"),
  "overlap": ("data_pipelines.overlap", "report records shared between two prepared datasets"),
  "pretrain": ("stmem.train.pretrain", "ST-MEM pretraining (--config configs/pretrain.py:PRESET --workdir DIR)"),
  "probe": ("stmem.train.probe", "linear probe of a frozen encoder across lead sets"),
  "finetune": ("stmem.train.finetune", "fine-tune an encoder with a classification head"),
  "embed": ("stmem.train.embed", "export pooled / per-lead / per-patch embeddings"),
  "convert": ("stmem.train.convert", "import reference ST-MEM weights (.pth / .npz) into a stmem checkpoint"),
  "export": ("stmem.train.export", "export an encoder to safetensors with a model card"),
  "bench": ("benchmarks.suite", "speed and memory benchmarks, printed as JSON"),
  "study": ("stmem.train.study", "pretrain ST-MEM, MTAE and MLAE alike, then probe them beside random encoders"),
  "forward-check": ("stmem.train.forward_check", "one forward/backward pass of a model variant on generated input"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: stmem COMMAND [options]   (stmem COMMAND --help for a command's options)", "", "commands:"]
  lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"stmem: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module_name = COMMANDS[name][0]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      print(f"stmem {name}: not available in this version ({module_name} is missing)", file=sys.stderr)
      return 2
    raise
  return int(module.main(rest) or 0)


def run() -> None:
  """The console script: first the process-level allocator setting (`stmem.hugepages`), then the command."""
  from stmem import hugepages
  hugepages.reexec_if_wanted()
  sys.exit(main())


if __name__ == "__main__":
  run()
