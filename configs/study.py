r"""Does pretraining learn? ST-MEM, MTAE and MLAE pretrained alike, then probed beside random encoders.

  stmem download ludb && stmem download cinc2021 --sources georgia    # once: the probes' records (~/stmem_data)
  stmem study --config configs/study.py:cpu --workdir /tmp/study      # the committed study (docs/study/)
  stmem study --config configs/study.py:smoke --workdir /tmp/smoke    # CI: a few steps, one seed, synthetic probe
  # any field: --config.seeds=0 --config.pretrain.total_steps=500 --config.probe.lead_sets=12,I

For each method and seed the study runs `stmem pretrain` (configs/pretrain.py, preset `pretrain_preset`, with the
overrides under `pretrain`: the same steps, batch and learning-rate policy for every method), scores the held-out
reconstruction loss of every saved checkpoint on simulator ECGs the run never saw, beside the patch-mean baseline
(predicting zero in norm-pix units) and the clean-signal floor (predicting the noise-free patches), then runs
`stmem probe` (configs/probe.py, preset `probe.preset`) on each checkpoint; the first seed's probe also scores the
random-initialised encoder of that method. Writes report.md / report.csv / report.json and figures into the workdir.

The plateau (what `docs/study/README.md` measured, "Making short runs learn"): the tiny model drops from ~2.4 to
~0.987, the loss of predicting each patch's mean (zero in norm-pix units), within ~50 steps and stays there for
hundreds of steps. It is not the noise: the simulator's clean-signal floor is 0.098 for ST-MEM's 75-sample patches
(0.012 for MTAE's, 0.006 for MLAE's tokens), so over 0.88 of the plateau is learnable shape. A 3x higher learning rate
(3e-3) did not leave it sooner (0.982 vs 0.977 at step 500, batch 16); with lr 1e-3 the tiny preset left it only in
runs whose cosine schedule kept the rate high past step ~900 (0.90 by step 900 of a 2,000-step run). Hence `cpu`
keeps lr 1e-3 with a short warmup and gives every method 1,500 steps at batch 32 (twice the examples per step).
Measured (docs/study/README.md): the same preset for 5,000 steps takes ST-MEM to 0.582 at step 3,000 and 0.546 at
5,000: the 1,500-step budget, not the schedule, leaves it at 0.84. Cost: `cpu` took 88 min wall on a 2-core AMD EPYC
shared with another run (about 40 min idle, from 488 s per 1,500-step ST-MEM run alone); `smoke` for CI.
"""
import os

import ml_collections

PROGRAM = "study"  # the command this file configures
PRESETS = ("cpu", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "cpu"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  data_root = os.environ.get("STMEM_DATA") or "~/stmem_data"  # where `stmem download` puts datasets
  c.methods = "stmem,mtae,mlae"   # comma-separated model.method values
  c.seeds = "0,1,2"               # pretraining seeds per method (the spread is reported)
  c.pretrain_preset = "tiny"      # the configs/pretrain.py preset the overrides below apply to

  # Overrides of the pretraining config, identical for every method: the fixed compute budget.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.total_steps = 1500
  c.pretrain.batch_size = 32
  c.pretrain.warmup_steps = 100
  c.pretrain.optim = ml_collections.ConfigDict()
  c.pretrain.optim.base_lr = 1e-3 * 256 / 32   # learning rate 1e-3 at batch 32 (lr = base_lr x batch / 256)
  c.pretrain.data = ml_collections.ConfigDict()
  c.pretrain.data.num_synthetic = 2048         # simulator records (the study's pretraining data)
  c.pretrain.checkpoint = ml_collections.ConfigDict()
  c.pretrain.checkpoint.every = 300            # each saved step is a point of the held-out loss curve
  c.pretrain.checkpoint.keep = 100
  c.pretrain.log_every = 25

  # Held-out reconstruction loss: simulator records from another seed, a fixed masking key.
  c.heldout = ml_collections.ConfigDict()
  c.heldout.data = ml_collections.ConfigDict()
  c.heldout.data.num_synthetic = 256
  c.heldout.seed = 10_000
  c.heldout.batch_size = 32

  # The probe of every checkpoint (and, once per method, of its random-initialised twin).
  c.probe = ml_collections.ConfigDict()
  c.probe.preset = "shared"                     # LUDB AF / LVH / axis and CinC sinus tachycardia, raw records
  c.probe.tasks = "ludb_af,ludb_lvh,ludb_axis,cinc_stach,ludb_sex"  # every task the shared recordings support
  c.probe.lead_sets = "12,limb6,I+II,I"         # MTAE / MLAE are probed on '12' only (they need all 12 leads)
  c.probe.data = ml_collections.ConfigDict()
  c.probe.data.records = data_root             # the folder holding ludb/ and cinc2021/ (`stmem download`)
  c.probe.use_splits = False                   # patient-grouped CV over every record, even where the data has splits
  c.probe.cv_folds = 5
  c.probe.bootstrap = 1000

  if arg == "smoke":
    c.methods, c.seeds = "stmem,mtae,mlae", "0"
    c.pretrain.total_steps, c.pretrain.batch_size, c.pretrain.warmup_steps = 4, 8, 1
    c.pretrain.optim.base_lr = 1e-3 * 256 / 8
    c.pretrain.data.num_synthetic = 32
    c.pretrain.checkpoint.every, c.pretrain.log_every = 4, 2
    c.heldout.data.num_synthetic, c.heldout.batch_size = 16, 8
    c.probe.preset, c.probe.tasks, c.probe.lead_sets = "synthetic", "synthetic", "12,I"
    c.probe.cv_folds, c.probe.bootstrap = 3, 20
    c.probe.data.num_synthetic, c.probe.lbfgs_steps = 48, 20
  return c
