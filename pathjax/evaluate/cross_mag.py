"""Cross-magnification zero-shot: the same labelled patches at 5x, 10x, 20x and 40x.

Slide sources re-cut every patch around the same centre at each magnification; image
sources are rescaled from their MPP (pathjax.evaluate.data.to_magnification); records hold
each magnification natively, so each row there reads the patches tiled at that power. The
classifier (prompt ensemble) is built once. Output: a table (one row per magnification,
plus the mean), `cross_mag.png` (metric vs magnification) and a confusion matrix per
magnification. MR-PLIP's claim (specs/mrplip.md) is a flat curve; 5x and 40x are usually
the weakest single magnifications.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pathjax.evaluate import data as data_lib
from pathjax.evaluate import features as features_lib
from pathjax.evaluate import plots, prompts as prompts_lib, zeroshot
from pathjax.evaluate.results import TaskResult, format_table

DEFAULT_MAGNIFICATIONS = (5.0, 10.0, 20.0, 40.0)
PLOTTED = ("accuracy", "balanced_accuracy", "weighted_f1", "auc")


def run(dataset: data_lib.Dataset, embedder: features_lib.Embedder, *,
        magnifications: Sequence[float] = DEFAULT_MAGNIFICATIONS, prompts=None, batch_size: int = 64,
        progress=None, report=print) -> TaskResult:
  embedder.require_text("cross-magnification zero-shot")
  dataset = dataset.labelled()
  p = zeroshot.resolve_prompts(dataset, prompts, report)
  zeroshot.label_indices(dataset.labels, p)
  views = [dataset.at_magnification(float(m)) for m in magnifications]  # validates MPPs first
  classifier = prompts_lib.build_classifier(p, embedder.text)
  table, rows, cms, skipped = [], [], {}, []
  for m, view in zip(magnifications, views):
    feats = features_lib.extract_features(view, embedder, batch_size=batch_size, progress=progress,
                                          desc=f"embed {dataset.name} @{m:g}x", report=report)
    metrics, pred_rows, cm = zeroshot.classify(feats, classifier, p, extra_columns={"magnification": m})
    table.append({"magnification": float(m), **metrics})
    rows += pred_rows
    cms[float(m)] = cm
    skipped += [(f"{i}@{m:g}x", r) for i, r in feats.skipped]
  mean = {k: float(np.mean([t[k] for t in table])) for k in zeroshot.HEADLINE}
  metrics = {f"{m:g}x": {k: t[k] for k in zeroshot.HEADLINE + ("num_examples",)}
             for m, t in zip(magnifications, table)}
  metrics["mean"] = mean
  metrics["classes"] = p.classes
  metrics["confusion_matrices"] = {f"{m:g}x": cm.tolist() for m, cm in cms.items()}
  columns = ["magnification", "accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "auc", "num_examples"]
  printable = [{**t, "magnification": f"{t['magnification']:g}x"} for t in table]
  printable.append({"magnification": "mean", **mean, "num_examples": ""})
  summary = format_table(printable, columns)
  mags = [float(m) for m in magnifications]
  series = {k: [t[k] for t in table] for k in PLOTTED}
  plot_fns = {"cross_mag.png": lambda path: plots.metric_vs_magnification_png(
      mags, series, path, f"zero-shot {dataset.name} across magnifications")}
  for m, cm in cms.items():
    plot_fns[f"confusion_matrix_{m:g}x.png"] = (
        lambda path, cm=cm, m=m: plots.confusion_matrix_png(cm, p.classes, path, f"{dataset.name} @{m:g}x"))
  return TaskResult("cross_mag", metrics, rows, plots=plot_fns,
                    info={"prompts": p.source, "magnifications": mags, "source_kind": dataset.kind,
                          "skipped": skipped, "warnings": dataset.warnings},
                    summary=summary)
