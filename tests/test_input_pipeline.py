"""The grain input pipeline: per-process shards, seeded shuffling, exact resume, lead sets, global arrays."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stmem import data
from data_pipelines.contract import Contract

CONTRACT = Contract()


def _arrays(n: int = 37, labels: int = 2) -> dict[str, np.ndarray]:
  """Sines whose amplitude is (lead + 1): after one joint z-score, slot stds keep the ratio of their leads."""
  t = np.arange(CONTRACT.record_samples) / CONTRACT.fs
  phase = np.arange(n)[:, None, None] * 0.1
  amp = (np.arange(12) + 1.0)[None, :, None]
  signal = (amp * np.sin(2 * np.pi * 1.1 * t[None, None] + phase)).astype(np.float32)
  return {"signal": signal, "labels": (np.arange(n)[:, None] % (np.arange(labels) + 2) == 0).astype(np.float32),
          "record_id": np.asarray([f"rec{i}" for i in range(n)]), "patient_id": np.asarray([f"p{i // 2}" for i in range(n)])}


@pytest.fixture(scope="module")
def source() -> data.ArraySource:
  return data.ArraySource(_arrays())


def _ids(batches) -> list[bytes]:
  return [r for b in batches for r, v in zip(b["record_id"], b["valid"]) if v]


def test_batch_layout(source):
  b = next(data.make_iterator(source, CONTRACT, batch_size=4, train=True, process_index=0, process_count=1))
  assert b["signal"].shape == (4, 12, 2250) and b["signal"].dtype == np.float32
  assert b["lead_ids"].dtype == np.int32 and (b["lead_ids"] == np.arange(12)).all()
  assert b["lead_mask"].dtype == bool and b["lead_mask"].all()
  assert b["labels"].shape == (4, 2) and b["labels"].dtype == np.float32
  assert b["record_id"].dtype.kind == "S" and b["patient_id"].shape == (4,)
  np.testing.assert_allclose(b["signal"].mean(axis=(1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(b["signal"].std(axis=(1, 2)), 1, atol=1e-4)


def test_process_shards_are_disjoint_and_cover_the_data(source):
  seen, counts = [], []
  for p in range(3):
    batches = list(data.make_iterator(source, CONTRACT, batch_size=4, train=False, process_index=p, process_count=3))
    counts.append(len(batches))
    ids = _ids(batches)
    seen.append(set(ids))
    assert len(ids) == len(set(ids))
  assert len(set(counts)) == 1  # every process runs the same number of batches (padding rows are not valid)
  assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
  assert set.union(*seen) == {f"rec{i}".encode() for i in range(37)}
  train = [set(_ids(data.make_iterator(source, CONTRACT, batch_size=1, train=True, num_epochs=1, process_index=p,
                                       process_count=2))) for p in range(2)]
  assert not (train[0] & train[1]) and len(train[0] | train[1]) == 37


def test_eval_batches_carry_the_crop_axis(source):
  b = next(data.make_iterator(source, CONTRACT, batch_size=2, train=False, process_index=0, process_count=1))
  assert b["signal"].shape == (2, 3, 12, 2250) and b["lead_mask"].shape == (2, 12) and b["labels"].shape == (2, 2)
  assert list(b["record_id"]) == [b"rec0", b"rec1"] and b["valid"].all()
  # Crop k of record i is the record at the k-th start (0, 125, 250), z-scored on its own.
  from data_pipelines import transforms
  assert transforms.eval_starts(CONTRACT.record_samples, CONTRACT.window) == (0, 125, 250)
  for i in range(2):
    stored = source[i]["signal"]
    for k, start in enumerate((0, 125, 250)):
      want = transforms.finish_crop(stored[:, start:start + CONTRACT.window], CONTRACT)
      np.testing.assert_allclose(b["signal"][i, k], want, atol=1e-5)
  # The last batch of a process is padded with invalid, all-zero rows.
  last = list(data.make_iterator(source, CONTRACT, batch_size=5, train=False, process_index=0, process_count=1))[-1]
  assert list(last["valid"]) == [True, True, False, False, False] and not last["signal"][2:].any()
  assert list(last["record_id"][2:]) == [b"", b"", b""]


def test_shuffling_is_deterministic_by_seed(source):
  def first(seed, k=10):
    it = data.make_iterator(source, CONTRACT, batch_size=4, train=True, seed=seed, process_index=0, process_count=1)
    return [next(it) for _ in range(k)]
  a, b, c = first(1), first(1), first(2)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert [r for x in a for r in x["record_id"]] != [r for x in c for r in x["record_id"]]
  epoch1 = [r for x in a[:9] for r in x["record_id"]]  # 36 of 37 records
  assert len(set(epoch1)) == 36


def test_iterator_state_restore_gives_the_next_batches(source):
  kwargs = dict(batch_size=5, train=True, seed=3, process_index=0, process_count=1)
  it = data.make_iterator(source, CONTRACT, **kwargs)
  for _ in range(9):  # crosses an epoch boundary (37 records, 5 per batch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  restored = data.make_iterator(source, CONTRACT, state=state, **kwargs)
  for want in expected:
    got = next(restored)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_state_restore_with_worker_processes(source):
  kwargs = dict(batch_size=4, train=True, seed=5, process_index=0, process_count=1)
  plain = data.make_iterator(source, CONTRACT, **kwargs)
  expected = [next(plain) for _ in range(6)]
  it = data.make_iterator(source, CONTRACT, worker_count=2, **kwargs)
  for want in expected[:3]:
    assert np.array_equal(next(it)["signal"], want["signal"])
  state = it.get_state()
  del it
  restored = data.make_iterator(source, CONTRACT, worker_count=2, state=state, **kwargs)
  for want in expected[3:]:
    assert np.array_equal(next(restored)["signal"], want["signal"])


def test_lead_set_selection_by_name(source):
  it = data.make_iterator(source, CONTRACT, batch_size=3, train=True, lead_set=["V2", "I"], process_index=0,
                          process_count=1)
  b = next(it)
  assert b["signal"].shape == (3, 2, 2250) and (b["lead_ids"] == [7, 0]).all() and b["lead_mask"].all()
  ratio = b["signal"][:, 0].std(axis=-1) / b["signal"][:, 1].std(axis=-1)
  np.testing.assert_allclose(ratio, 8.0, rtol=1e-3)  # V2 (id 7) has 8x the amplitude of I in the source
  b = next(data.make_iterator(source, CONTRACT, batch_size=2, train=False, lead_set="limb6", process_index=0,
                              process_count=1))
  assert b["signal"].shape == (2, 3, 6, 2250) and (b["lead_ids"][0] == np.arange(6)).all()
  with pytest.raises(ValueError):
    data.make_iterator(source, CONTRACT, batch_size=2, train=True, lead_set="I+XYZ", process_index=0,
                       process_count=1)


def test_absent_leads_stay_masked_zero():
  arrays = _arrays(8)
  arrays["lead_mask"] = np.ones((8, 12), bool)
  arrays["lead_mask"][:, 3] = False
  arrays["signal"][:, 3] = 0.0
  b = next(data.make_iterator(data.ArraySource(arrays), CONTRACT, batch_size=4, train=True, process_index=0,
                              process_count=1))
  assert not b["lead_mask"][:, 3].any() and (b["signal"][:, 3] == 0).all()


def test_to_global_on_8_devices(source):
  import jax
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  b = next(data.make_iterator(source, CONTRACT, batch_size=16, train=True, process_index=0, process_count=1))
  from stmem import sharding
  g = data.to_global(b, sharding.batch_sharding(mesh))
  assert isinstance(g["signal"], jax.Array) and g["signal"].shape == (16, 12, 2250)
  assert len(g["signal"].sharding.device_set) == 8
  assert g["signal"].addressable_shards[0].data.shape == (2, 12, 2250)
  np.testing.assert_array_equal(np.asarray(g["signal"]), b["signal"])
  np.testing.assert_array_equal(np.asarray(g["lead_ids"]), b["lead_ids"])
  assert g["lead_mask"].dtype == bool and isinstance(g["record_id"], np.ndarray)
