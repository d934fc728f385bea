r"""The entry point for pretraining under any launcher: every process runs this same command.

  python launch/pretrain.py --config configs/pretrain.py:tiny --workdir /tmp/stmem/tiny [--config.FIELD=VALUE ...]
  python launch/pretrain.py --config pretrain:tiny --help       (the presets and keys; the same as `stmem pretrain`)

It joins the distributed system when a multi-process launcher started it (`stmem.distributed.initialize`: explicit
STMEM_* variables, SLURM, Open MPI, Cloud TPU; a no-op for one process), then runs `stmem.programs.pretrain.train`.
Exit status: 0 done (or preempted and checkpointed), 2 a bad command line, 3 non-finite loss. See launch/README.md.
"""
from __future__ import annotations

import json
import pathlib
import sys

# Run as a script from a checkout without installing the package: the repository root holds stmem/ and configs/.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))


def main(argv: list[str]) -> int:
  from data_pipelines.errors import UserError
  from stmem import configflags
  try:  # the same command line as `stmem pretrain` (stmem.configflags): presets by name, --help, ~ expanded
    config, workdir = configflags.parse(argv, "launch/pretrain.py", None)
  except UserError as e:
    print(f"launch/pretrain.py: error: {e}", file=sys.stderr)
    return e.exit_code
  from stmem import distributed
  distributed.initialize()  # before any JAX computation
  import jax

  from stmem.programs import pretrain
  try:
    summary = pretrain.train(config, workdir)
  except pretrain.NonFiniteLoss as e:
    print(f"launch/pretrain.py: {e}", file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  from stmem import hugepages
  hugepages.reexec_if_wanted()  # huge pages for XLA's buffers: see stmem/hugepages.py
  sys.exit(main(sys.argv[1:]))
