"""Metrics against cases computed by hand, and the patient-level bootstrap."""
import numpy as np
import pytest

from stmem import scoring as ev

Y = np.array([0, 0, 1, 1])
S = np.array([0.1, 0.4, 0.35, 0.8])


def test_auroc_by_hand():
  # Pairs (positive, negative): (0.35 > 0.1) yes, (0.35 > 0.4) no, (0.8 > both) yes, yes -> 3 of 4.
  assert ev.auroc(Y, S) == pytest.approx(0.75)
  assert ev.auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
  assert ev.auroc([0, 1, 1], [0.2, 0.2, 0.9]) == pytest.approx(0.75)
  assert np.isnan(ev.auroc([1, 1], [0.1, 0.2]))


def test_roc_curve_by_hand():
  fpr, tpr, thr = ev.roc_curve(Y, S)
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
  assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_auprc_by_hand():
  # Ranked: 0.8 (+) P=1 R=.5; 0.4 (-) P=.5 R=.5; 0.35 (+) P=2/3 R=1; 0.1 (-). AP = .5*1 + .5*2/3.
  assert ev.auprc(Y, S) == pytest.approx(0.5 + 0.5 * 2 / 3)
  assert ev.auprc([1, 0], [0.9, 0.1]) == pytest.approx(1.0)


def test_f1_and_threshold_by_hand():
  assert ev.f1([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
  # F1 of the top k: k=1 2/3, k=2 1/2, k=3 4/5, k=4 2/3 -> cut below 0.35, midway to 0.1.
  assert ev.best_f1_threshold(Y, S) == pytest.approx(0.225)
  assert ev.f1(Y, S >= 0.225) == pytest.approx(0.8)


def test_macro_metrics():
  labels = np.stack([Y, 1 - Y], 1)
  scores = np.stack([S, 1 - S], 1)
  m = ev.macro_metrics(labels, scores, thresholds=np.array([0.225, 0.5]))
  assert m["auroc"] == pytest.approx(0.75)  # AUROC of the complement is the same
  assert m["auprc"] == pytest.approx(((0.5 + 1 / 3) + ev.auprc(1 - Y, 1 - S)) / 2)
  f1_second = ev.f1(1 - Y, (1 - S) >= 0.5)
  assert m["f1"] == pytest.approx((0.8 + f1_second) / 2)
  # Multi-class F1 uses the argmax: record 2 (0.35 vs 0.65) is wrong, the others right.
  mc = ev.macro_metrics(labels, scores, multiclass=True)
  assert mc["f1"] == pytest.approx((ev.f1(Y, [0, 0, 0, 1]) + ev.f1(1 - Y, [1, 1, 1, 0])) / 2)


def test_bootstrap_resamples_patients_not_records():
  # Patient a has 3 records, b 1, c 2: every resample holds whole patients only.
  pids = np.array(["a", "a", "a", "b", "c", "c"])
  seen = []

  def metric(idx):
    seen.append(np.asarray(idx))
    return {"n": float(len(idx))}

  out = ev.patient_bootstrap(metric, pids, n_resamples=200, seed=0)
  assert out["n"][0] == 6
  sizes = {"a": 3, "b": 1, "c": 2}
  for idx in seen[1:]:
    counts = {p: int((pids[idx] == p).sum()) for p in sizes}
    assert all(counts[p] % sizes[p] == 0 for p in sizes)  # a patient comes with all its records, or not at all
    assert sum(counts[p] // sizes[p] for p in sizes) == 3  # as many draws as patients
  lengths = {len(i) for i in seen[1:]}
  assert len(lengths) > 1 and min(lengths) >= 3 and max(lengths) <= 9


def test_bootstrap_interval_contains_point():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 300)
  s = y + rng.normal(0, 1, 300)
  pids = np.repeat(np.arange(100), 3)
  out = ev.patient_bootstrap(lambda i: {"auroc": ev.auroc(y[i], s[i])}, pids, n_resamples=300)
  point, lo, hi = out["auroc"]
  assert lo < point < hi and 0.6 < point < 0.9


def test_grouped_folds_keep_patients_together_and_spread_rare_class():
  pids = np.repeat(np.arange(50), 2)
  labels = np.zeros((100, 1))
  labels[pids < 5] = 1  # 5 positive patients
  fold = ev.grouped_folds(pids, 5, seed=0, labels=labels)
  for p in range(50):
    assert len(set(fold[pids == p])) == 1
  assert all(labels[fold == k].sum() > 0 for k in range(5))


def test_class_metrics_are_the_macro_figures_parts():
  y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], np.float32)  # class 2: never present
  s = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.4, 0.6, 0.0], [0.3, 0.6, 0.1]])
  per = ev.class_metrics(y, s, multiclass=True)
  assert per["auroc"][0] == 1.0 and np.isnan(per["auroc"][2])  # no positive: no AUROC
  assert per["f1"][0] == 2 / 3 and per["f1"][1] == 0.8 and np.isnan(per["f1"][2])  # neither present nor predicted
  macro = ev.macro_metrics(y, s, multiclass=True)
  assert macro["f1"] == np.mean([2 / 3, 0.8]) and macro["auroc"] == np.mean(per["auroc"][:2])
