"""`stmem demo`: pretrain the tiny ST-MEM on built-in synthetic ECGs, then probe it (no download).

  stmem demo                                  # several minutes on 2 CPU cores; writes workdirs/demo
  stmem demo --workdir /tmp/demo --config.total_steps=50 --config.data.num_synthetic=64 --config.no_probe=True

Runs `stmem pretrain --config pretrain:demo` then `stmem probe --config probe:synthetic` on the pretrained and a
random encoder across lead sets, and says where the checkpoint, metrics, figures and report are.
"""
import ml_collections

PROGRAM = "demo"  # the command this file configures
PRESETS = ("default",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "default"):
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  c.total_steps = 0                    # pretraining steps (0: the demo preset's, 300)
  c.data = ml_collections.ConfigDict()
  c.data.num_synthetic = 0             # synthetic ECGs to pretrain on (0: the demo preset's, 768)
  c.lead_sets = "12,limb6,I+II,I"      # lead sets of the probe
  c.no_probe = False                   # True: pretrain only
  c.bootstrap = 200                    # probe: patient-level bootstrap resamples for the intervals
  return c
