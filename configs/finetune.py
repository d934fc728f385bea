"""Fine-tuning an ST-MEM encoder with a linear head: every parameter trains.

  stmem finetune --config configs/finetune.py:prepared --config.checkpoint=CKPT --config.data_dir=PREPARED \
      --workdir runs/ft
  stmem finetune --config configs/finetune.py:ludb_af --config.checkpoint=CKPT --workdir runs/ft_af
  stmem finetune --config configs/finetune.py:synthetic --workdir runs/ft_scratch     (from scratch: no checkpoint)

The reference recipe is the default: AdamW (0.9, 0.999), weight decay 0.05, lr 1e-3 x batch / 256, warmup + cosine,
RandAugment (2 of 8 ops, p 0.5), model selected on validation loss, no layer-wise decay, drop path or smoothing.
Options: layer_decay (e.g. 0.75), drop_path (e.g. 0.1), label_smoothing, class_weighting="balanced".
The test split is read once, at the end, with the selected model. Writes report.* (same format as the probe),
metrics.jsonl, and the selected model as a checkpoint in WORKDIR/checkpoints (encoder + head in its meta).
"""
import ml_collections

PRESETS = ("prepared", "synthetic", "ludb_af", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "prepared"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  c.checkpoint = ""             # "" = from scratch (random init of config.model)
  c.model = "tiny"
  c.task = "prepared"           # one task name of data_pipelines/labels/tasks.py
  c.data_dir = ""
  c.data_root = "../shared/data"
  c.labels = ""
  c.kind = "multilabel"
  c.lead_set = "12"
  c.batch_size = 32
  c.steps = 2000
  c.warmup_steps = 200
  c.base_lr = 1e-3              # scaled by batch / 256
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.999
  c.clip_norm = 0.0
  c.layer_decay = 1.0           # 1 = none (the reference); 0.75 is common for ViTs
  c.drop_path = 0.0             # stochastic depth rate of the last block (linearly increasing with depth)
  c.label_smoothing = 0.0
  c.class_weighting = "none"    # "none" or "balanced" (inverse class frequency in the training split)
  c.randaugment = True
  c.randaugment_ops = 2
  c.randaugment_prob = 0.5
  c.eval_every = 200
  c.select_on = "loss"          # "loss" (validation loss, the reference) or "auroc"
  c.bootstrap = 1000
  c.eval_batch_size = 32
  c.synthetic_n = 240
  c.seed = 0
  if arg == "synthetic":
    c.task = "synthetic"
    c.kind = "multiclass"
  elif arg == "ludb_af":
    c.task = "ludb_af"
    c.steps = 600
    c.eval_every = 50
  elif arg == "test":
    c.task = "synthetic"
    c.kind = "multiclass"
    c.synthetic_n = 60
    c.batch_size = 8
    c.steps = 6
    c.warmup_steps = 2
    c.eval_every = 3
    c.bootstrap = 50
    c.eval_batch_size = 16
  return c
