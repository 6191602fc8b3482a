"""Classification and retrieval metrics: scikit-learn's, with its edge cases pinned down.

Labels and predictions are integer class indices into a fixed class list of size C (the
prompt file's classes for zero-shot, the dataset's classes otherwise). Classes of that list
may be absent from the labels; each metric treats them the way scikit-learn does by default:

* accuracy: fraction correct.
* balanced accuracy: mean recall over the classes present in the labels
  (`sklearn.metrics.balanced_accuracy_score`).
* weighted / macro F1: over the classes present in the labels or the predictions
  (`f1_score(y, p, average=...)` with its default `labels`; a class predicted but never true
  has F1 0 and weight 0 in the weighted mean).
* one-vs-rest AUC: the unweighted mean, over the classes present in the labels that also
  have negatives, of the binary AUC of "class c" vs "rest" scored by column c. When every
  class is present this equals `roc_auc_score(y, scores, multi_class="ovr")`; scikit-learn
  refuses the absent-class case, here those classes are left out. Two classes: the AUC of
  class 1 (`roc_auc_score(y, scores[:, 1])`). NaN when no class qualifies.
* one-vs-one AUC (`auc_ovo`): Hand & Till's mean over every pair (a, b) of classes present
  in the labels of (AUC(a vs b by column a) + AUC(b vs a by column b)) / 2, each on the
  examples of those two classes only; equals `roc_auc_score(y, scores, multi_class="ovo")`
  (MR-PLIP's zero-shot script reports it) when every class is present. Two classes: the
  binary AUC, as one-vs-rest.
* Cohen's kappa and quadratic kappa: over the whole class list in its order
  (`cohen_kappa_score(y, p, labels=range(C), weights=...)`), so quadratic weights use the
  true index distance of ordinal classes (grades) even when some are absent.
* confusion matrix: C x C, rows true, columns predicted.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import scipy.special
from sklearn import metrics as skm


def _quiet(fn, *args, **kwargs):
  """scikit-learn warns for absent classes and empty inputs; the docstring says what we do."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn(*args, **kwargs)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  return skm.confusion_matrix(labels, preds, labels=np.arange(num_classes))


def accuracy(labels, preds) -> float:
  labels = np.asarray(labels)
  return float(skm.accuracy_score(labels, preds)) if labels.size else float("nan")


def balanced_accuracy(labels, preds, num_classes: int | None = None) -> float:
  """Mean recall over the classes present in `labels` (`num_classes` is not needed)."""
  del num_classes
  labels = np.asarray(labels)
  return float(_quiet(skm.balanced_accuracy_score, labels, preds)) if labels.size else float("nan")


def f1_scores(labels, preds, num_classes: int | None = None) -> dict[str, float]:
  """{"macro_f1", "weighted_f1"} over the classes present in labels or predictions."""
  del num_classes
  if not np.asarray(labels).size:
    return {"macro_f1": float("nan"), "weighted_f1": float("nan")}
  f1 = lambda average: float(_quiet(skm.f1_score, labels, preds, average=average, zero_division=0))
  return {"macro_f1": f1("macro"), "weighted_f1": f1("weighted")}


def per_class_f1(labels, preds, num_classes: int) -> np.ndarray:
  return _quiet(skm.f1_score, labels, preds, labels=np.arange(num_classes), average=None,
                zero_division=0)


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of boolean `positive` scored by `scores`; NaN without both classes."""
  positive = np.asarray(positive, bool)
  if positive.all() or not positive.any():
    return float("nan")
  return float(skm.roc_auc_score(positive, scores))


def ovr_auc(labels, scores: np.ndarray) -> float:
  """One-vs-rest AUC (see the module docstring for absent classes and the binary case)."""
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float64)
  c = scores.shape[1]
  if c == 2:
    return binary_auc(labels == 1, scores[:, 1])
  aucs = [binary_auc(labels == k, scores[:, k]) for k in range(c)]
  aucs = [a for a in aucs if not np.isnan(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def ovo_auc(labels, scores: np.ndarray) -> float:
  """One-vs-one AUC, Hand & Till (see the module docstring)."""
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float64)
  if scores.shape[1] == 2:
    return binary_auc(labels == 1, scores[:, 1])
  present = [k for k in range(scores.shape[1]) if np.any(labels == k)]
  pairs = []
  for i, a in enumerate(present):
    for b in present[i + 1:]:
      sel = (labels == a) | (labels == b)
      pairs.append(0.5 * (binary_auc(labels[sel] == a, scores[sel, a])
                          + binary_auc(labels[sel] == b, scores[sel, b])))
  return float(np.mean(pairs)) if pairs else float("nan")


def cohen_kappa(labels, preds, num_classes: int, weights: str | None = None) -> float:
  """Cohen's kappa over classes 0..C-1; weights None, "linear" or "quadratic"."""
  if weights not in (None, "linear", "quadratic"):
    raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
  if not np.asarray(labels).size:
    return float("nan")
  return float(_quiet(skm.cohen_kappa_score, labels, preds, labels=np.arange(num_classes),
                      weights=weights))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
  return scipy.special.softmax(np.asarray(logits, np.float64), axis=axis)


def classification_metrics(labels, scores: np.ndarray, *, preds=None) -> dict[str, float]:
  """Every classification metric for integer labels [N] and class scores [N, C].

  `scores` are probabilities or logits (AUC uses them as given, so pass probabilities to
  compare with other tools' AUCs only when they do the same; ranks are what matter).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, np.int64)
  c = scores.shape[1]
  preds = np.argmax(scores, axis=1) if preds is None else np.asarray(preds, np.int64)
  out = {"accuracy": accuracy(labels, preds),
         "balanced_accuracy": balanced_accuracy(labels, preds, c)}
  out.update(f1_scores(labels, preds, c))
  out["auc"] = ovr_auc(labels, scores)
  out["auc_ovo"] = ovo_auc(labels, scores)
  out["kappa"] = cohen_kappa(labels, preds, c)
  out["quadratic_kappa"] = cohen_kappa(labels, preds, c, weights="quadratic")
  out["num_examples"] = float(labels.size)
  return out


def recall_at_k(similarity: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """Recall@k for queries (rows) over candidates (columns); `positives` is a boolean
  [Q, N] matrix of correct candidates. A query counts as found at k when any correct
  candidate ranks among its top k (ties broken by candidate index)."""
  similarity = np.asarray(similarity)
  positives = np.asarray(positives, bool)
  order = np.argsort(-similarity, axis=1, kind="stable")
  hit_rank = np.where(np.take_along_axis(positives, order, axis=1), np.arange(order.shape[1])[None], order.shape[1])
  first = hit_rank.min(axis=1)
  return {k: float(np.mean(first < k)) for k in ks}
