"""The report every evaluating program writes into its workdir: one table as Markdown, CSV and JSON, and figures.

A row is one (task, model, lead set): macro AUROC, macro AUPRC and macro F1, each with its 95 % patient-level
bootstrap interval (`<metric>_lo`, `<metric>_hi`), the record and patient counts, and how it was evaluated.

Files: report.md, report.csv, report.json (rows + provenance), auroc_<task>.png (AUROC per lead set with intervals,
one marker per model) and roc_<task>.png (ROC curves).
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
COLUMNS = ("task", "model", "lead_set", "n_records", "n_patients", "n_positive", "protocol",
           *(f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi")), "l2")


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "nan" if not np.isfinite(v) else f"{v:.3f}"
  return str(v)


def markdown(rows: Sequence[Mapping[str, Any]], title: str = "", notes: Sequence[str] = ()) -> str:
  lines = [f"# {title}", ""] if title else []
  head = ["task", "model", "lead set", "records (patients)", "positives", "AUROC [95 % CI]", "AUPRC [95 % CI]",
          "F1 [95 % CI]"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["task"], r["model"], r["lead_set"], f"{r['n_records']} ({r['n_patients']})", r.get("n_positive", "")]
    cells += [f"{_fmt(r[m])} [{_fmt(r[m + '_lo'])}, {_fmt(r[m + '_hi'])}]" for m in METRICS]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"


def write(workdir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], *, title: str,
          curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, float]]] | None = None,
          info: Mapping[str, Any] | None = None, notes: Sequence[str] = ()) -> dict[str, str]:
  """Write the table and figures; returns {kind: path}. `curves` is {task: {curve name: (fpr, tpr, auc)}}."""
  from stmem import plots
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"markdown": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
  paths["markdown"].write_text(markdown(rows, title, notes))
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  clean = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in rows]
  paths["json"].write_text(json.dumps({"title": title, "rows": clean, "notes": list(notes), "info": dict(info or {})},
                                      indent=2, default=str))
  for task in dict.fromkeys(r["task"] for r in rows):
    pts = [{"lead_set": r["lead_set"], "auroc": r["auroc"], "lo": r["auroc_lo"], "hi": r["auroc_hi"],
            "kind": r["model"]} for r in rows if r["task"] == task and np.isfinite(r["auroc"])]
    if pts:
      paths[f"auroc_{task}"] = pathlib.Path(plots.plot_lead_set_auroc(
        pts, out / f"auroc_{_safe(task)}.png", title=f"{task}: macro AUROC by lead set (95 % patient bootstrap)"))
    if curves and curves.get(task):
      paths[f"roc_{task}"] = pathlib.Path(plots.plot_roc_curves(curves[task], out / f"roc_{_safe(task)}.png",
                                                                title=f"{task}: ROC (test predictions)"))
  return {k: os.fspath(v) for k, v in paths.items()}


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
