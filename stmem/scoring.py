"""Evaluation metrics with patient-level bootstrap intervals, and patient-grouped folds. Pure numpy.

Scores are (N, C) per record: probabilities of C classes, one-vs-rest. Labels are (N, C) multi-hot (multi-label and
binary tasks) or one-hot (multi-class tasks). Every macro metric averages over the classes that are defined on the
records given (a class with no positive or no negative record has no AUROC): a small resample may lose a rare class,
and a bootstrap should not crash on it.

Why the bootstrap resamples patients, not records: records of one patient are correlated, and resampling them as if
independent gives intervals that are too narrow; a test set with several ECGs per patient is the common case.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.stats


# ------------------------------------------------------------------------------------------------ one class


def _check(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  y, s = np.asarray(y).astype(bool).ravel(), np.asarray(s, np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
  return y, s


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds) over every distinct score, highest first; the curve starts at (0, 0)."""
  y, s = _check(y, s)
  order = np.argsort(-s, kind="mergesort")
  y, s = y[order], s[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # tied scores move the curve in one step
  tp = np.cumsum(y)[last_of_tie]
  fp = np.cumsum(~y)[last_of_tie]
  p, n = max(int(y.sum()), 1), max(int((~y).sum()), 1)
  return np.r_[0.0, fp / n], np.r_[0.0, tp / p], np.r_[np.inf, s[last_of_tie]]


def macro_roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr): the mean over classes of their one-vs-rest ROC curves, on the union of their false-positive rates.

  Why this average: the mean of piecewise-linear curves is piecewise linear on the union grid, so the area under
  this curve is exactly the macro AUROC of the table (classes without a positive or a negative left out, as there);
  pooling every class's scores into one curve (the micro average) would draw a different figure.
  """
  labels, scores = np.atleast_2d(labels), np.atleast_2d(scores)
  curves = [roc_curve(labels[:, k], scores[:, k])[:2] for k in range(labels.shape[1])
            if 0 < labels[:, k].astype(bool).sum() < len(labels)]
  if not curves:
    return np.asarray([0.0, 1.0]), np.asarray([0.0, 1.0])
  grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))

  def ends(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A curve rises vertically where several points share one fpr: its value there has a lower end (the first such
    # point) and an upper end (the last); between points it is the straight segment from the last point before to
    # the first point after. Both ends are kept, so the mean rises vertically too and its area is exact.
    def at(k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
      k0, k1 = np.clip(k0, 0, len(fpr) - 1), np.clip(k1, 0, len(fpr) - 1)
      span = np.where(fpr[k1] > fpr[k0], fpr[k1] - fpr[k0], 1.0)
      return tpr[k0] + (tpr[k1] - tpr[k0]) * np.clip((grid - fpr[k0]) / span, 0.0, 1.0)

    i = np.searchsorted(fpr, grid, side="left")        # first point at or after
    j = np.searchsorted(fpr, grid, side="right") - 1   # last point at or before
    lower = np.where(fpr[np.minimum(i, len(fpr) - 1)] == grid, tpr[np.minimum(i, len(fpr) - 1)], at(i - 1, i))
    upper = np.where(fpr[np.maximum(j, 0)] == grid, tpr[np.maximum(j, 0)], at(j, j + 1))
    return lower, upper

  lower, upper = (np.mean(v, axis=0) for v in zip(*(ends(f, t) for f, t in curves)))
  return np.repeat(grid, 2), np.stack([lower, upper], axis=1).ravel()


def auroc(y: np.ndarray, s: np.ndarray) -> float:
  """Area under the ROC curve: the probability that a positive outscores a negative, ties counting one half.
  NaN when one class is absent."""
  y, s = _check(y, s)
  p, n = int(y.sum()), int((~y).sum())
  if p == 0 or n == 0:
    return float("nan")
  # Mann-Whitney U from mid-ranks (ties share the average rank).
  ranks = scipy.stats.rankdata(s, method="average")
  return float((ranks[y].sum() - p * (p + 1) / 2.0) / (p * n))


def auprc(y: np.ndarray, s: np.ndarray) -> float:
  """Average precision: sum over distinct thresholds of (recall increase) x precision, no interpolation.
  NaN without positives."""
  y, s = _check(y, s)
  p = int(y.sum())
  if p == 0 or p == len(y):
    return float("nan") if p == 0 else 1.0
  order = np.argsort(-s, kind="mergesort")
  y, s = y[order], s[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
  tp = np.cumsum(y)[last_of_tie].astype(np.float64)
  predicted = last_of_tie + 1.0
  precision, recall = tp / predicted, tp / p
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1(y: np.ndarray, predicted: np.ndarray) -> float:
  """F1 of binary predictions; 0 when there is nothing to find and nothing found would be 0/0, so 0."""
  y, pred = np.asarray(y).astype(bool).ravel(), np.asarray(predicted).astype(bool).ravel()
  tp = int((y & pred).sum())
  denom = int(y.sum()) + int(pred.sum())
  return 2.0 * tp / denom if denom else 0.0


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> float:
  """The score threshold (predict positive when score >= threshold) that maximises F1 on these records.

  Chosen on validation, applied to test. The threshold is the midpoint between the cut score and the next one down,
  so a test score equal to neither is not decided by floating-point luck. 0.5 when there are no positives.
  """
  y, s = _check(y, s)
  if not y.any():
    return 0.5
  order = np.argsort(-s, kind="mergesort")
  ys, ss = y[order], s[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]
  tp = np.cumsum(ys)[last_of_tie]
  f1s = 2.0 * tp / (ys.sum() + last_of_tie + 1.0)
  k = int(np.argmax(f1s))
  cut = ss[last_of_tie[k]]
  below = ss[last_of_tie[k] + 1] if last_of_tie[k] + 1 < len(ss) else cut - 1.0
  return float((cut + below) / 2.0)


# ------------------------------------------------------------------------------------------------ macro metrics


def thresholds_for(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """One F1-maximising threshold per class (C,)."""
  labels, scores = np.atleast_2d(labels), np.atleast_2d(scores)
  return np.asarray([best_f1_threshold(labels[:, c], scores[:, c]) for c in range(labels.shape[1])])


def predictions(scores: np.ndarray, thresholds: np.ndarray | None, multiclass: bool) -> np.ndarray:
  """(N, C) bool: argmax for multi-class tasks (one class per record), per-class thresholds otherwise."""
  scores = np.atleast_2d(scores)
  if multiclass:
    return np.eye(scores.shape[1], dtype=bool)[np.argmax(scores, axis=1)]
  return scores >= np.asarray(thresholds)[None, :]


def _nanmean(values: Sequence[float]) -> float:
  values = np.asarray(values, np.float64)
  return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def class_metrics(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | None = None,
                  multiclass: bool = False, predicted: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-class one-vs-rest AUROC, AUPRC and F1, each (C,); NaN where a class's figure is undefined.

  F1 comes from `predicted` (N, C) bool when given (cross-validation: each fold's own thresholds), else from
  `thresholds` or the argmax (`multiclass`); without any of them there is no `f1` entry. A class neither present nor
  predicted has F1 NaN (0/0), so that averages leave it out.
  """
  labels, scores = np.atleast_2d(labels), np.atleast_2d(scores)
  c = labels.shape[1]
  out = {"auroc": np.asarray([auroc(labels[:, k], scores[:, k]) for k in range(c)]),
         "auprc": np.asarray([auprc(labels[:, k], scores[:, k]) for k in range(c)])}
  if predicted is not None or multiclass or thresholds is not None:
    pred = np.atleast_2d(predicted) if predicted is not None else predictions(scores, thresholds, multiclass)
    out["f1"] = np.asarray([f1(labels[:, k], pred[:, k]) if labels[:, k].any() or pred[:, k].any() else np.nan
                            for k in range(c)])
  return out


