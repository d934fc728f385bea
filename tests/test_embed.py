"""Embedding export: npz and Parquet round-trip equal to the direct forward pass; streaming in chunks."""
import shutil

import numpy as np
import pyarrow.parquet as pq

from tests.helpers import tiny_checkpoint


def test_embed_arrays_equals_model():
  import jax
  from flax import nnx

  from stmem.models import Encoder, model_config
  from stmem.train import features
  enc = Encoder(model_config("tiny", width=64, depth=1, num_heads=1), rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(0), (5, 2, 2250)))
  ids = np.array([[7, 0]] * 5, np.int32)
  out = features.embed_arrays(enc, x, ids, batch_size=2, per_patch=True)
  direct = enc.features(x, ids, np.ones((5, 2), bool))
  np.testing.assert_allclose(out["pooled"], direct["pooled"], atol=1e-5)
  np.testing.assert_allclose(out["per_lead"], direct["per_lead"], atol=1e-5)
  np.testing.assert_allclose(out["per_patch"], direct["tokens"], atol=1e-5)


def test_embed_raw_folder_round_trip(shared_data, tmp_path):
  from stmem import data
  from stmem.train import embed, features
  raw = tmp_path / "raw"
  raw.mkdir()
  for i in range(1, 6):
    for ext in ("hea", "dat"):
      shutil.copy(shared_data / "ludb" / f"{i}.{ext}", raw)
  ckpt = tiny_checkpoint(tmp_path / "ckpt")
  prefix = str(tmp_path / "out" / "emb")
  # 5 records embedded 2 at a time: 3 batches, the last one padded, one Parquet row group each.
  assert embed.main(["--checkpoint", str(ckpt), "--records", str(raw), "--out", prefix, "--per_patch",
                     "--lead_set", "V2+I+aVF", "--batch_size", "2", "--no_progress"]) == 0

  # Independently: the same folder prepared by `stmem prepare generic` under the checkpoint's contract, its first
  # crop through the encoder. Raw and prepared examples must be the same examples.
  from data_pipelines import prepare
  assert prepare.main(["generic", "--manual_dir", str(raw), "--data_dir", str(tmp_path / "prep"), "--quiet",
                       "--filter_stage", "per_crop"]) == 0  # the checkpoint's contract
  loaded = features.load_encoder(ckpt)
  prepared = data.open_prepared(tmp_path / "prep", "train")
  order = sorted(range(5), key=lambda i: prepared.source[i]["record_id"])
  batch = next(features.eval_batches(data.Subset(prepared.source, order), prepared.contract, lead_set="V2+I+aVF",
                                     batch_size=5, crops=1))
  direct = loaded.encoder.features(batch["signal"][:, 0], batch["lead_ids"], batch["lead_mask"])

  z = np.load(prefix + ".npz")
  assert list(z["record_id"]) == ["1", "2", "3", "4", "5"]
  assert list(z["lead_names"]) == ["V2", "I", "aVF"] and str(z["fingerprint"]) == loaded.fingerprint
  assert z["per_patch"].shape == (5, 3, 30, 64)
  np.testing.assert_allclose(z["pooled"], direct["pooled"], atol=1e-5)
  np.testing.assert_allclose(z["per_lead"], direct["per_lead"], atol=1e-5)
  np.testing.assert_allclose(z["per_patch"], direct["tokens"], atol=1e-5)

  t = pq.read_table(prefix + ".parquet")
  assert t.num_rows == 5 and t.column("record_id").to_pylist() == ["1", "2", "3", "4", "5"]
  assert pq.ParquetFile(prefix + ".parquet").num_row_groups == 3  # written as the chunks came
  pooled = np.asarray(t.column("pooled").to_pylist(), np.float32)
  per_lead = np.asarray(t.column("per_lead").to_pylist(), np.float32)
  np.testing.assert_allclose(pooled, z["pooled"], atol=0)
  np.testing.assert_allclose(per_lead, z["per_lead"], atol=0)
  assert t.schema.metadata[b"fingerprint"].decode().strip('"') == loaded.fingerprint
