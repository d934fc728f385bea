"""Pretraining on a weighted mix of sources (`data.sources`): the proportions, the exact resume, the overlap guard.

A mixture is one grain pipeline: each source reshuffled on its own epochs, interleaved in proportion to its weight,
random access by position, so an iterator restored from its state gives exactly the batches an uninterrupted one
gives.
"""
from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest

from data_pipelines import transforms
from data_pipelines.contract import Contract
from data_pipelines.errors import UsageError
from stmem import data
from stmem.programs import pretrain

CONTRACT = Contract(window=100, record_samples=120, patch_size=25, filter_stage="offline")


def _source(prefix: str, n: int, seed: int) -> data.ArraySource:
  rng = np.random.default_rng(seed)
  return data.ArraySource({"signal": rng.normal(size=(n, 12, 120)).astype(np.float32),
                           "record_id": np.asarray([f"{prefix}{i}" for i in range(n)])})


def _mixed(weights=(0.7, 0.3)) -> data.MixedSource:
  return data.MixedSource([_source("a", 37, 0), _source("b", 50, 1)], weights, ["a", "b"])


def _ids(batches) -> list[str]:
  return [r.decode() for b in batches for r in b["record_id"]]


def test_weights_are_honoured_and_every_source_is_shuffled_on_its_own_epochs():
  it = data.make_iterator(_mixed(), CONTRACT, batch_size=10, train=True, seed=3)
  ids = _ids(next(it) for _ in range(200))
  share_a = sum(r.startswith("a") for r in ids) / len(ids)
  assert abs(share_a - 0.7) < 0.01, share_a
  a_ids = [r for r in ids if r.startswith("a")]
  # Each epoch of source a (37 records) holds every record once: a permutation, then a fresh one.
  assert sorted(a_ids[:37]) == sorted(f"a{i}" for i in range(37))
  assert sorted(a_ids[37:74]) == sorted(f"a{i}" for i in range(37))
  assert a_ids[:37] != a_ids[37:74]
  counts = collections.Counter(r for r in ids if r.startswith("b"))
  assert max(counts.values()) - min(counts.values()) <= 1  # b's 50 records drawn evenly, epoch after epoch


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.9, 0.1)])
def test_other_weights(weights):
  it = data.make_iterator(_mixed(weights), CONTRACT, batch_size=8, train=True, seed=0)
  ids = _ids(next(it) for _ in range(150))
  share = sum(r.startswith("a") for r in ids) / len(ids)
  assert abs(share - weights[0] / sum(weights)) < 0.01, share


def test_a_restored_iterator_continues_exactly():
  whole = data.make_iterator(_mixed(), CONTRACT, batch_size=6, train=True, seed=1)
  expected = [next(whole) for _ in range(40)]
  first = data.make_iterator(_mixed(), CONTRACT, batch_size=6, train=True, seed=1)
  for _ in range(17):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as it goes through a checkpoint
  resumed = data.make_iterator(_mixed(), CONTRACT, batch_size=6, train=True, seed=1, state=state)
  for want in expected[17:]:
    got = next(resumed)
    assert list(got["record_id"]) == list(want["record_id"])
    np.testing.assert_array_equal(got["signal"], want["signal"])


def test_processes_split_every_source():
  parts = [_ids(next(data.make_iterator(_mixed(), CONTRACT, batch_size=10, train=True, seed=2, process_index=p,
                                        process_count=2)) for _ in range(30)) for p in range(2)]
  assert not set(parts[0]) & set(parts[1])  # each process reads its own shard of each source
  assert all(any(r.startswith("b") for r in ids) for ids in parts)


@pytest.mark.parametrize("sources, message", [
  ("synthetic=0.5,disk=0.5", "names the source 'disk'"),
  ("synthetic=abc", "is not a number"),
  ("synthetic=0", "weights must be positive"),
  ("synthetic,synthetic", "twice"),
  ("raw:generic=1", "--config.data.records"),
])
def test_bad_sources_are_one_line_usage_errors(sources, message):
  with pytest.raises(UsageError, match=message) as e:
    data.source_specs({"sources": sources, "num_synthetic": 8}, seed=0)
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def ludb_folder(shared_data, tmp_path_factory):
  """A data root holding ludb/ with 12 of LUDB's records: a raw folder to mix with the simulator."""
  root = tmp_path_factory.mktemp("mix")
  folder = root / "ludb"
  folder.mkdir()
  shutil.copy(shared_data / "ludb" / "ludb.csv", folder)
  for i in range(1, 13):
    for ext in ("hea", "dat"):
      shutil.copy(shared_data / "ludb" / f"{i}.{ext}", folder)
  return root


