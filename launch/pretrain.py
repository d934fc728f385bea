r"""absl-style entry point for pretraining under any launcher: every process runs this same command.

  python launch/pretrain.py --config configs/pretrain.py:tiny --workdir /tmp/stmem/tiny [--config.FIELD=VALUE ...]

It joins the distributed system when a multi-process launcher started it (`stmem.distributed.initialize`: explicit
STMEM_* variables, SLURM, Open MPI, Cloud TPU; a no-op for one process), then runs `stmem.train.pretrain.train`.
Exit status: 0 done (or preempted and checkpointed), 3 non-finite loss. See launch/README.md.
"""
from __future__ import annotations

import json
import pathlib
import sys

# Run as a script from a checkout without installing the package: the repository root holds stmem/ and configs/.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pretrain.py:tiny", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and figures go (shared by every process)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from stmem import distributed
  distributed.initialize()  # before any JAX computation
  import jax

  from stmem.train import pretrain
  try:
    summary = pretrain.train(FLAGS.config, FLAGS.workdir)
  except pretrain.NonFiniteLoss as e:
    print(f"launch/pretrain.py: {e}", file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  from stmem import hugepages
  hugepages.reexec_if_wanted()  # huge pages for XLA's buffers: see stmem/hugepages.py
  app.run(lambda argv: sys.exit(main(argv)))
