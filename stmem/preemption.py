"""How every training program stops: on SIGTERM (a preempted VM, a scheduler's notice) and on a diverged loss.

Shared by `stmem pretrain` and `stmem finetune`, so that a program never imports another program for it.
"""
from __future__ import annotations

import threading

import jax
import numpy as np


class NonFiniteLoss(FloatingPointError):
  """The training loss became NaN or infinite; the programs exit with status 3 and never save the diverged state."""


def main_thread() -> bool:
  """Signal handlers can be installed only from the main thread (tests run programs in others)."""
  return threading.current_thread() is threading.main_thread()


def stop_requested(local_flag: bool) -> bool:
  """Every process stops at the same step: a SIGTERM seen by any process stops all of them. Called only at
  log/checkpoint steps: with several processes it is a collective."""
  if jax.process_count() == 1:
    return local_flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(local_flag))))
