"""Defaults of `stmem embed` (embedding export). It takes plain flags; these are their defaults.

  stmem embed --checkpoint CKPT --data_dir PREPARED --split test --out runs/emb/test
  stmem embed --checkpoint CKPT --records ../shared/data/ludb --out runs/emb/ludb --per_patch --lead_set limb6

Writes FILE_PREFIX.npz and FILE_PREFIX.parquet: pooled (N, D), per_lead (N, L, D) and with --per_patch per_patch
(N, L, 30, D), record and patient ids, lead names, the lead mask, the checkpoint's fingerprint and contract.
One row per stored 10 s window (a 30 s record gives 3 rows with its record id). Crops: `first` (default) embeds
the first 2250 samples (9 s at 250 Hz) of each window; `mean3` averages the embeddings of the 3 evaluation crops
(0, 0.5 and 1 s), as the probe does. Output memory stays bounded: rows are written every batch (Parquet row groups;
memory-mapped .npy files zipped at the end). A raw folder (`--records`) is read into memory, every window, as
`stmem.data.open_pool` reads raw data: prepare a large collection first (`stmem prepare generic`) and pass
`--data_dir`. `--synthetic N` embeds N simulated ECGs.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 32        # records per forward pass
  c.crops = "first"        # "first" or "mean3"
  c.lead_set = "12"
  c.split = "test"
  if arg == "test":
    c.batch_size = 4
  return c
