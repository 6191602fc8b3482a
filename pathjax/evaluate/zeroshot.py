"""Zero-shot classification with CONCH's prompt ensembling (see pathjax.evaluate.prompts).

Scores are softmax(100 * cosine similarity) over the prompt file's classes (CLIP's logit
scale); predictions are their argmax and AUC reads them as they are, one-vs-rest (`auc`) and
one-vs-one (`auc_ovo`, as MR-PLIP's zero-shot script computes it). Examples without a
label are left out; a label the prompt file does not know is an error listing both sets.
"""

from __future__ import annotations


import numpy as np

from pathjax.evaluate import data as data_lib
from pathjax.evaluate import features as features_lib
from pathjax.evaluate import metrics as metrics_lib
from pathjax.evaluate import plots, prompts as prompts_lib
from pathjax.evaluate.results import TaskResult, format_table

LOGIT_SCALE = 100.0
HEADLINE = ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "auc", "auc_ovo", "kappa",
            "quadratic_kappa")


def resolve_prompts(dataset: data_lib.Dataset, prompts: str | prompts_lib.Prompts | None,
                    report=print) -> prompts_lib.Prompts:
  """The prompt set for a dataset: the given file, a shipped file for a known TFDS
  dataset, or the class names themselves with CONCH's templates (reported)."""
  if isinstance(prompts, prompts_lib.Prompts):
    return prompts
  if prompts:
    return prompts_lib.load_prompts(prompts)
  base = dataset.name.rsplit("-", 1)[0]
  shipped = data_lib.TFDS_META.get(base, {}).get("prompts")
  if dataset.kind == "tfds" and shipped:
    return prompts_lib.load_prompts(shipped)
  if report is not None:
    report(f"note: no --prompts given; using the class names {dataset.classes} with CONCH's "
           f"{len(prompts_lib.DEFAULT_TEMPLATES)} templates")
  return prompts_lib.default_prompts(dataset.classes)


def label_indices(labels, prompts: prompts_lib.Prompts) -> np.ndarray:
  mapping = prompts_lib.match_labels(prompts, [l for l in labels if l is not None])
  order = {c: k for k, c in enumerate(prompts.classes)}
  return np.asarray([order[mapping[l]] for l in labels], np.int64)


def classify(feats: features_lib.Features, classifier: np.ndarray, prompts: prompts_lib.Prompts,
             *, extra_columns: dict | None = None) -> tuple[dict, list[dict], np.ndarray]:
  """(metrics, prediction rows, confusion matrix) for embedded examples."""
  y = label_indices(feats.labels, prompts)
  logits = feats.embeddings @ classifier.T
  scores = metrics_lib.softmax(LOGIT_SCALE * logits)
  pred = scores.argmax(1)
  metrics = metrics_lib.classification_metrics(y, scores, preds=pred)
  classes = prompts.classes
  rows = []
  for i in range(len(y)):
    row = dict(extra_columns or {})
    row.update(id=feats.ids[i], label=feats.labels[i], prediction=classes[pred[i]],
               correct=int(pred[i] == y[i]))
    row.update({f"score_{c}": float(scores[i, k]) for k, c in enumerate(classes)})
    rows.append(row)
  cm = metrics_lib.confusion_matrix(y, pred, len(classes))
  return metrics, rows, cm


def run(dataset: data_lib.Dataset, embedder: features_lib.Embedder, *, prompts=None,
        batch_size: int = 64, progress=None, report=print, classifier: np.ndarray | None = None) -> TaskResult:
  embedder.require_text("zero-shot classification")
  dataset = dataset.labelled()
  if not len(dataset):
    raise data_lib.DataError("zero-shot classification needs labelled examples; the data has none")
  p = resolve_prompts(dataset, prompts, report)
  label_indices(dataset.labels, p)  # fail on unknown labels before embedding anything
  if classifier is None:
    classifier = prompts_lib.build_classifier(p, embedder.text)
  feats = features_lib.extract_features(dataset, embedder, batch_size=batch_size, progress=progress,
                                        report=report)
  metrics, rows, cm = classify(feats, classifier, p)
  metrics["confusion_matrix"] = cm.tolist()
  metrics["classes"] = p.classes
  summary = format_table([{"metric": k, "value": metrics[k]} for k in HEADLINE], ["metric", "value"])
  title = f"zero-shot {dataset.name}"
  return TaskResult(
      "zeroshot", metrics, rows,
      plots={"confusion_matrix.png": lambda path: plots.confusion_matrix_png(cm, p.classes, path, title)},
      info={"prompts": p.source, "num_templates": len(p.templates), "skipped": feats.skipped,
            "warnings": dataset.warnings},
      summary=summary)
