"""Defaults of `stmem embed` (embedding export). It takes plain flags; these are their defaults.

  stmem embed --checkpoint CKPT --data_dir PREPARED --split test --out runs/emb/test
  stmem embed --checkpoint CKPT --records ../shared/data/ludb --out runs/emb/ludb --per_patch --lead_set limb6

Writes FILE_PREFIX.npz and FILE_PREFIX.parquet: pooled (N, D), per_lead (N, L, D) and with --per_patch per_patch
(N, L, 30, D), record and patient ids, lead names, the lead mask, the checkpoint's fingerprint and contract.
Crops: `first` (default) embeds the first window of 2250 samples (9 s at 250 Hz) of each record's first 10 s;
`mean3` averages the embeddings of the 3 evaluation crops (0, 0.5 and 1 s), as the probe does.
Memory stays bounded: rows are written every batch (Parquet row groups; memory-mapped .npy files zipped at the end).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 32        # records per forward pass
  c.read_chunk = 256       # raw records read and preprocessed at a time (bounds memory for large folders)
  c.crops = "first"        # "first" or "mean3"
  c.lead_set = "12"
  c.split = "test"
  if arg == "test":
    c.batch_size = 4
    c.read_chunk = 5
  return c