def macro_metrics(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | None = None,
                  multiclass: bool = False, predicted: np.ndarray | None = None) -> dict[str, float]:
  """Macro AUROC, macro AUPRC and macro F1: the unweighted mean of `class_metrics` over the classes where each is
  defined (a class with no positive or no negative record has no AUROC; one neither present nor predicted, no F1)."""
  return {k: _nanmean(v) for k, v in class_metrics(labels, scores, thresholds, multiclass, predicted).items()}


def metrics_with_intervals(labels: np.ndarray, scores: np.ndarray, predicted: np.ndarray | None,
                           patient_ids: Sequence, *, multiclass: bool = False, n_resamples: int = 1000,
                           seed: int = 0) -> dict[str, dict[str, tuple[float, float, float]]]:
  """{"macro": {metric: (point, lo, hi)}, "classes": [{metric: (point, lo, hi)}] per class}, from ONE patient
  bootstrap: each resample scores every class once, and the macro figure is the mean of that resample's classes,
  so the macro and per-class intervals describe the same resamples."""
  labels = np.atleast_2d(labels)
  c = labels.shape[1]

  def metric(i: np.ndarray) -> dict[str, float]:
    per = class_metrics(labels[i], np.atleast_2d(scores)[i], multiclass=multiclass,
                        predicted=None if predicted is None else np.atleast_2d(predicted)[i])
    out = {k: _nanmean(v) for k, v in per.items()}
    out.update({f"{k}/{j}": float(v[j]) for k, v in per.items() for j in range(c)})
    return out

  ci = patient_bootstrap(metric, patient_ids, n_resamples=n_resamples, seed=seed)
  names = [k for k in ci if "/" not in k]
  return {"macro": {k: ci[k] for k in names}, "classes": [{k: ci[f"{k}/{j}"] for k in names} for j in range(c)]}


