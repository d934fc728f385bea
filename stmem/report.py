"""The report every evaluating program writes into its workdir: tables as Markdown, CSV and JSON, and figures.

A row is one (task, model, lead set; a probe's rows also one `block` and one `head`): macro AUROC, macro AUPRC and
macro F1, each with its 95 % patient-level bootstrap interval (`<metric>_lo`, `<metric>_hi`), the record and
patient counts, the positives of each class, how it was evaluated, and under `classes` the same figures for every
class (one-vs-rest), from the same resamples.
`task_row` builds it (probe and fine-tune both call it); warnings about too few records ride along and become
notes.

Files: report.md (macro table, then a per-class table for tasks with several classes, then notes), report.csv (one
line per row and class: `class` is `macro` or the class name), report.json (rows + provenance),
auroc_<task>.png (AUROC per lead set with intervals, one marker per model; with several blocks or heads one panel per
(block, head), the random encoder's markers in each) and roc_<task>.png (ROC curves).
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("auroc", "auprc", "f1")
COLUMNS = ("task", "model", "lead_set", "block", "head", "class", "n_records", "n_patients", "n_positive", "protocol",
           *(f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi")), "l2")
# Below these a figure is reported but flagged: with 10 positives AUROC's standard error is already ~0.05-0.09
# (Hanley & McNeil 1982), and a patient bootstrap over fewer than 10 patients cannot describe a population.
MIN_CLASS_RECORDS = 10
MIN_PATIENTS = 10
AVERAGING = ("macro = unweighted mean over classes of the one-vs-rest figure (classes without a positive or a "
             "negative record left out); ROC figures draw the macro-average curve (mean of the per-class curves), "
             "whose area is the macro AUROC")


def task_title(name: str, config: Mapping[str, Any]) -> str:
  """The task's name for the report: a prepared dataset's task is named by its records' source (`cinc2017`,
  `ludb`), or its builder's folder, rather than `prepared`, which says nothing about what was probed."""
  data = config.get("data") if hasattr(config, "get") else None
  data_dir = data.get("data_dir") if hasattr(data, "get") else None
  if name != "prepared" or not data_dir:
    return name
  from data_pipelines import builder_base
  try:
    folder = builder_base.prepared_dir(os.path.expandvars(os.path.expanduser(str(data_dir))))
    sources = sorted({str(r.get("source", "")) for r in builder_base.load_index(folder)} - {""})
  except (FileNotFoundError, ValueError):
    return name
  return "+".join(sources) if 0 < len(sources) <= 3 else folder.parent.name


