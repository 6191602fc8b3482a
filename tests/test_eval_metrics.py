"""pathjax.evaluate.metrics against scikit-learn on random predictions."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from pathjax.evaluate import metrics


def _random_case(seed, n=200, c=5, absent=()):
  rng = np.random.default_rng(seed)
  present = [k for k in range(c) if k not in absent]
  y = rng.choice(present, size=n)
  logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y] * rng.uniform(0, 1, size=(n, 1))
  scores = metrics.softmax(logits)
  return y, scores, scores.argmax(1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("absent", [(), (2,), (0, 4)])
def test_classification_metrics_match_sklearn(seed, absent):
  y, scores, pred = _random_case(seed, absent=absent)
  c = scores.shape[1]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert metrics.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert metrics.balanced_accuracy(y, pred, c) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    f1 = metrics.f1_scores(y, pred, c)
    assert f1["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert f1["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    labels = np.arange(c)
    assert metrics.cohen_kappa(y, pred, c) == pytest.approx(skm.cohen_kappa_score(y, pred, labels=labels))
    assert metrics.cohen_kappa(y, pred, c, "quadratic") == pytest.approx(
        skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
    assert metrics.cohen_kappa(y, pred, c, "linear") == pytest.approx(
        skm.cohen_kappa_score(y, pred, labels=labels, weights="linear"))
    np.testing.assert_array_equal(metrics.confusion_matrix(y, pred, c), skm.confusion_matrix(y, pred, labels=labels))
  # AUC: equal to sklearn's multi-class OvR when every class is present; with absent
  # classes, the mean of sklearn's binary AUCs over the present classes.
  if not absent:
    assert metrics.ovr_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores, multi_class="ovr"))
    probs = metrics.softmax(scores)  # sklearn's one-vs-one needs rows that sum to 1
    assert metrics.ovo_auc(y, probs) == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovo"))
  else:
    present = sorted(set(y.tolist()))
    expected = np.mean([skm.roc_auc_score(y == k, scores[:, k]) for k in present])
    assert metrics.ovr_auc(y, scores) == pytest.approx(expected)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      # sklearn's per-class OvR AUCs are NaN for the absent classes (its macro mean is NaN);
      # we leave those classes out of the mean, as documented in metrics.py.
      per_class = skm.roc_auc_score(y, scores, multi_class="ovr", labels=np.arange(c), average=None)
    assert np.isnan(per_class[list(absent)]).all()
    assert metrics.ovr_auc(y, scores) == pytest.approx(np.nanmean(per_class))


def test_weighted_f1_with_classes_absent_from_labels_but_predicted():
  rng = np.random.default_rng(7)
  y = rng.choice([0, 1, 3], size=300)
  pred = rng.choice(5, size=300)  # predicts classes 2 and 4, which never occur
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    f1 = metrics.f1_scores(y, pred, 5)
    assert f1["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert f1["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert metrics.balanced_accuracy(y, pred, 5) == pytest.approx(skm.balanced_accuracy_score(y, pred))


def test_binary_auc_with_ties_matches_sklearn():
  rng = np.random.default_rng(3)
  y = rng.integers(0, 2, 500)
  s = np.round(rng.uniform(size=500) + 0.3 * y, 1)  # many ties
  assert metrics.binary_auc(y == 1, s) == pytest.approx(skm.roc_auc_score(y, s))
  scores = np.stack([1 - s, s], 1)
  assert metrics.ovr_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, s))
  assert np.isnan(metrics.binary_auc(np.ones(4, bool), np.arange(4.0)))


def test_recall_at_k():
  sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
  pos = np.eye(3, dtype=bool)
  r = metrics.recall_at_k(sim, pos, (1, 2, 3))
  assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
