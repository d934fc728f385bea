"""Probes of a frozen ST-MEM encoder, swept over lead sets, blocks and heads, with a random-encoder baseline in every
report.

  stmem download ludb && stmem download cinc2021 --sources georgia    (once: into ~/stmem_data, or $STMEM_DATA)
  stmem probe --config configs/probe.py:shared --config.init_from=CKPT --workdir runs/probe_shared
      LUDB AF/flutter, LVH and electric axis + CinC sinus tachycardia, read raw from the data root (~/stmem_data,
      $STMEM_DATA, or --config.data.records=DIR: the folder holding ludb/ and cinc2021/), 5-fold patient-grouped
      cross-validation, 7 lead sets, linear and MLP heads. A tiny model on LUDB and 50 CinC records took about 3
      minutes on a 2-core CPU with the linear head alone (--config.heads=linear); the MLP head adds fits of its own,
      and the time grows with the records downloaded.
  stmem probe --config configs/probe.py:ludb --config.init_from=CKPT --workdir DIR      (after `stmem download ludb`)
  stmem probe --config configs/probe.py:prepared --config.init_from=CKPT --config.data.data_dir=PREPARED --workdir DIR
      a prepared dataset (`stmem prepare`): its train/validation/test splits, or cross-validation if it has one split.
  stmem probe --config configs/probe.py:synthetic --workdir DIR     (no init_from: random-encoder rows only)

Lead sets: named (12, limb6, precordial6, limb3, I, II, V1, I+II, I+II+V2) or any '+'-joined list of lead names in
any order (`--config.lead_sets=12,V2+I+aVF`); each slot is fed by lead name, never by position.

Blocks (`--config.blocks`, comma-separated, each probed separately; all from one forward pass per batch):
  last   the encoder's own pooled features, after its last block (the default)
  K      after block K, numbered from 1 (the first) to the model's depth (12 for small and base, 2 for tiny)
  A-B    the mean of the pooled features of blocks A to B, both included (e.g. 4-8)
  mid    the middle block, (depth + 1) // 2 (block 6 of 12)
  e.g. `--config.blocks=last,mid,4-8`. A block is pooled as the last one is (mean over the patch tokens of the
  present leads), then put through the encoder's final LayerNorm.
Heads (`--config.heads`, comma-separated): `linear` (logistic regression, L2 from `l2_grid` chosen on validation)
and `mlp` (one hidden layer of `mlp_hidden` GELU units trained with Adam for `mlp_steps` full-batch steps; its L2
from `mlp_l2_grid` and its length of training, one of `mlp_snapshots` evenly spaced step counts, chosen on
validation). Both are scored on the same folds with the same bootstrap; the MLP is deterministic from `seed`.
Writes report.md / report.csv / report.json, auroc_<task>.png and roc_<task>.png into the workdir.
"""
import os

import ml_collections

PROGRAM = "probe"  # the command this file configures
PRESETS = ("shared", "ludb", "cinc", "prepared", "synthetic", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "shared"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  data_root = os.environ.get("STMEM_DATA") or "~/stmem_data"  # where `stmem download` puts datasets
  c.init_from = ""              # a stmem checkpoint (workdir, checkpoints/ folder or step folder); "" = random only
  c.model = ml_collections.ConfigDict()
  c.model.variant = "tiny"      # architecture of the random encoder when there is no init_from
  c.tasks = "ludb_af,ludb_lvh,ludb_axis,cinc_stach"  # comma-separated task names
  c.data = ml_collections.ConfigDict()
  c.data.records = data_root    # raw tasks (ludb_*, cinc_*): the folder holding ludb/, cinc2021/ (stmem download)
  c.data.lead_map = ""          # raw tasks: rename file channels to standard leads, e.g. ECG=I (as `stmem prepare`)
  c.data.data_dir = ""          # prepared dataset for the `prepared` task
  c.data.num_synthetic = 240    # synthetic task: number of simulated records
  c.labels = ""                 # comma-separated label names of a prepared dataset ("" = all)
  c.kind = "multilabel"         # prepared task: "multilabel" (sigmoid per class) or "multiclass" (softmax)
  c.lead_sets = "12,limb6,precordial6,I,II,I+II,I+II+V2"  # comma-separated lead sets, each probed separately
  c.use_splits = True           # use the data's train/validation/test splits when it has them
  c.cv_folds = 5                # otherwise patient-grouped K-fold: test fold k, validation fold k+1, train the rest
  c.blocks = "last"             # block specs probed (see above): last, K, A-B, mid; comma-separated
  # Heads probed: "linear", "mlp" or "linear,mlp". Linear only here (and so in the tiny presets and in the probe that
  # pretraining runs unless asked): an MLP fit costs as much as the linear one or more on a 2-core CPU. The shared
  # preset, the figures people compare with published ones, runs both.
  c.heads = "linear"
  # L2 penalties tried for each linear head; the best on validation is kept
  c.l2_grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
  c.lbfgs_steps = 100           # L-BFGS iterations per logistic-regression fit
  c.mlp_hidden = 256            # hidden GELU units of the MLP head
  c.mlp_l2_grid = (1e-3, 1e-2, 0.1)  # L2 penalties tried for each MLP head (on both weight matrices)
  c.mlp_steps = 200             # full-batch Adam steps per MLP fit
  c.mlp_snapshots = 4           # step counts kept (every mlp_steps / mlp_snapshots): early stopping on validation
  c.mlp_lr = 1e-2               # Adam learning rate of the MLP head
  c.select_on = "auroc"         # "auroc" or "loss" on validation
  c.random_baseline = True      # rows for the same architecture, randomly initialised
  c.random_seed = 1234          # initialisation of the random-encoder baseline
  c.bootstrap = 1000            # patient-level resamples for the 95 % intervals
  c.batch_size = 32             # records per batch (x3 evaluation crops), over all devices (rounded up to them)
  c.mesh = "data:-1"            # device mesh of the feature pass: each batch split over every device and process
  c.num_devices = 0             # 0: every device; k: the first k (single-process runs only)
  c.seed = 0                    # folds, bootstrap and synthetic data
  if arg == "shared":
    c.heads = "linear,mlp"
  elif arg == "ludb":
    c.tasks = "ludb_af,ludb_lvh,ludb_axis"
  elif arg == "cinc":
    c.tasks = "cinc_stach"
  elif arg == "prepared":
    c.tasks = "prepared"
  elif arg == "synthetic":
    c.tasks = "synthetic"
    # The simulator's test split holds about a tenth of its patients (about 15 of 240 records): too few to score six
    # classes. Patient-grouped cross-validation scores every record once, by a head that never saw its patient.
    c.use_splits = False
  elif arg == "test":
    c.lead_sets = "12,I"
    c.bootstrap = 200
    c.lbfgs_steps = 30
    c.l2_grid = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
  return c
