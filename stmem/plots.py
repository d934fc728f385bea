"""Figures for reports: masked reconstructions, lead-set AUROC charts, ROC curves.

Matplotlib with the Agg backend only (no display is assumed: training machines have none). Every function builds
its own figure, saves it as PNG at a fixed size (figsize x dpi, no tight cropping, so the pixel size is
predictable), closes it so long runs do not leak figures, and returns the path it wrote.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from data_pipelines.leads import LEADS  # noqa: E402

_TRACE = "#111111"
_RECON = "#d62728"
_MASK = "#9ecae1"


def _save(fig: plt.Figure, path: str | os.PathLike, dpi: int) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  try:
    fig.savefig(path, dpi=dpi, format="png")
  finally:
    plt.close(fig)
  return path


def plot_reconstruction(signal_patches: np.ndarray, pred_patches: np.ndarray, mask: np.ndarray,
                        path: str | os.PathLike, lead_names: Sequence[str] = LEADS, fs: float = 250.0,
                        title: str | None = None, *, dpi: int = 100, width: float = 14.0,
                        row_height: float = 0.85) -> str:
  """What a masked model saw and what it filled in, for one ECG.

  `signal_patches` and `pred_patches` are (L, N, P): the target patches (as the loss sees them, e.g. per-patch
  normalised) and the model's predictions; `mask` is (L, N) with 1 where a patch was hidden from the encoder.
  Each lead is one row: the target in black, hidden patches shaded, the prediction drawn in red over hidden
  patches only (predictions of visible patches are not trained and would only mislead).
  The figure is `width` x (row_height x L + 0.9) inches.
  """
  x = np.asarray(signal_patches, dtype=np.float64)
  y = np.asarray(pred_patches, dtype=np.float64)
  m = np.asarray(mask).astype(bool)
  if x.ndim != 3 or y.shape != x.shape or m.shape != x.shape[:2]:
    raise ValueError(f"expected signal/pred (L, N, P) and mask (L, N); got {x.shape}, {y.shape}, {m.shape}")
  L, N, P = x.shape
  names = list(lead_names)
  if len(names) != L:
    raise ValueError(f"{len(names)} lead names for {L} leads")
  t = np.arange(N * P) / fs
  patch_s = P / fs
  pred = np.where(m[:, :, None], y, np.nan).reshape(L, N * P)

  fig, axes = plt.subplots(L, 1, figsize=(width, row_height * L + 0.9), sharex=True, squeeze=False)
  axes = axes[:, 0]
  top = 1.0 - 0.4 / (row_height * L + 0.9)
  fig.subplots_adjust(left=0.055, right=0.995, top=top, bottom=0.5 / (row_height * L + 0.9), hspace=0.08)
  for li, ax in enumerate(axes):
    for j in np.flatnonzero(m[li]):
      ax.axvspan(j * patch_s, (j + 1) * patch_s, color=_MASK, alpha=0.35, linewidth=0, zorder=0)
    for j in range(1, N):
      ax.axvline(j * patch_s, color="#cccccc", linewidth=0.4, zorder=0)
    ax.plot(t, x[li].reshape(-1), color=_TRACE, linewidth=0.7, zorder=2)
    ax.plot(t, pred[li], color=_RECON, linewidth=0.9, zorder=3)
    lo, hi = np.nanmin([x[li].min(), np.nanmin(pred[li]) if m[li].any() else x[li].min()]), \
      np.nanmax([x[li].max(), np.nanmax(pred[li]) if m[li].any() else x[li].max()])
    pad = 0.08 * (hi - lo + 1e-9)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_yticks([])
    ax.set_ylabel(names[li], rotation=0, ha="right", va="center", fontsize=9, fontweight="bold")
    ax.tick_params(axis="x", labelsize=8)
    for s in ("top", "right"):
      ax.spines[s].set_visible(False)
  axes[-1].set_xlim(0.0, N * patch_s)
  axes[-1].set_xlabel("time (s)", fontsize=9)
  handles = [plt.Line2D([], [], color=_TRACE, linewidth=1.0, label="target"),
             plt.Line2D([], [], color=_RECON, linewidth=1.2, label="reconstruction (masked patches)"),
             Patch(facecolor=_MASK, alpha=0.5, label=f"masked patch ({int(m.sum())}/{m.size})")]
  fig.legend(handles=handles, loc="upper right", ncol=3, fontsize=9, frameon=False,
             bbox_to_anchor=(0.995, 1.0))
  if title:
    fig.text(0.055, 1.0 - 0.1 / (row_height * L + 0.9), title, fontsize=11, va="top", ha="left")
  return _save(fig, path, dpi)


def _is_random(kind: Any) -> bool:
  return "random" in str(kind).lower()


def plot_lead_set_auroc(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None,
                        dpi: int = 100, figsize: tuple[float, float] = (9.0, 5.0)) -> str:
  """AUROC per lead set with 95 % intervals, one marker per `kind` (e.g. pretrained / random encoder).

  `rows` are dicts with `lead_set`, `auroc`, `lo`, `hi`, `kind`, and optionally `facet`: rows of several facets
  (a probe's blocks and heads) are drawn in one panel per facet, stacked, on one AUROC scale. Kinds whose name
  contains "random" are drawn with hollow grey markers and dashed error bars, so the random-encoder baseline is
  never mistaken for a result.
  """
  lead_sets = list(dict.fromkeys(str(r["lead_set"]) for r in rows))
  kinds = list(dict.fromkeys(str(r["kind"]) for r in rows))
  facets = list(dict.fromkeys(str(r.get("facet", "")) for r in rows))
  lows = [float(r.get("lo", r["auroc"])) for r in rows] or [0.5]
  ylim = (max(0.0, min(min(lows), 0.5) - 0.03), 1.0)
  n = len(facets)
  fig, axes = plt.subplots(n, 1, figsize=(figsize[0], figsize[1] if n == 1 else 1.0 + 3.2 * n), sharex=True,
                           squeeze=False)
  for i, (facet, ax) in enumerate(zip(facets, axes[:, 0])):
    _auroc_panel(ax, [r for r in rows if str(r.get("facet", "")) == facet], lead_sets, kinds, ylim)
    if n > 1:
      ax.set_title(facet, fontsize=10, loc="left")
    if i == n - 1:
      ax.set_xlabel("lead set")
    if i == 0:
      ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)  # never over an interval
  if title:
    if n == 1:
      axes[0, 0].set_title(title)
    else:
      fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path, dpi)


def _auroc_panel(ax, rows: Sequence[Mapping[str, Any]], lead_sets: Sequence[str], kinds: Sequence[str],
                 ylim: tuple[float, float]) -> None:
  """One panel of `plot_lead_set_auroc`: every kind's markers at its lead sets (a kind keeps its colour)."""
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  width = 0.7 / max(len(kinds), 1)
  real_i = 0
  for k, kind in enumerate(kinds):
    pts = [r for r in rows if str(r["kind"]) == kind]
    random = _is_random(kind)
    color = "#7f7f7f" if random else colors[real_i % len(colors)]
    real_i += 0 if random else 1
    if not pts:
      continue
    xs = np.array([lead_sets.index(str(r["lead_set"])) for r in pts]) + (k - (len(kinds) - 1) / 2) * width
    a = np.array([float(r["auroc"]) for r in pts])
    lo = np.array([float(r.get("lo", np.nan)) for r in pts])
    hi = np.array([float(r.get("hi", np.nan)) for r in pts])
    yerr = np.stack([np.nan_to_num(a - lo), np.nan_to_num(hi - a)])
    if random:
      eb = ax.errorbar(xs, a, yerr=yerr, fmt="s", color=color, mfc="white", mew=1.5, ms=7, capsize=4,
                       elinewidth=1.2, label=kind)
      eb[-1][0].set_linestyle("--")
    else:
      ax.errorbar(xs, a, yerr=yerr, fmt="o", color=color, ms=7, capsize=4, elinewidth=1.5, label=kind)
    for x_, a_ in zip(xs, a):
      ax.annotate(f"{a_:.3f}", (x_, a_), xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
  ax.axhline(0.5, color="#bbbbbb", linestyle=":", linewidth=1.0, zorder=0)
  ax.set_xticks(range(len(lead_sets)))
  ax.set_xticklabels(lead_sets)
  ax.set_xlim(-0.6, len(lead_sets) - 0.4)
  ax.set_ylim(*ylim)
  ax.set_ylabel("AUROC (95 % CI)")
  ax.grid(axis="y", color="#eeeeee")
  ax.set_axisbelow(True)


def plot_roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | os.PathLike, *,
                    title: str | None = None, dpi: int = 100, figsize: tuple[float, float] = (6.0, 6.0)) -> str:
  """ROC curves, one per name, labelled with their AUC, over the chance diagonal."""
  fig, ax = plt.subplots(figsize=figsize)
  ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle=":", linewidth=1.0, label="chance")
  for name, (fpr, tpr, auc) in curves.items():
    ls = "--" if _is_random(name) else "-"
    ax.plot(np.asarray(fpr), np.asarray(tpr), linestyle=ls, linewidth=1.6, drawstyle="steps-post",
            label=f"{name} (AUC {float(auc):.3f})")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.005)
  ax.set_aspect("equal")
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.grid(color="#eeeeee")
  ax.legend(loc="lower right", fontsize=9)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path, dpi)
