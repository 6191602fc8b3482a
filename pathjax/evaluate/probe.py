"""Frozen-feature probes: logistic regression, k-nearest neighbours, k-shot.

Train/test: a separate training dataset when given (`--train-data`), otherwise a stratified
split of the data (`test_fraction`, `seed`). Classes are the training labels' (plus the
dataset's declared classes); a test label never seen in training can only be wrong.

* linear probe: scikit-learn's L-BFGS logistic regression on the L2-normalised
  embeddings; the inverse regularisation C is chosen from `C_GRID` by balanced accuracy on
  a stratified validation split of the training set (`val_fraction`), then refit on the
  whole training set.
* kNN: cosine similarity, the k nearest training examples vote with weight exp(sim / 0.07)
  (DINO's weighted kNN); the vote shares are the class scores.
* k-shot: for each k in `shots` and each of `seeds`, k training examples per class are
  drawn and a nearest-centroid classifier (SimpleShot: class means of the normalised
  embeddings, cosine to the means) is evaluated on the whole test set; mean and standard
  deviation over seeds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pathjax.evaluate import data as data_lib
from pathjax.evaluate import features as features_lib
from pathjax.evaluate import metrics as metrics_lib
from pathjax.evaluate import plots
from pathjax.evaluate.results import TaskResult, format_table

C_GRID = tuple(float(c) for c in np.logspace(-2, 4, 7))
KNN_TEMPERATURE = 0.07
HEADLINE = ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "auc", "kappa", "quadratic_kappa")


def stratified_split(labels: Sequence, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held-out) index arrays; every class with >= 2 examples has >= 1 held out and
  >= 1 kept."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels, dtype=object)
  keep, held = [], []
  for c in sorted(set(labels.tolist())):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_held = int(round(len(idx) * fraction))
    if len(idx) >= 2:
      n_held = min(max(n_held, 1), len(idx) - 1)
    else:
      n_held = 0
    held += idx[:n_held].tolist()
    keep += idx[n_held:].tolist()
  return np.sort(np.asarray(keep, np.int64)), np.sort(np.asarray(held, np.int64))


def _features(dataset, embedder, train_dataset, *, test_fraction, seed, batch_size, progress, report):
  dataset = dataset.labelled()
  if not len(dataset):
    raise data_lib.DataError("probes need labelled examples; the data has none")
  if train_dataset is not None:
    train_dataset = train_dataset.labelled()
    train = features_lib.extract_features(train_dataset, embedder, batch_size=batch_size,
                                          progress=progress, desc=f"embed {train_dataset.name} (train)",
                                          report=report)
    test = features_lib.extract_features(dataset, embedder, batch_size=batch_size, progress=progress,
                                         desc=f"embed {dataset.name} (test)", report=report)
    declared = list(dict.fromkeys(list(train_dataset.classes) + list(dataset.classes)))
  else:
    feats = features_lib.extract_features(dataset, embedder, batch_size=batch_size, progress=progress,
                                          report=report)
    tr, te = stratified_split(feats.labels, test_fraction, seed)
    if not len(te):
      raise data_lib.DataError(f"{dataset.name}: too few examples to hold out a test split; "
                               "give --train-data or more data")
    train, test = _take(feats, tr), _take(feats, te)
    declared = list(dataset.classes)
  classes = list(dict.fromkeys(declared + sorted(set(train.labels) - set(declared))
                               + sorted(set(test.labels) - set(declared))))
  return train, test, classes


def _take(f: features_lib.Features, idx) -> features_lib.Features:
  idx = np.asarray(idx, np.int64)
  return features_lib.Features([f.ids[i] for i in idx], [f.labels[i] for i in idx],
                               [f.captions[i] for i in idx], f.embeddings[idx], f.indices[idx], f.skipped)


def _encode(labels, classes) -> np.ndarray:
  order = {c: k for k, c in enumerate(classes)}
  return np.asarray([order[l] for l in labels], np.int64)


def _result(task, name, test, y, scores, classes, extra_metrics, info, report_lines=()):
  pred = scores.argmax(1)
  metrics = metrics_lib.classification_metrics(y, scores, preds=pred)
  metrics.update(extra_metrics)
  cm = metrics_lib.confusion_matrix(y, pred, len(classes))
  metrics["confusion_matrix"] = cm.tolist()
  metrics["classes"] = classes
  rows = []
  for i in range(len(y)):
    row = dict(id=test.ids[i], label=test.labels[i], prediction=classes[pred[i]], correct=int(pred[i] == y[i]))
    row.update({f"score_{c}": float(scores[i, k]) for k, c in enumerate(classes)})
    rows.append(row)
  summary = format_table([{"metric": k, "value": metrics[k]} for k in HEADLINE], ["metric", "value"])
  if report_lines:
    summary = "\n".join(report_lines) + "\n" + summary
  return TaskResult(task, metrics, rows,
                    plots={"confusion_matrix.png": lambda path: plots.confusion_matrix_png(
                        cm, classes, path, f"{task} {name}")},
                    info=info, summary=summary)


def _fit_logreg(x, y, C, num_classes, seed=0):
  from sklearn.linear_model import LogisticRegression
  model = LogisticRegression(C=C, max_iter=1000, random_state=seed)
  model.fit(x, y)
  return model


def _logreg_scores(model, x, num_classes):
  proba = model.predict_proba(x)
  scores = np.zeros((len(x), num_classes))
  scores[:, model.classes_] = proba
  return scores


def linear_probe_features(train, test, classes, *, C_grid=C_GRID, val_fraction=0.2, seed=0):
  """(scores [N_test, C], chosen C, validation table) for embedded train/test sets."""
  ytr = _encode(train.labels, classes)
  if len(set(ytr.tolist())) < 2:
    raise data_lib.DataError(f"a linear probe needs at least 2 classes in the training data; got {sorted(set(train.labels))}")
  fit_idx, val_idx = stratified_split(ytr, val_fraction, seed)
  val_table = []
  best_C = C_grid[len(C_grid) // 2]
  if len(val_idx) and len(set(ytr[fit_idx].tolist())) >= 2:
    best = -1.0
    for C in C_grid:
      m = _fit_logreg(train.embeddings[fit_idx], ytr[fit_idx], C, len(classes), seed)
      pred = _logreg_scores(m, train.embeddings[val_idx], len(classes)).argmax(1)
      score = metrics_lib.balanced_accuracy(ytr[val_idx], pred, len(classes))
      val_table.append({"C": C, "val_balanced_accuracy": score})
      if score > best + 1e-12:
        best, best_C = score, C
  model = _fit_logreg(train.embeddings, ytr, best_C, len(classes), seed)
  return _logreg_scores(model, test.embeddings, len(classes)), best_C, val_table


def knn_scores(train_x, train_y, test_x, num_classes, k=20, temperature=KNN_TEMPERATURE):
  k = max(1, min(k, len(train_x)))
  sim = test_x @ train_x.T
  top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
  top_sim = np.take_along_axis(sim, top, axis=1)
  w = np.exp((top_sim - top_sim.max(1, keepdims=True)) / temperature)
  scores = np.zeros((len(test_x), num_classes))
  np.add.at(scores, (np.repeat(np.arange(len(test_x)), k), train_y[top].ravel()), w.ravel())
  return scores / scores.sum(1, keepdims=True)


def centroid_scores(train_x, train_y, test_x, num_classes):
  centroids = np.zeros((num_classes, train_x.shape[1]), np.float64)
  present = np.zeros(num_classes, bool)
  for c in range(num_classes):
    sel = train_y == c
    if sel.any():
      centroids[c] = train_x[sel].mean(0)
      present[c] = True
  centroids = features_lib.l2_normalize(centroids)
  logits = test_x @ centroids.T
  logits[:, ~present] = -np.inf
  return metrics_lib.softmax(logits / KNN_TEMPERATURE)


def run_linear_probe(dataset, embedder, *, train_dataset=None, test_fraction=0.3, val_fraction=0.2,
                     seed=0, C_grid=C_GRID, batch_size=64, progress=None, report=print) -> TaskResult:
  train, test, classes = _features(dataset, embedder, train_dataset, test_fraction=test_fraction,
                                   seed=seed, batch_size=batch_size, progress=progress, report=report)
  scores, best_C, val_table = linear_probe_features(train, test, classes, C_grid=C_grid,
                                                    val_fraction=val_fraction, seed=seed)
  y = _encode(test.labels, classes)
  lines = [f"regularisation C = {best_C:g} (chosen on a {val_fraction:.0%} validation split by balanced accuracy)"]
  return _result("linear_probe", dataset.name, test, y, scores, classes,
                 {"C": best_C, "num_train": float(len(train))},
                 {"validation": val_table, "skipped": train.skipped + test.skipped if train_dataset else test.skipped,
                  "warnings": dataset.warnings}, lines)


def run_knn(dataset, embedder, *, train_dataset=None, k=20, test_fraction=0.3, seed=0, batch_size=64,
            progress=None, report=print) -> TaskResult:
  train, test, classes = _features(dataset, embedder, train_dataset, test_fraction=test_fraction,
                                   seed=seed, batch_size=batch_size, progress=progress, report=report)
  scores = knn_scores(train.embeddings, _encode(train.labels, classes), test.embeddings, len(classes), k=k)
  y = _encode(test.labels, classes)
  return _result("knn", dataset.name, test, y, scores, classes,
                 {"k": float(min(k, len(train))), "num_train": float(len(train))},
                 {"skipped": test.skipped, "warnings": dataset.warnings})


def run_kshot(dataset, embedder, *, train_dataset=None, shots=(1, 2, 4, 8, 16), seeds=5, test_fraction=0.3,
              seed=0, batch_size=64, progress=None, report=print) -> TaskResult:
  train, test, classes = _features(dataset, embedder, train_dataset, test_fraction=test_fraction,
                                   seed=seed, batch_size=batch_size, progress=progress, report=report)
  ytr, yte = _encode(train.labels, classes), _encode(test.labels, classes)
  table, rows = [], []
  present, counts = np.unique(ytr, return_counts=True)
  smallest = int(counts.min())
  warnings_out = []
  used_shots: list[int] = []
  for requested in shots:  # a k-shot score needs k examples of every class: cap, and say so
    k = min(int(requested), smallest)
    if k < int(requested):
      message = (f"kshot: {requested} shots requested but class {classes[int(present[counts.argmin()])]!r} "
                 f"has only {smallest} training examples; using {k} shots")
      report(f"warning: {message}")
      warnings_out.append(message)
    if k not in used_shots:
      used_shots.append(k)
  for k in used_shots:
    runs = []
    for s in range(seeds):
      rng = np.random.default_rng(seed * 1000 + s)
      chosen = np.concatenate([rng.permutation(np.flatnonzero(ytr == c))[:k] for c in np.unique(ytr)])
      scores = centroid_scores(train.embeddings[chosen], ytr[chosen], test.embeddings, len(classes))
      runs.append(metrics_lib.classification_metrics(yte, scores))
    entry = {"shots": int(k)}
    for name in ("accuracy", "balanced_accuracy", "weighted_f1", "auc"):
      vals = np.asarray([r[name] for r in runs])
      entry[name] = float(np.nanmean(vals))
      entry[f"{name}_std"] = float(np.nanstd(vals))
      rows.append({"shots": int(k), "metric": name, "mean": entry[name], "std": entry[f"{name}_std"],
                   **{f"seed{i}": float(v) for i, v in enumerate(vals)}})
    table.append(entry)
  metrics = {f"{e['shots']}shot": {k: v for k, v in e.items() if k != "shots"} for e in table}
  metrics["seeds"] = float(seeds)
  metrics["classes"] = classes
  summary = format_table([{**e, "balanced_accuracy": f"{e['balanced_accuracy']:.4f} +- {e['balanced_accuracy_std']:.4f}",
                           "weighted_f1": f"{e['weighted_f1']:.4f} +- {e['weighted_f1_std']:.4f}"} for e in table],
                         ["shots", "balanced_accuracy", "weighted_f1"])
  plotted = ("balanced_accuracy", "weighted_f1")
  means = {m: [e[m] for e in table] for m in plotted}
  stds = {m: [e[f"{m}_std"] for e in table] for m in plotted}
  shot_list = [e["shots"] for e in table]
  return TaskResult("kshot", metrics, rows,
                    plots={"kshot.png": lambda path: plots.kshot_png(shot_list, means, stds, path,
                                                                     f"k-shot {dataset.name} ({seeds} seeds)")},
                    info={"skipped": test.skipped, "warnings": list(dataset.warnings) + warnings_out,
                          "requested_shots": [int(k) for k in shots]}, summary=summary)