def task_row(task: str, model: str, lead_set: str, labels: np.ndarray, scores: np.ndarray,
             predicted: np.ndarray | None, patient_ids: Sequence, *, class_names: Sequence[str], multiclass: bool,
             protocol: str, n_resamples: int, seed: int, **extra: Any) -> tuple[dict[str, Any], tuple]:
  """(report row, ROC curve (fpr, tpr, macro AUROC)) of one model's scores on one task's scored records.

  `labels` (N, C) multi-hot or one-hot, `scores` (N, C) probabilities, `predicted` (N, C) bool (F1), `patient_ids`
  (N,) for the bootstrap. The row holds the macro figures, `classes` (one dict per class with its own figures and
  counts; a class without a positive or without a negative record among those scored has no figure and is named in
  a warning instead), `positives` {class: n} and `warnings` (classes without figures; too few records, patients or
  positives for a figure to mean much). Warnings are worded without the model and the lead set, so that the rows of
  several models and lead sets on one split give one note of each kind.
  """
  from stmem import scoring
  y = np.atleast_2d(np.asarray(labels, np.float32))
  names = list(class_names) if len(class_names) == y.shape[1] else [str(k) for k in range(y.shape[1])]
  ci = scoring.metrics_with_intervals(y, scores, predicted, patient_ids, multiclass=multiclass,
                                         n_resamples=n_resamples, seed=seed)
  positives = y.sum(axis=0).astype(int)
  n, n_patients = int(len(y)), int(len(set(str(p) for p in patient_ids)))
  row: dict[str, Any] = {"task": task, "model": model, "lead_set": lead_set, "class": "macro", "n_records": n,
                         "n_patients": n_patients,
                         "n_positive": int(positives[0]) if len(names) == 1 else "/".join(map(str, positives)),
                         "positives": dict(zip(names, map(int, positives))), "protocol": protocol, **extra}
  for m, (point, lo, hi) in ci["macro"].items():
    row.update({m: point, f"{m}_lo": lo, f"{m}_hi": hi})
  row["classes"] = []
  warnings, absent, few = [], [], []
  if n_patients < MIN_PATIENTS:
    warnings.append(f"{task}: only {n} records of {n_patients} patients scored; the intervals cannot describe new "
                    "patients")
  for k, name in enumerate(names):
    c = {"class": name, "n_positive": int(positives[k]), "n_negative": n - int(positives[k])}
    if not c["n_positive"] or not c["n_negative"]:  # no figure exists for it: a note, not a row of NaN
      absent.append(f"{name} ({'no positive' if not c['n_positive'] else 'no negative'})")
      continue
    for m, (point, lo, hi) in ci["classes"][k].items():
      c.update({m: point, f"{m}_lo": lo, f"{m}_hi": hi})
    row["classes"].append(c)
    if min(c["n_positive"], c["n_negative"]) < MIN_CLASS_RECORDS:
      side = "positive" if c["n_positive"] <= c["n_negative"] else "negative"
      few.append(f"{name} {min(c['n_positive'], c['n_negative'])} {side}")
  if absent:
    warnings.append(f"{task}: no figure for class(es) {', '.join(absent)} among the {n} records scored; the macro "
                    "figures leave them out")
  if few:
    warnings.append(f"{task}: fewer than {MIN_CLASS_RECORDS} positive or negative records scored for class(es) "
                    f"{', '.join(few)}; their AUROC/AUPRC (and the macro figures they enter) mean little")
  row["warnings"] = warnings
  fpr, tpr = scoring.macro_roc_curve(y, scores)
  return row, (fpr, tpr, row["auroc"])


def probe_notes(blocks: Sequence[str], heads: Sequence[str], *, depth: int | None = None,
                mlp: Mapping[str, Any] | None = None) -> list[str]:
  """What a probe report's `block` and `head` columns mean (the blocks resolved against the encoder's depth)."""
  from stmem import features
  named = []
  for b in blocks:
    numbers = features.block_numbers(b, depth) if depth is not None else None
    if b == "last":
      named.append("last = the encoder's pooled output (after its last block)")
    elif numbers is not None and (b == "mid" or len(numbers) > 1):
      named.append(f"{b} = " + (f"block {numbers[0]}" if len(numbers) == 1 else
                                f"mean of blocks {numbers[0]} to {numbers[-1]}"))
  out = []
  if list(blocks) != ["last"]:
    out.append(f"blocks (numbered 1 to {depth if depth is not None else 'the depth'}; each pooled and put through "
               f"the final LayerNorm): " + "; ".join(named or [f"block {b}" for b in blocks]))
  if "mlp" in heads:
    m = dict(mlp or {})
    out.append(f"head mlp: one hidden layer of {m.get('hidden', '?')} GELU units on standardised features, "
               f"full-batch Adam for up to {m.get('steps', '?')} steps; its L2 and its length of training (one of "
               f"{m.get('snapshots', '?')} step counts) chosen on validation, as the linear head's L2; the `steps` "
               f"field of report.json is the median over folds")
  return out


