r"""The entry point for pretraining under any launcher: every process runs this same command.

  python launch/pretrain.py --config configs/pretrain.py:tiny --workdir /tmp/stmem/tiny [--config.FIELD=VALUE ...]
  python launch/pretrain.py --config pretrain:tiny --help       (the presets and keys; the same as `stmem pretrain`)

It is `stmem pretrain` for a checkout that is not installed: it runs that command (`stmem.programs.run`), which joins
the distributed system when a multi-process launcher started it (`stmem.distributed.initialize`: explicit STMEM_*
variables, SLURM, Open MPI, Cloud TPU; a no-op for one process) and pretrains. Exit status: 0 done, 75 preempted by
SIGTERM after saving a checkpoint (run the same command to resume; launch/slurm.sbatch requeues on it), 130 stopped
by Ctrl-C after saving, 2 a bad command line, 3 non-finite loss (stmem/entry.py lists them). See launch/README.md.
"""
from __future__ import annotations

import pathlib
import sys

# Run as a script from a checkout without installing the package: the repository root holds stmem/ and configs/.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))


def main(argv: list[str]) -> int:
  from stmem import programs
  return programs.run(["pretrain", *argv])


if __name__ == "__main__":
  from stmem import hugepages
  hugepages.reexec_if_wanted()  # huge pages for XLA's buffers: see stmem/hugepages.py
  sys.exit(main(sys.argv[1:]))
