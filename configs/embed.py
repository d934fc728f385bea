"""`stmem embed`: pooled, per-lead and (optionally) per-patch embeddings of a frozen encoder.

  stmem embed --config embed --config.init_from=CKPT --config.data.data_dir=PREPARED --config.data.split=test \
      --config.out=runs/emb/test
  stmem embed --config embed --config.init_from=CKPT --config.data.records=~/stmem_data/ludb \
      --config.out=runs/emb/ludb --config.per_patch=True --config.data.lead_set=limb6
  # top-level and data keys also as plain options: stmem embed --init_from CKPT --records DIR --out PREFIX --per_patch

Writes OUT.npz and OUT.parquet: pooled (N, D), per_lead (N, L, D) and with per_patch per_patch (N, L, 30, D), record
and patient ids, lead names, the lead mask (the per-lead and per-patch rows of a lead a record lacks, or whose
flat signal was masked, are NaN), the checkpoint's fingerprint and contract. Every record is written once,
whatever the number of devices or processes (the batches are sharded over the mesh; process 0 writes).
Crops: `first` (default) embeds the first window of 2250 samples (9 s at 250 Hz) of each record's first 10 s;
`mean3` averages the embeddings of the 3 evaluation crops (0, 0.5 and 1 s), as the probe does.
The output never sits whole in memory: rows are written every batch (Parquet row groups; memory-mapped .npy files
zipped at the end). A raw folder is read into memory first: `stmem prepare` a large one and embed that.
"""
import ml_collections

PROGRAM = "embed"  # the command this file configures
PRESETS = ("default", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose from {PRESETS}")
  c = ml_collections.ConfigDict()
  c.init_from = ""         # the encoder: a stmem checkpoint (workdir, its checkpoints/ folder or a step folder)
  c.data = ml_collections.ConfigDict()
  c.data.source = ""       # "prepared", "raw" or "synthetic"; "": the one of data_dir, records, num_synthetic given
  c.data.data_dir = ""     # a prepared dataset (`stmem prepare` output); give it, records or num_synthetic
  c.data.records = ""      # a folder of raw WFDB records (searched recursively)
  c.data.num_synthetic = 0  # N simulated ECGs (stmem.synthetic); 0: none
  c.data.name = ""         # prepared: the dataset under data_dir; raw: the builder reading records ("": generic)
  c.data.split = "test"    # prepared dataset: the split to embed
  c.data.lead_set = "12"   # lead slots fed to the encoder, by name (12, limb6, I+II, V2+I+aVF, ...)
  c.data.lead_map = ""     # raw records: rename file channels to standard leads, e.g. ECG=I (as `stmem prepare`)
  c.out = ""               # output prefix: writes OUT.npz and OUT.parquet
  c.per_patch = False      # also export every patch token (N, L, 30, D)
  c.crops = "first"        # "first" (the first window) or "mean3" (mean over the 3 evaluation crops)
  c.batch_size = 32        # records per forward pass, over all devices and processes (rounded up to the devices)
  c.mesh = "data:-1"       # device mesh: the batch is split over every device of every process
  c.num_devices = 0        # 0: every device; k: the first k (single-process runs only)
  c.no_progress = False    # True: no progress bar
  if arg == "test":
    c.batch_size = 8
  return c