def _columns(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
  """The row-identifying keys shown: task, model, lead set, and block and head where any row has them."""
  return ("task", "model", "lead_set", *(k for k in ("block", "head") if any(k in r for r in rows)))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "nan" if not np.isfinite(v) else f"{v:.3f}"
  return str(v)


def _ci(r: Mapping[str, Any], m: str) -> str:
  if m not in r:
    return ""
  return f"{_fmt(r[m])} [{_fmt(r[m + '_lo'])}, {_fmt(r[m + '_hi'])}]"


def _positives(r: Mapping[str, Any]) -> str:
  named = r.get("positives")
  if isinstance(named, Mapping) and len(named) > 1:
    return ", ".join(f"{k} {v}" for k, v in named.items())
  return str(r.get("n_positive", ""))


def all_notes(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> list[str]:
  """The caller's notes, how figures are averaged, and every row's warnings (each once)."""
  return list(dict.fromkeys([*notes, AVERAGING, *(w for r in rows for w in r.get("warnings", ()))]))


def markdown(rows: Sequence[Mapping[str, Any]], title: str = "", notes: Sequence[str] = ()) -> str:
  lines = [f"# {title}", ""] if title else []
  keys = _columns(rows)
  names = [k.replace("_", " ") for k in keys]
  head = [*names, "records (patients)", "positives", "macro AUROC [95 % CI]", "macro AUPRC [95 % CI]",
          "macro F1 [95 % CI]"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [*(r.get(k, "") for k in keys), f"{r['n_records']} ({r['n_patients']})", _positives(r)]
    cells += [_ci(r, m) for m in METRICS]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  several = [r for r in rows if len(r.get("classes", ())) > 1]
  if several:
    head = [*names, "class", "positives / negatives", "AUROC [95 % CI]", "AUPRC [95 % CI]", "F1 [95 % CI]"]
    lines += ["", "Per class (one-vs-rest, same bootstrap resamples as the macro figures):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in several:
      for c in r["classes"]:
        cells = [*(r.get(k, "") for k in keys), c["class"], f"{c['n_positive']} / {c['n_negative']}"]
        cells += [_ci(c, m) for m in METRICS]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
  lines += [""] + [f"- {n}" for n in all_notes(rows, notes)]
  return "\n".join(lines) + "\n"


def _csv_lines(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The macro row, then one line per class when there are several (with the row's task, model, lead set, block
  and head)."""
  out = []
  for r in rows:
    out.append({k: v for k, v in r.items() if k not in ("classes", "positives", "warnings")})
    if len(r.get("classes", ())) > 1:
      for c in r["classes"]:
        out.append({**{k: r[k] for k in ("task", "model", "lead_set", "block", "head") if k in r},
                    "n_records": r["n_records"],
                    "n_patients": r["n_patients"], "protocol": r.get("protocol", ""), **c})
  return out


def write(workdir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], *, title: str,
          curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, float]]] | None = None,
          info: Mapping[str, Any] | None = None, notes: Sequence[str] = ()) -> dict[str, str]:
  """Write the tables and figures; returns {kind: path}. `curves` is {task: {curve name: (fpr, tpr, auc)}}."""
  from stmem import plots
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"markdown": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
  paths["markdown"].write_text(markdown(rows, title, notes))
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(_csv_lines(rows))

  def clean(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
      return None
    if isinstance(v, list):
      return [clean(x) for x in v]
    if isinstance(v, dict):
      return {k: clean(x) for k, x in v.items()}
    return v

  paths["json"].write_text(json.dumps({"title": title, "rows": [clean(dict(r)) for r in rows],
                                       "notes": all_notes(rows, notes),
                                       "info": dict(info or {})}, indent=2, default=str))
  for task in dict.fromkeys(r["task"] for r in rows):
    # Several blocks or heads: one panel per (block, head), each as the single-panel figure (every lead set, the
    # checkpoint beside the random encoder), rather than 2 x blocks x heads markers crowding each lead set.
    pts = [{"lead_set": r["lead_set"], "auroc": r["auroc"], "lo": r["auroc_lo"], "hi": r["auroc_hi"],
            "kind": r["model"], "facet": _facet(r)} for r in rows if r["task"] == task and np.isfinite(r["auroc"])]
    if pts:
      paths[f"auroc_{task}"] = pathlib.Path(plots.plot_lead_set_auroc(
        pts, out / f"auroc_{_safe(task)}.png", title=f"{task}: macro AUROC by lead set (95 % patient bootstrap)"))
    if curves and curves.get(task):
      several = any(len(r.get("classes", ())) > 1 for r in rows if r["task"] == task)
      paths[f"roc_{task}"] = pathlib.Path(plots.plot_roc_curves(
        curves[task], out / f"roc_{_safe(task)}.png",
        title=f"{task}: ROC (test predictions" + ("; macro-average over classes)" if several else ")")))
  return {k: os.fspath(v) for k, v in paths.items()}


def _facet(r: Mapping[str, Any]) -> str:
  if "block" not in r and "head" not in r:
    return ""
  return f"block {r.get('block', 'last')}, {r.get('head', 'linear')} head"


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
