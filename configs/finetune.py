"""Fine-tuning an ST-MEM encoder with a linear head: every parameter trains.

  stmem finetune --config finetune:prepared --config.init_from=CKPT --config.data.data_dir=PREPARED --workdir runs/ft
  stmem finetune --config finetune:ludb_af --config.init_from=CKPT --workdir runs/ft_af
      (LUDB from the data root: `stmem download ludb` puts it in ~/stmem_data, or $STMEM_DATA; or pass
      --config.data.records=DIR, the folder holding ludb/)
  stmem finetune --config finetune:synthetic --workdir runs/ft_scratch     (from scratch: no init_from)
  # on 8 devices, or several processes (launch/): the batches are split over every device of every process

The reference recipe is the default: AdamW (0.9, 0.999), weight decay 0.05, lr 1e-3 x batch / 256, warmup + cosine,
RandAugment (2 of 8 ops, p 0.5), model selected on validation loss, no layer-wise decay, drop path or smoothing.
Options: optim.layer_decay (e.g. 0.75), drop_path (e.g. 0.1), label_smoothing, class_weighting="balanced".
The test split is read once, at the end, with the selected model. Writes report.* (same format as the probe),
metrics.jsonl (and TensorBoard), the training state at every evaluation in WORKDIR/train_state (params, optimiser,
data iterator, best-so-far model; the same command resumes from it, also after SIGTERM), and the selected model as a
checkpoint in WORKDIR/checkpoints (encoder + head in its meta).
"""
import os

import ml_collections

PROGRAM = "finetune"  # the command this file configures
PRESETS = ("prepared", "synthetic", "ludb_af", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "prepared"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  data_root = os.environ.get("STMEM_DATA") or "~/stmem_data"  # where `stmem download` puts datasets
  c.init_from = ""              # the encoder to fine-tune; "" = from scratch (random init of model.variant)
  c.model = ml_collections.ConfigDict()
  c.model.variant = "tiny"      # architecture when training from scratch
  c.task = "prepared"           # one task name of data_pipelines/labels/tasks.py (prepared, synthetic, ludb_af, ...)
  c.labels = ""                 # prepared task: comma-separated label names ("" = all)
  c.kind = "multilabel"         # prepared task: "multilabel" (sigmoid per class) or "multiclass" (softmax)

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""          # prepared task: a `stmem prepare` output
  c.data.records = data_root    # named tasks: the folder holding ludb/, cinc2021/ (as `stmem download` writes)
  c.data.lead_map = ""          # raw tasks: rename file channels to standard leads, e.g. ECG=I (as `stmem prepare`)
  c.data.num_synthetic = 240    # synthetic task: number of simulated records
  c.data.lead_set = "12"        # lead slots fed to the encoder, by name

  c.batch_size = 32             # global training batch, over all devices and processes (a multiple of the devices)
  c.total_steps = 2000          # optimiser steps
  c.warmup_steps = 200          # linear warm-up steps before the cosine decay

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1e-3        # scaled by batch / 256
  c.optim.weight_decay = 0.05   # AdamW decoupled weight decay
  c.optim.b1 = 0.9              # AdamW first-moment decay
  c.optim.b2 = 0.999            # AdamW second-moment decay
  c.optim.clip_norm = 0.0       # global gradient-norm clipping (0: none)
  c.optim.layer_decay = 1.0     # 1 = none (the reference); 0.75 is common for ViTs

  c.drop_path = 0.0             # stochastic depth rate of the last block (linearly increasing with depth)
  c.label_smoothing = 0.0       # label smoothing of the training targets
  c.class_weighting = "none"    # "none" or "balanced" (inverse class frequency in the training split)
  c.randaugment = True          # RandAugment on training crops
  c.randaugment_ops = 2         # RandAugment: operations per ECG
  c.randaugment_prob = 0.5      # RandAugment: probability of each operation
  c.eval_every = 200            # validate (and save the training state) every N steps
  c.select_on = "loss"          # "loss" (validation loss, the reference) or "auroc"
  c.bootstrap = 1000            # patient-level bootstrap resamples for the test intervals
  c.eval_batch_size = 32        # records per evaluation batch (x3 crops), over all devices (rounded up to them)
  c.seed = 0                    # head init, data order, augmentation, drop path
  c.mesh = "data:-1,fsdp:1"     # axis:size pairs; -1 takes the remaining devices
  c.num_devices = 0             # 0: every device; k: the first k (single-process runs only)
  c.fsdp_min_size = 2 ** 14     # arrays smaller than this are replicated

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2         # training checkpoints kept in WORKDIR/train_state
  c.checkpoint.async_save = True  # write training checkpoints in the background
  if arg == "synthetic":
    c.task = "synthetic"
    c.kind = "multiclass"
  elif arg == "ludb_af":
    c.task = "ludb_af"
    c.total_steps = 600
    c.eval_every = 50
  elif arg == "test":
    c.task = "synthetic"
    c.kind = "multiclass"
    c.data.num_synthetic = 120   # 12 validation records under the 80/10/10 patient split
    c.batch_size = 8
    c.total_steps = 6
    c.warmup_steps = 2
    c.eval_every = 3
    c.bootstrap = 50
    c.eval_batch_size = 16
  return c
