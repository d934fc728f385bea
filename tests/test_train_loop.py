"""stmem.train_loop on its own, with a counting update and a recording checkpointer (no model, no devices): which
steps run the hook and write metrics, what is saved, and that a diverged state is never saved. Pretraining and
fine-tuning through it: tests/test_pretrain_resume.py and tests/test_finetune.py."""
import json
import pathlib

import pytest

from stmem import train_loop
from stmem.preemption import NonFiniteLoss


class Checkpointer:
  def __init__(self, directory, every):
    self.directory, self.every, self.saved, self.closed = pathlib.Path(directory), every, [], False

  def save(self, step, *, params, opt_state, data_state, meta, force=False, extra_items=None):
    self.saved.append({"step": step, "params": params, "meta": meta, "force": force, "items": extra_items,
                       "data_state": data_state})
    return True

  def wait(self):
    pass

  def close(self):
    self.closed = True


class Batches:
  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    return {"record_id": [f"r{self.n}"]}

  def get_state(self):
    return {"n": self.n}


def _update(nan_from=None):
  def update(params, opt_state, batch, step, ok):
    finite = ok and (nan_from is None or step + 1 < nan_from)
    return params + 1, opt_state, {"loss": 1.0 / (step + 1)}, finite
  return update


def _lines(workdir):
  return [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_the_hook_runs_at_its_steps_and_the_last_and_its_metrics_are_written(tmp_path):
  calls, lines = [], []
  ckpt = Checkpointer(tmp_path / "ckpt", every=4)
  loop = train_loop.Loop(tmp_path, ckpt, log=lines.append, total_steps=7, log_every=2, meta={"origin": "test"},
                         batch_size=8, extra_due=lambda step: step % 3 == 0,
                         on_sync=lambda step, params: calls.append((step, params)) or {"eval_x": float(step)},
                         save_items=lambda params: ({"best_step": 1}, {"best": params}))
  result = loop.run(_update(), 0, "opt", Batches(), 0, True)
  assert result.step == 7 and result.params == 7 and not result.preempted and not result.stopped
  assert calls == [(3, 3), (6, 6), (7, 7)]  # the parameters of that step
  written = _lines(tmp_path)
  assert [x["step"] for x in written] == [2, 3, 4, 6, 7]
  assert [x["step"] for x in written if "eval_x" in x] == [3, 6, 7]
  assert [x["step"] for x in written if "loss" in x] == [2, 4, 6, 7]  # train metrics at log steps and the last
  assert all(x["samples_per_s"] == pytest.approx(8 * x["steps_per_s"]) for x in written if "loss" in x)
  # periodic save at 4, the final one at 7; each with the program's own meta and items
  assert [(s["step"], s["force"]) for s in ckpt.saved] == [(4, False), (7, True)]
  assert ckpt.saved[-1]["meta"] == {"origin": "test", "best_step": 1, "step": 7, "total_steps": 7}
  assert ckpt.saved[-1]["items"] == {"best": 7} and ckpt.saved[-1]["data_state"] == {"n": 7}
  assert ckpt.closed and any(line.startswith("step 7/7 ") for line in lines)


def test_a_non_finite_loss_stops_at_the_next_sync_step_and_is_never_saved(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", every=2)
  loop = train_loop.Loop(tmp_path, ckpt, log=lambda _: None, total_steps=10, log_every=5, meta={})
  with pytest.raises(NonFiniteLoss, match="between step 2 and step 4; the last good checkpoint is step 2"):
    loop.run(_update(nan_from=3), 0, None, Batches(), 0, True)
  assert [s["step"] for s in ckpt.saved] == [2]


def test_stop_after_returns_without_a_final_save(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", every=100)
  loop = train_loop.Loop(tmp_path, ckpt, log=lambda _: None, total_steps=10, log_every=5, meta={}, stop_after=3)
  result = loop.run(_update(), 0, None, Batches(), 0, True)
  assert result.stopped and result.step == 3 and ckpt.saved == []
