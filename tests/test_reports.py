"""Reports people can read: per-class rows beside the macro figure, class names, averaging stated, small-count
warnings, and the macro-average ROC curve whose area is the macro AUROC."""
from __future__ import annotations

import csv
import json

import numpy as np

from stmem import scoring
from stmem import report

CLASSES = ("N", "A", "O", "~")


def _multiclass(n: int = 240, seed: int = 0, rare: int | None = None):
  """Scores that separate the classes by different margins; with `rare`, class `~` keeps only that many records."""
  rng = np.random.default_rng(seed)
  c = rng.integers(0, 3, n)
  if rare is not None:
    c[:rare] = 3
  else:
    c[rng.permutation(n)[:n // 4]] = 3
  y = np.eye(4, dtype=np.float32)[c]
  margin = np.asarray([2.0, 1.0, 0.3, 0.0])  # N easy, A harder, O hard, ~ chance
  logits = rng.normal(size=(n, 4)) + y * margin
  s = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return y, s, np.asarray([f"p{i // 2}" for i in range(n)])  # two records per patient


def test_multiclass_report_names_each_class_with_its_own_figures(tmp_path):
  y, s, pids = _multiclass()
  predicted = scoring.predictions(s, None, multiclass=True)
  row, (fpr, tpr, auc) = report.task_row("cinc2017", "checkpoint", "I", y, s, predicted, pids, class_names=CLASSES,
                                         multiclass=True, protocol="5-fold", n_resamples=200, seed=0)
  assert [c["class"] for c in row["classes"]] == list(CLASSES)
  assert row["positives"] == {k: int(v) for k, v in zip(CLASSES, y.sum(0))}
  for k, c in enumerate(row["classes"]):
    assert c["auroc"] == scoring.auroc(y[:, k], s[:, k])  # the class's own one-vs-rest figure
    assert c["auroc_lo"] <= c["auroc"] <= c["auroc_hi"] and c["f1_lo"] <= c["f1"] <= c["f1_hi"]
    assert c["n_positive"] + c["n_negative"] == len(y)
  by = {c["class"]: c for c in row["classes"]}
  assert by["N"]["auroc"] > by["A"]["auroc"] > by["~"]["auroc"]  # the margins show through, class by class
  np.testing.assert_allclose(row["auroc"], np.mean([c["auroc"] for c in row["classes"]]))
  np.testing.assert_allclose(np.trapezoid(tpr, fpr), row["auroc"], atol=1e-9)  # the figure's curve is the macro one
  assert auc == row["auroc"] and row["warnings"] == []

  paths = report.write(tmp_path, [row], title="Linear probe", curves={"cinc2017": {"I": (fpr, tpr, auc)}})
  md = (tmp_path / "report.md").read_text()
  assert "| cinc2017 | checkpoint | I | 240 (120) |" in md
  assert f"N {row['positives']['N']}, A {row['positives']['A']}" in md  # positives by name, not 148/47/65/40
  assert "Per class" in md and "| cinc2017 | checkpoint | I | ~ |" in md
  assert "macro = unweighted mean over classes" in md and "macro-average curve" in md
  lines = list(csv.DictReader(open(paths["csv"])))
  assert [r["class"] for r in lines] == ["macro", *CLASSES]
  assert float(lines[2]["auroc"]) == row["classes"][1]["auroc"]
  saved = json.loads((tmp_path / "report.json").read_text())
  assert [c["class"] for c in saved["rows"][0]["classes"]] == list(CLASSES)
  assert (tmp_path / "roc_cinc2017.png").exists()


def test_report_warns_when_a_class_or_split_is_too_small():
  y, s, pids = _multiclass(n=60, rare=4)
  row, _ = report.task_row("cinc2017", "checkpoint", "I", y, s, scoring.predictions(s, None, True), pids,
                           class_names=CLASSES, multiclass=True, protocol="5-fold", n_resamples=50, seed=0)
  assert len(row["warnings"]) == 1 and "class(es) ~ 4 positive;" in row["warnings"][0]
  y, s, pids = y[:12], s[:12], pids[:12]  # 6 patients
  row, _ = report.task_row("cinc2017", "checkpoint", "I", y, s, scoring.predictions(s, None, True), pids,
                           class_names=CLASSES, multiclass=True, protocol="5-fold", n_resamples=50, seed=0)
  assert any("of 6 patients scored" in w for w in row["warnings"])
  assert "of 6 patients scored" in report.markdown([row])


def test_a_class_without_positives_is_a_note_and_notes_are_said_once():
  """A class no scored record has gives no per-class row (no NaN anywhere) but one note; small classes are named
  together in one note, and rows of several models and lead sets on one split repeat no note."""
  y, s, pids = _multiclass(n=60, rare=4)
  keep = y[:, 1] == 0  # no record of class A left
  y, s, pids = y[keep], s[keep], pids[keep]
  rows = []
  for lead_set in ("12", "I"):
    for model in ("checkpoint", "random init"):
      row, _ = report.task_row("cinc2017", model, lead_set, y, s, scoring.predictions(s, None, True), pids,
                               class_names=CLASSES, multiclass=True, protocol="5-fold", n_resamples=50, seed=0)
      rows.append(row)
  assert [c["class"] for c in rows[0]["classes"]] == ["N", "O", "~"] and np.isfinite(rows[0]["auroc"])
  md = report.markdown(rows)
  assert "nan" not in md and "| cinc2017 | checkpoint | I | A |" not in md
  notes = report.all_notes(rows)
  assert [n for n in notes if "no figure for class(es) A (no positive)" in n] == [notes[1]]
  assert len([n for n in notes if "fewer than 10" in n]) == 1 and "~ 4 positive" in notes[2]
  assert len(notes) == 3  # averaging, the missing class, the small class


def test_one_bootstrap_gives_macro_and_class_intervals():
  y, s, pids = _multiclass(n=120, seed=3)
  pred = scoring.predictions(s, None, True)
  both = scoring.metrics_with_intervals(y, s, pred, pids, multiclass=True, n_resamples=100, seed=1)
  alone = scoring.patient_bootstrap(lambda i: scoring.macro_metrics(y[i], s[i], multiclass=True,
                                                                          predicted=pred[i]),
                                       pids, n_resamples=100, seed=1)
  for m in ("auroc", "auprc", "f1"):
    np.testing.assert_allclose(both["macro"][m], alone[m])  # the same resamples as the macro-only bootstrap
  k = 1
  one = scoring.patient_bootstrap(lambda i: {"auroc": scoring.auroc(y[i, k], s[i, k])}, pids,
                                     n_resamples=100, seed=1)
  np.testing.assert_allclose(both["classes"][k]["auroc"], one["auroc"])


def test_multilabel_report_gives_per_class_rows_and_thresholded_f1():
  rng = np.random.default_rng(4)
  y = (rng.random((150, 3)) < np.asarray([0.5, 0.3, 0.2])).astype(np.float32)
  s = 1 / (1 + np.exp(-(rng.normal(size=(150, 3)) + 2 * y * np.asarray([1.5, 0.8, 0.0]))))
  pred = scoring.predictions(s, scoring.thresholds_for(y, s), multiclass=False)
  row, _ = report.task_row("ptbxl", "checkpoint", "12", y, s, pred, [f"p{i}" for i in range(150)],
                           class_names=("NORM", "MI", "HYP"), multiclass=False, protocol="splits",
                           n_resamples=100, seed=0)
  assert row["positives"] == {"NORM": int(y[:, 0].sum()), "MI": int(y[:, 1].sum()), "HYP": int(y[:, 2].sum())}
  by = {c["class"]: c for c in row["classes"]}
  assert by["NORM"]["f1"] == scoring.f1(y[:, 0], pred[:, 0]) and by["NORM"]["auroc"] > by["HYP"]["auroc"]
  assert "| ptbxl | checkpoint | 12 | MI |" in report.markdown([row])


def test_probe_report_has_block_and_head_axes(tmp_path):
  """Rows of several blocks and heads: block and head columns in report.md (both tables), .csv and .json, and the
  AUROC figure drawn with one panel per (block, head)."""
  y, s, pids = _multiclass(n=80)
  pred = scoring.predictions(s, None, True)
  rows = []
  for block in ("last", "4-8"):
    for head in ("linear", "mlp"):
      for model in ("checkpoint", "random init"):
        row, _ = report.task_row("cinc2017", model, "I", y, s, pred, pids, class_names=CLASSES, multiclass=True,
                                 protocol="5-fold", n_resamples=20, seed=0, block=block, head=head)
        rows.append(row)
  notes = report.probe_notes(["last", "4-8"], ["linear", "mlp"], depth=12,
                             mlp={"hidden": 256, "steps": 200, "snapshots": 4})
  paths = report.write(tmp_path, rows, title="Frozen-encoder probe", notes=notes)
  md = (tmp_path / "report.md").read_text()
  assert "| task | model | lead set | block | head | records (patients) |" in md
  assert "| cinc2017 | random init | I | 4-8 | mlp | 80 (40) |" in md
  assert "| cinc2017 | checkpoint | I | 4-8 | mlp | ~ |" in md  # the per-class table too
  assert "4-8 = mean of blocks 4 to 8" in md and "head mlp: one hidden layer of 256 GELU units" in md
  lines = list(csv.DictReader(open(paths["csv"])))
  macro = [(r["block"], r["head"], r["model"]) for r in lines if r["class"] == "macro"]
  assert macro == [(b, h, m) for b in ("last", "4-8") for h in ("linear", "mlp") for m in ("checkpoint", "random init")]
  assert {(r["block"], r["head"]) for r in lines if r["class"] == "~"} == {(b, h) for b in ("last", "4-8")
                                                                          for h in ("linear", "mlp")}
  saved = json.loads((tmp_path / "report.json").read_text())["rows"]
  assert [(r["block"], r["head"]) for r in saved] == [(r["block"], r["head"]) for r in rows]
  assert (tmp_path / "auroc_cinc2017.png").stat().st_size > 0
  # A report without the axes (fine-tuning's) keeps its columns.
  assert "| block |" not in report.markdown([{k: v for k, v in rows[0].items() if k not in ("block", "head")}])