# ------------------------------------------------------------------------------------------------ bootstrap


def patient_bootstrap(metric: Callable[[np.ndarray], Mapping[str, float]], patient_ids: Sequence,
                      n_resamples: int = 1000, seed: int = 0, level: float = 0.95
                      ) -> dict[str, tuple[float, float, float]]:
  """{name: (point, lo, hi)} for each value `metric(indices)` returns, with a percentile interval over resamples.

  A resample draws as many patients as there are, with replacement, and takes *all* records of each drawn patient
  (a patient drawn twice contributes its records twice). `metric` receives record indices. Resamples where a value
  is undefined (NaN: a class lost) are left out of that value's interval.
  """
  pids = np.asarray([p.decode() if isinstance(p, bytes) else str(p) for p in patient_ids])
  unique, inverse = np.unique(pids, return_inverse=True)
  by_patient = [np.flatnonzero(inverse == k) for k in range(len(unique))]
  point = dict(metric(np.arange(len(pids))))
  draws: dict[str, list[float]] = {k: [] for k in point}
  rng = np.random.default_rng(seed)
  for _ in range(n_resamples):
    chosen = rng.integers(0, len(unique), len(unique))
    idx = np.concatenate([by_patient[k] for k in chosen])
    for k, v in metric(idx).items():
      draws[k].append(float(v))
  alpha = (1.0 - level) / 2.0
  out = {}
  for k, v in point.items():
    d = np.asarray(draws[k])
    d = d[np.isfinite(d)]
    lo, hi = (np.quantile(d, alpha), np.quantile(d, 1 - alpha)) if d.size else (np.nan, np.nan)
    out[k] = (float(v), float(lo), float(hi))
  return out


# ------------------------------------------------------------------------------------------------ folds


def grouped_folds(patient_ids: Sequence, k: int, seed: int = 0, labels: np.ndarray | None = None) -> np.ndarray:
  """(N,) fold number 0..k-1 per record, all records of a patient in one fold.

  With `labels` (N, C), patients are dealt to folds class by class (patients ordered by their rarest positive class,
  then shuffled within), so that a rare class lands in every fold when it can: a fold without positives cannot be
  scored. Deterministic given `seed`.
  """
  pids = np.asarray([p.decode() if isinstance(p, bytes) else str(p) for p in patient_ids])
  unique, inverse = np.unique(pids, return_inverse=True)
  if k < 2 or k > len(unique):
    raise ValueError(f"cannot make {k} patient-grouped folds from {len(unique)} patients")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(unique))
  if labels is not None:
    labels = np.atleast_2d(np.asarray(labels))
    freq = labels.sum(axis=0)
    patient_pos = np.zeros((len(unique), labels.shape[1]))
    np.add.at(patient_pos, inverse, labels > 0)
    # Key: the frequency of the rarest class the patient has (patients without positives last).
    rarest = np.where(patient_pos > 0, freq[None, :], np.inf).min(axis=1)
    perm = perm[np.argsort(rarest[perm], kind="stable")]
  fold_of_patient = np.empty(len(unique), np.int64)
  fold_of_patient[perm] = np.arange(len(unique)) % k  # deal round-robin: rare patients spread first
  return fold_of_patient[inverse]
