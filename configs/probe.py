"""Linear probe of a frozen ST-MEM encoder, swept over lead sets, with a random-encoder baseline in every report.

  stmem download ludb && stmem download cinc2021 --sources georgia    (once: into ~/stmem_data, or $STMEM_DATA)
  stmem probe --config configs/probe.py:shared --config.init_from=CKPT --workdir runs/probe_shared
      LUDB AF/flutter, LVH and electric axis + CinC sinus tachycardia, read raw from the data root (~/stmem_data,
      $STMEM_DATA, or --config.data.records=DIR: the folder holding ludb/ and cinc2021/), 5-fold patient-grouped
      cross-validation, 7 lead sets. A tiny model on LUDB and 50 CinC records took about 3 minutes on a 2-core CPU;
      the time grows with the records downloaded.
  stmem probe --config configs/probe.py:ludb --config.init_from=CKPT --workdir DIR      (after `stmem download ludb`)
  stmem probe --config configs/probe.py:prepared --config.init_from=CKPT --config.data.data_dir=PREPARED --workdir DIR
      a prepared dataset (`stmem prepare`): its train/validation/test splits, or cross-validation if it has one split.
  stmem probe --config configs/probe.py:synthetic --workdir DIR     (no init_from: random-encoder rows only)

Lead sets: named (12, limb6, precordial6, limb3, I, II, V1, I+II, I+II+V2) or any '+'-joined list of lead names in
any order (`--config.lead_sets=12,V2+I+aVF`); each slot is fed by lead name, never by position.
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
  c.last_blocks = 0             # 0: the pooled features; k: mean over the last k blocks
  # L2 penalties tried for each head; the best on validation is kept
  c.l2_grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
  c.lbfgs_steps = 100           # L-BFGS iterations per logistic-regression fit
  c.select_on = "auroc"         # "auroc" or "loss" on validation
  c.random_baseline = True      # rows for the same architecture, randomly initialised
  c.random_seed = 1234          # initialisation of the random-encoder baseline
  c.bootstrap = 1000            # patient-level resamples for the 95 % intervals
  c.batch_size = 32             # records per batch (x3 evaluation crops), over all devices (rounded up to them)
  c.mesh = "data:-1"            # device mesh of the feature pass: each batch split over every device and process
  c.num_devices = 0             # 0: every device; k: the first k (single-process runs only)
  c.seed = 0                    # folds, bootstrap and synthetic data
  if arg == "ludb":
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
