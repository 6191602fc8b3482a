"""Classification and retrieval metrics in numpy (scikit-learn's definitions, tested against it).

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

from typing import Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, preds), 1)
  return cm


def accuracy(labels, preds) -> float:
  labels, preds = np.asarray(labels), np.asarray(preds)
  return float(np.mean(labels == preds)) if labels.size else float("nan")


def balanced_accuracy(labels, preds, num_classes: int | None = None) -> float:
  labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
  c = num_classes or int(max(labels.max(initial=-1), preds.max(initial=-1)) + 1)
  cm = confusion_matrix(labels, preds, c)
  support = cm.sum(1)
  present = support > 0
  if not present.any():
    return float("nan")
  return float(np.mean(np.diag(cm)[present] / support[present]))


def _f1_per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(1).astype(np.float64)
  predicted = cm.sum(0).astype(np.float64)
  denom = support + predicted
  f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
  used = (support > 0) | (predicted > 0)
  return f1, support, used


def f1_scores(labels, preds, num_classes: int | None = None) -> dict[str, float]:
  """{"macro_f1", "weighted_f1"} over the classes present in labels or predictions."""
  labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
  c = num_classes or int(max(labels.max(initial=-1), preds.max(initial=-1)) + 1)
  f1, support, used = _f1_per_class(confusion_matrix(labels, preds, c))
  if not used.any():
    return {"macro_f1": float("nan"), "weighted_f1": float("nan")}
  macro = float(f1[used].mean())
  weighted = float((f1 * support).sum() / support.sum()) if support.sum() else 0.0
  return {"macro_f1": macro, "weighted_f1": weighted}


def per_class_f1(labels, preds, num_classes: int) -> np.ndarray:
  f1, _, _ = _f1_per_class(confusion_matrix(labels, preds, num_classes))
  return f1


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of boolean `positive` scored by `scores` (ties count half; Mann-Whitney U)."""
  positive = np.asarray(positive, bool)
  scores = np.asarray(scores, np.float64)
  n_pos = int(positive.sum())
  n_neg = positive.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  # Average ranks handle ties exactly as the trapezoidal ROC area does.
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(scores.size, np.float64)
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [scores.size]])
  avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
  ranks[order] = np.repeat(avg, ends - starts)
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


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
  cm = confusion_matrix(labels, preds, num_classes).astype(np.float64)
  n = cm.sum()
  if n == 0:
    return float("nan")
  expected = np.outer(cm.sum(1), cm.sum(0)) / n
  idx = np.arange(num_classes)
  if weights is None:
    w = 1.0 - np.eye(num_classes)
  elif weights == "linear":
    w = np.abs(idx[:, None] - idx[None, :]).astype(np.float64)
  elif weights == "quadratic":
    w = ((idx[:, None] - idx[None, :]) ** 2).astype(np.float64)
  else:
    raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
  denom = (w * expected).sum()
  if denom == 0:
    return float("nan")
  return float(1.0 - (w * cm).sum() / denom)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


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
