"""How every training program stops: on SIGTERM (a preempted VM, a scheduler's notice) or Ctrl-C, and on a diverged
loss.

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


def stop_requested(local_signal: int) -> int:
  """Every process stops at the same step: a SIGTERM or SIGINT seen by any process stops all of them. Takes the
  signal this process received (0: none) and returns the one agreed on (0: go on), the largest number, so that a
  SIGTERM (15: preempted) outranks a Ctrl-C (2) and every process exits alike. Called only at log/checkpoint steps:
  with several processes it is a collective."""
  if jax.process_count() == 1:
    return int(local_signal)
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray(int(local_signal), np.int32))))
