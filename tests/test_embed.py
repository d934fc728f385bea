"""Embedding export: npz and Parquet round-trip equal to the direct forward pass; streaming in chunks; the same
embeddings on 1 and 8 devices; two processes write every record once."""
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import embed_arrays, eval_batches, tiny_checkpoint, xla_flags


def test_embed_arrays_equals_model():
  import jax
  from flax import nnx

  from stmem.models import Encoder, model_config
  enc = Encoder(model_config("tiny", width=64, depth=1, num_heads=1), rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(0), (5, 2, 2250)))
  ids = np.array([[7, 0]] * 5, np.int32)
  out = embed_arrays(enc, x, ids, batch_size=2, per_patch=True)
  direct = enc.features(x, ids, np.ones((5, 2), bool))
  np.testing.assert_allclose(out["pooled"], direct["pooled"], atol=1e-5)
  np.testing.assert_allclose(out["per_lead"], direct["per_lead"], atol=1e-5)
  np.testing.assert_allclose(out["per_patch"], direct["tokens"], atol=1e-5)


def test_embed_raw_folder_round_trip(shared_data, tmp_path):
  from stmem import data
  from stmem import features
  from stmem.programs import embed
  raw = tmp_path / "raw"
  raw.mkdir()
  for i in range(1, 6):
    for ext in ("hea", "dat"):
      shutil.copy(shared_data / "ludb" / f"{i}.{ext}", raw)
  ckpt = tiny_checkpoint(tmp_path / "ckpt")
  prefix = str(tmp_path / "out" / "emb")
  # 5 records embedded 2 at a time on one device: 3 batches, the last one padded, one Parquet row group each.
  assert embed.main(["--init_from", str(ckpt), "--records", str(raw), "--out", prefix, "--per_patch",
                     "--lead_set", "V2+I+aVF", "--batch_size", "2", "--num_devices", "1", "--no_progress"]) == 0

  # Independently: the same folder prepared by `stmem prepare generic` under the checkpoint's contract, its first
  # crop through the encoder. Raw and prepared examples must be the same examples.
  from data_pipelines import prepare
  assert prepare.main(["generic", "--manual_dir", str(raw), "--data_dir", str(tmp_path / "prep"), "--quiet",
                       "--filter_stage", "per_crop"]) == 0  # the checkpoint's contract
  loaded = features.load_encoder(ckpt)
  prepared = data.open_prepared(tmp_path / "prep", "train")
  order = sorted(range(5), key=lambda i: prepared.source[i]["record_id"])
  batch = next(eval_batches(data.Subset(prepared.source, order), prepared.contract, lead_set="V2+I+aVF",
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


@pytest.fixture(scope="module")
def five_records(shared_data, tmp_path_factory):
  """Five LUDB records as a raw WFDB folder, and a tiny checkpoint."""
  base = tmp_path_factory.mktemp("embed")
  raw = base / "raw"
  raw.mkdir()
  for i in range(1, 6):
    for ext in ("hea", "dat"):
      shutil.copy(shared_data / "ludb" / f"{i}.{ext}", raw)
  return raw, tiny_checkpoint(base / "ckpt")


def _embed_config(raw, ckpt, out, **overrides):
  from configs import embed as embed_config
  c = embed_config.get_config("test")
  c.init_from, c.data.records, c.out, c.crops, c.no_progress = str(ckpt), str(raw), str(out), "mean3", True
  for k, v in overrides.items():
    c[k] = v
  return c


def test_embed_on_8_devices_equals_1_device(five_records, tmp_path):
  """The batch split over the 8 test devices gives the one-device embeddings (5 records: the padding rows of the
  last batch are dropped, every record written once, in order)."""
  import jax

  from stmem.programs import embed
  raw, ckpt = five_records
  assert jax.device_count() == 8
  one = embed.run(_embed_config(raw, ckpt, tmp_path / "one" / "emb", num_devices=1))
  eight = embed.run(_embed_config(raw, ckpt, tmp_path / "eight" / "emb"))
  assert (one["devices"], eight["devices"], one["records"], eight["records"]) == (1, 8, 5, 5)
  a, b = np.load(one["npz"]), np.load(eight["npz"])
  assert list(a["record_id"]) == list(b["record_id"]) == ["1", "2", "3", "4", "5"]
  for key in ("pooled", "per_lead"):
    np.testing.assert_allclose(a[key], b[key], atol=1e-5)


def test_two_process_embed_writes_every_record_once(five_records, tmp_path):
  """Two processes (one CPU device each, joined through a coordinator on 127.0.0.1) each embed their share; process
  0 writes all 5 records exactly once, equal to a one-process run."""
  import os
  import socket
  import subprocess
  import sys

  from stmem.programs import embed
  raw, ckpt = five_records
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  prefix = tmp_path / "two" / "emb"
  cmd = [sys.executable, "-m", "stmem.cli", "embed", "--config", "embed:test", "--init_from", str(ckpt),
         "--records", str(raw), "--out", str(prefix), "--crops", "mean3", "--no_progress"]
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
           "STMEM_COORDINATOR": f"127.0.0.1:{port}", "STMEM_NUM_PROCESSES": "2", "STMEM_PROCESS_ID": str(i),
           "STMEM_INIT_TIMEOUT": "120", "STMEM_HEARTBEAT_TIMEOUT": "10"}
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(err[-3000:] for _, err in outs)
  assert "process 1 of 2" in outs[1][1] and not (tmp_path / "two" / "emb.1.npz").exists()
  two = np.load(str(prefix) + ".npz")
  ids = list(two["record_id"])
  assert sorted(ids) == ["1", "2", "3", "4", "5"]  # each record exactly once
  one = np.load(embed.run(_embed_config(raw, ckpt, tmp_path / "one" / "emb", num_devices=1))["npz"])
  order = [list(one["record_id"]).index(r) for r in ids]
  np.testing.assert_allclose(two["pooled"], one["pooled"][order], atol=1e-5)
  assert pq.read_table(str(prefix) + ".parquet").num_rows == 5
