"""The sharded evaluation pass: source order recovered from the processes' interleaved shards; the probe's feature
pass on 8 devices equals the one-process oracle (`tests/helpers.py`)."""
import numpy as np


def test_global_index_follows_the_pipelines_process_layout():
  """Row i of global batch j is the example that process p's pipeline put there (checked against the pipeline
  itself, run as each of 3 processes)."""
  from data_pipelines.contract import Contract
  from stmem import data
  from stmem import features
  n, processes, local = 7, 3, 2
  rng = np.random.default_rng(0)
  source = data.ArraySource({"signal": rng.normal(size=(n, 12, 2500)).astype(np.float32),
                             "record_id": np.asarray([f"r{i}" for i in range(n)])})
  per_process = [list(data.make_iterator(source, Contract(), batch_size=local, train=False, process_index=p,
                                         process_count=processes)) for p in range(processes)]
  assert len({len(b) for b in per_process}) == 1  # every process yields as many batches
  for j in range(len(per_process[0])):
    ids = np.concatenate([per_process[p][j]["record_id"] for p in range(processes)])
    valid = np.concatenate([per_process[p][j]["valid"] for p in range(processes)])
    index = features._global_index(n, processes, local, j)
    assert list(index >= 0) == list(valid)
    assert [f"r{i}".encode() for i in index[valid]] == list(ids[valid])


def test_feature_pass_on_8_devices_equals_one_device():
  import jax

  from data_pipelines.contract import Contract
  from stmem import data, sharding
  from stmem.models import model_config
  from stmem import features
  from tests.helpers import extract_one_process
  rng = np.random.default_rng(1)
  source = data.ArraySource({"signal": rng.normal(size=(11, 12, 2500)).astype(np.float32),
                             "labels": rng.integers(0, 2, (11, 2)).astype(np.float32)})
  a = features.random_encoder(model_config("tiny", width=64, depth=1, num_heads=1), seed=0)
  encoders = {"a": a, "b": features.random_encoder(a, seed=1)}
  one = extract_one_process(encoders, source, Contract(), lead_set="I+II", batch_size=4, blocks=("1",))
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:8])
  eight = features.extract(encoders, source, Contract(), mesh=mesh, lead_set="I+II", batch_size=4, blocks=("1",))
  assert list(eight["record_id"]) == list(one["record_id"]) and len(one["record_id"]) == 11
  np.testing.assert_array_equal(eight["labels"], one["labels"])
  for name in encoders:
    np.testing.assert_allclose(eight["features"][name], one["features"][name], atol=1e-5)
    np.testing.assert_allclose(eight["blocks"]["1"][name], one["blocks"]["1"][name], atol=1e-5)
  assert not np.allclose(eight["features"]["a"], eight["features"]["b"])  # two encoders, not one twice
