r"""Does pretraining learn? ST-MEM, MTAE and MLAE pretrained alike, then probed beside random encoders.

  stmem download ludb && stmem download cinc2021 --sources georgia    # once: the probes' records (~/stmem_data)
  stmem study --config configs/study.py:cpu --workdir /tmp/study      # the committed study (docs/study/)
  # the same on simulator ECGs mixed with real unlabeled recordings (none of them a record the probes score):
  stmem study --config study:cpu --workdir /tmp/study_mix \
      --config.pretrain.data.sources=synthetic=0.8,raw:generic=0.2 --config.pretrain.data.records=~/my_ecgs
  stmem study --config configs/study.py:smoke --workdir /tmp/smoke    # CI: a few steps, one seed, synthetic probe
  # any field: --config.seeds=0 --config.pretrain.total_steps=500 --config.probe.lead_sets=12,I
  # again in the same workdir (e.g. --config.seeds=0,1,2 after seed 0): finished runs and probes are not redone

For each method and seed the study runs `stmem pretrain` (configs/pretrain.py, preset `pretrain_preset`, with the
overrides under `pretrain`: the same steps, batch and learning-rate policy for every method), scores the held-out
reconstruction loss of every saved checkpoint on simulator ECGs the run never saw, beside the patch-mean baseline
(predicting zero in norm-pix units) and the clean-signal floor (predicting the noise-free patches), then runs
`stmem probe` (configs/probe.py, preset `probe.preset`) on each final checkpoint; the first seed's probe also scores
the random-initialised encoder of that method. Writes report.md / report.csv / report.json and figures into the
workdir. Before any run it refuses recordings mixed into pretraining that the probes score (unless
pretrain.data.allow_overlap), and runs already in the workdir that were trained under other pretraining options.

The budget is `pretrain:cpu`, the CPU recipe: the tiny model, 6,400 steps at batch 8, learning rate 1e-3, about 30
minutes of 2 CPU cores per run (docs/study/README.md has the measured times and losses). Short runs first sit on a
plateau: the loss drops from ~2.4 to ~0.987, the loss of predicting each patch's mean (zero in norm-pix units),
within ~50 steps and stays there for hundreds of steps. It is not the noise: the clean-signal floor of simulator 2 is
0.123 for ST-MEM's 75-sample patches. Leaving it takes a count of updates more than of examples, hence batch 8.
"""
import os

import ml_collections

from configs import pretrain as pretrain_configs

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
  c.pretrain_preset = "cpu"       # the configs/pretrain.py preset (the fixed compute budget) the overrides apply to

  # Overrides of the pretraining preset, identical for every method. The budget is the cpu preset's, copied here so
  # that the report names it and a command line can change it (--config.pretrain.total_steps=...).
  budget = pretrain_configs.get_config("cpu")
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.total_steps = budget.total_steps
  c.pretrain.batch_size = budget.batch_size
  c.pretrain.warmup_steps = budget.warmup_steps
  c.pretrain.optim = ml_collections.ConfigDict()
  c.pretrain.optim.base_lr = budget.optim.base_lr  # learning rate = base_lr x batch_size / 256
  c.pretrain.data = ml_collections.ConfigDict()
  c.pretrain.data.num_synthetic = budget.data.num_synthetic  # simulator records (the study's pretraining data)
  c.pretrain.data.sources = ""                 # "" the simulator alone; e.g. synthetic=0.8,raw:generic=0.2 mixes in
  c.pretrain.data.records = ""                 # the folder of unlabeled recordings that raw:generic reads
  c.pretrain.data.allow_overlap = False        # True: let the probes score recordings pretraining trains on
  c.pretrain.checkpoint = ml_collections.ConfigDict()
  c.pretrain.checkpoint.every = 800            # each saved step is a point of the held-out loss curve
  c.pretrain.checkpoint.keep = 100

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