def test_a_mix_of_the_simulator_and_a_raw_folder_shares_one_contract(ludb_folder):
  block = {"sources": "synthetic=0.5,raw:ludb=0.5", "num_synthetic": 20, "records": str(ludb_folder)}
  source, contract, pools = data.training_pools(block, seed=0)
  assert isinstance(source, data.MixedSource) and source.names == ["synthetic", "raw:ludb"]
  assert contract == Contract()  # raw records are made as `stmem prepare` would, the simulated ones alike
  assert [p.name for p in pools] == ["synthetic", "ludb"] and [p.contract for p in pools] == [contract] * 2


def _pretrain_config(**overrides):
  from configs import pretrain as pretrain_config
  c = pretrain_config.get_config("tiny")
  c.total_steps, c.batch_size, c.warmup_steps, c.log_every, c.num_devices = 2, 4, 1, 1, 1
  c.data.num_synthetic = 24
  c.checkpoint.async_save = False
  c.evals = {}
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def test_an_evaluator_scoring_training_records_is_refused(tmp_path):
  c = _pretrain_config()
  c.evals = {"probe": {"type": "probe", "every": 1, "tasks": "synthetic", "data": {"num_synthetic": 12},
                       "seed": c.seed, "lead_sets": "12", "cv_folds": 2, "bootstrap": 10, "use_splits": False}}
  with pytest.raises(UsageError, match=r"evaluator 'probe' scores 12 record\(s\) that pretraining trains on "
                                       r"\(syn0-p00000-r0, .*allow_overlap") as e:
    pretrain.run(c, tmp_path / "refused")
  assert "\n" not in str(e.value)
  assert not (tmp_path / "refused" / "checkpoints").exists()


def _distance_to_each_lead(crop: np.ndarray, record: np.ndarray, contract: Contract) -> np.ndarray:
  """For each stored lead of `record`: how far `crop` is from the model input that lead gives at the best start
  (every window of the record through the contract's per-crop work, as one lead alone)."""
  out = []
  for lead in record:
    windows = np.lib.stride_tricks.sliding_window_view(lead, len(crop))[:, None]  # (starts, 1, window)
    inputs = transforms.finish_crop(windows, contract, np.ones(windows.shape[:2], bool))[:, 0]
    out.append(float(np.abs(inputs - crop).max(-1).min()))
  return np.asarray(out)


def test_pretraining_on_a_mix(ludb_folder, monkeypatch, tmp_path, capsys):
  """One tiny run: simulated ECGs and LUDB's raw folder half and half, lead V1 alone, a held-out evaluator on the
  training records allowed. Batches come from both sources; the V1 slot holds each record's V1 row (picked by name
  from the stored rows); the overlap is said."""
  captured = {}
  real = data.make_iterator

  def spy(*args, **kwargs):
    if "first" not in captured:
      captured["first"] = next(real(*args, **{**kwargs, "state": None}))
    return real(*args, **kwargs)

  monkeypatch.setattr(data, "make_iterator", spy)
  c = _pretrain_config(**{"data.sources": "synthetic=0.5,raw:ludb=0.5", "data.records": str(ludb_folder),
                          "data.lead_set": "V1", "data.allow_overlap": True})
  c.total_steps, c.log_batches = 4, True
  c.evals = {"heldout": {"type": "heldout", "every": 4, "data": {"source": "synthetic", "num_synthetic": 8},
                         "seed": c.seed, "batch_size": 4}}
  summary = pretrain.run(c, tmp_path / "mix")
  assert summary["step"] == 4
  rows = [json.loads(line) for line in (tmp_path / "mix" / "batches.0.jsonl").read_text().splitlines()]
  ids = [r for row in rows for r in row["record_id"]]
  assert sum(r.startswith("syn") for r in ids) == len(ids) // 2
  assert "evaluator 'heldout' scores 8 record(s) pretraining trains on (data.allow_overlap)" in capsys.readouterr().err

  from stmem import synthetic
  made = synthetic.make_dataset(c.data.num_synthetic, c.seed, seconds=10.0, fs=250.0)
  by_id = {r: i for i, r in enumerate(made["record_id"])}
  batch = captured["first"]
  checked = 0
  for crop, rid in zip(batch["signal"][:, 0], batch["record_id"]):
    if rid.decode() in by_id:
      distance = _distance_to_each_lead(crop, made["signal"][by_id[rid.decode()]], Contract())
      assert distance[6] < 1e-4 and np.delete(distance, 6).min() > 0.1, distance  # V1 is the seventh lead
      checked += 1
  assert checked
