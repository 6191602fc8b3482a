"""PNG plots of evaluation results (matplotlib, Agg backend; nothing is shown)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def _plt():
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  return plt


def confusion_matrix_png(cm: np.ndarray, classes: Sequence[str], path: str, title: str = "") -> str:
  """Row-normalised colours with the counts written in each cell (rows: true class)."""
  plt = _plt()
  cm = np.asarray(cm)
  c = len(classes)
  rows = cm.sum(1, keepdims=True)
  frac = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
  side = max(4.0, 0.6 * c + 2.5)
  fig, ax = plt.subplots(figsize=(side, side * 0.9))
  im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(c), labels=list(classes), rotation=45, ha="right")
  ax.set_yticks(range(c), labels=list(classes))
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(c):
    for j in range(c):
      ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
              color="white" if frac[i, j] > 0.5 else "black", fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def metric_vs_magnification_png(magnifications: Sequence[float], series: Mapping[str, Sequence[float]],
                                path: str, title: str = "") -> str:
  """One line per metric against magnification (log-2 axis, 5x 10x 20x 40x)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, values in series.items():
    ax.plot(magnifications, values, marker="o", label=name)
  return _save_log2_metric_plot(plt, fig, ax, magnifications, [f"{m:g}x" for m in magnifications],
                                "magnification", title, path)


def _save_log2_metric_plot(plt, fig, ax, xs, labels, xlabel: str, title: str, path: str) -> str:
  """Metric in [0, 1] against a log-2 x axis with one tick per x; saves and closes."""
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(xs), labels=labels)
  ax.minorticks_off()
  ax.set_xlabel(xlabel)
  ax.set_ylabel("metric")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def kshot_png(shots: Sequence[int], means: Mapping[str, Sequence[float]], stds: Mapping[str, Sequence[float]],
              path: str, title: str = "") -> str:
  """Metric mean +- std over seeds against shots per class."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, m in means.items():
    ax.errorbar(shots, m, yerr=stds[name], marker="o", capsize=3, label=name)
  return _save_log2_metric_plot(plt, fig, ax, shots, [str(s) for s in shots],
                                "examples per class", title, path)
