"""Every figure is a non-empty PNG of the documented pixel size, and no figure is left open."""
from __future__ import annotations

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np

from data_pipelines.leads import LEADS
from stmem import plots
from tests.helpers import synthesize


def _check_png(path: str, width: int, height: int) -> np.ndarray:
  img = mpimg.imread(path)
  assert img.shape[:2] == (height, width), img.shape
  assert img[..., :3].std() > 0.01  # something was drawn, not a blank canvas
  assert plt.get_fignums() == []    # the figure was closed
  return img


def test_plot_reconstruction(tmp_path):
  x = synthesize("afib", 9.0, 250.0, np.random.default_rng(1))
  patches = x.reshape(12, 30, 75)
  rng = np.random.default_rng(2)
  mask = np.zeros((12, 30), np.int32)
  for lead in range(12):
    mask[lead, rng.permutation(30)[:23]] = 1
  pred = patches + 0.05 * rng.normal(size=patches.shape)
  out = plots.plot_reconstruction(patches, pred, mask, tmp_path / "rec.png", LEADS, 250.0, title="epoch 1")
  _check_png(out, 1400, int(round((0.85 * 12 + 0.9) * 100)))


def test_plot_lead_set_auroc(tmp_path):
  rows = []
  for k, (ls, a) in enumerate((("12", 0.93), ("limb6", 0.9), ("I", 0.84))):
    rows.append({"lead_set": ls, "auroc": a, "lo": a - 0.02, "hi": a + 0.015, "kind": "pretrained"})
    rows.append({"lead_set": ls, "auroc": a - 0.1, "lo": a - 0.13, "hi": a - 0.07, "kind": "random encoder"})
  out = plots.plot_lead_set_auroc(rows, tmp_path / "auroc.png")
  _check_png(out, 900, 500)
  # a macro point outside its percentile interval (a class lost by some resamples) is drawn, not refused
  rows.append({"lead_set": "I", "auroc": 0.6, "lo": 0.62, "hi": 0.8, "kind": "pretrained"})
  _check_png(plots.plot_lead_set_auroc(rows, tmp_path / "outside.png"), 900, 500)


def test_plot_roc_curves(tmp_path):
  fpr = np.linspace(0, 1, 50)
  curves = {"pretrained": (fpr, np.sqrt(fpr), 0.83), "random encoder": (fpr, fpr ** 0.8, 0.6)}
  out = plots.plot_roc_curves(curves, tmp_path / "roc.png")
  _check_png(out, 600, 600)
