"""Report-generation metrics: sacrebleu's documented example, hand-computed BLEU / ROUGE-L,
edge cases, the most-frequent baseline and the optional pycocoevalcap metrics."""

import math
import shutil
import sys

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from pathjax.evaluate import text_metrics as tm  # noqa: E402


def test_sacrebleu_documented_example():
  # sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ...), two references.
  refs = [["The dog bit the man.", "The dog had bit the man."],
          ["It was not unexpected.", "No one was surprised."],
          ["The man bit him first.", "The man had bitten the dog."]]
  hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
  out = tm.score(hyps, refs, coco=False)
  assert round(out["bleu"], 2) == 48.53
  assert [round(out[f"bleu_{n}"], 1) for n in (1, 2, 3, 4)] == [82.4, 50.0, 45.5, 37.5]
  assert round(out["bleu_bp"], 3) == 0.943


def test_hand_computed_bleu_and_rouge_l():
  out = tm.score(["the cat sat on the mat"], ["the cat sat on a mat"], coco=False)
  # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths: BP 1.
  assert out["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-9)
  # LCS "the cat sat on mat" = 5 of 6 words both ways.
  assert out["rouge_l"] == pytest.approx(100 * 5 / 6)
  # ROUGE-L is a mean over predictions; a second, perfect prediction lifts it to the average.
  two = tm.score(["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "a dog"], coco=False)
  assert two["rouge_l"] == pytest.approx(100 * (5 / 6 + 1) / 2)


def test_exact_match_empty_prediction_and_one_word_reference():
  exact = tm.score(["tumor cells invade the stroma"], ["tumor cells invade the stroma"], coco=False)
  assert exact["bleu"] == pytest.approx(100.0) and exact["rouge_l"] == pytest.approx(100.0)
  empty = tm.score([""], ["tumor cells invade the stroma"], coco=False)
  assert empty["bleu"] == 0.0 and empty["rouge_l"] == 0.0
  # One word: the unigram matches, but corpus BLEU-4 has no 2..4-grams to match: 0.
  one = tm.score(["carcinoma"], ["carcinoma"], coco=False)
  assert one["bleu_1"] == 100.0 and one["bleu"] == 0.0 and one["rouge_l"] == 100.0
  wrong = tm.score(["adenoma"], ["carcinoma"], coco=False)
  assert wrong["bleu_1"] == 0.0 and wrong["rouge_l"] == 0.0


def test_bad_inputs_are_clear_errors():
  with pytest.raises(tm.TextMetricsError, match="2 predictions but 1 references"):
    tm.score(["a", "b"], ["a"])
  with pytest.raises(tm.TextMetricsError, match="no predictions"):
    tm.score([], [])
  with pytest.raises(tm.TextMetricsError, match="prediction 0 is a NoneType"):
    tm.score([None], ["a"])
  with pytest.raises(tm.TextMetricsError, match="reference 0"):
    tm.score(["a"], [[]])


def test_most_frequent_baseline_and_comparison():
  train = ["benign  tissue.", "tumor.", "benign tissue.", "tumor.", "stroma."]
  assert tm.most_frequent_baseline(train) == "benign tissue."   # tie with "tumor.": first seen
  with pytest.raises(tm.TextMetricsError, match="no non-empty training text"):
    tm.most_frequent_baseline(["", "  "])
  preds = ["the slide shows invasive tumor", "benign tissue."]
  refs = ["the slide shows invasive tumor", "benign stroma."]
  result = tm.report_generation(preds, refs, train_texts=train, coco=False)
  assert result["baseline_text"] == "benign tissue."
  assert result["model"]["bleu"] > result["baseline"]["bleu"]
  assert result["baseline"] == tm.score(["benign tissue."] * 2, refs, coco=False)
  table = tm.format_comparison(result)
  assert "bleu" in table and "rouge_l" in table and "benign tissue." in table
  with pytest.raises(tm.TextMetricsError, match="train_texts"):
    tm.report_generation(preds, refs)


def test_coco_metrics_skip_cleanly(monkeypatch):
  monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
  monkeypatch.setitem(sys.modules, "pycocoevalcap.cider", None)
  monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
  out = tm.score(["a b"], ["a b"])
  assert "cider" not in out and "meteor" not in out
  assert "captioning" in out["skipped"]["cider"] and "captioning" in out["skipped"]["meteor"]


def test_cider_and_java_skip(monkeypatch):
  pytest.importorskip("pycocoevalcap")
  monkeypatch.setattr(tm.shutil, "which", lambda name: None)
  refs = ["the slide shows invasive tumor", "benign stroma with glands", "necrosis and tumor"]
  good = tm.score(refs, refs)
  bad = tm.score(["benign stroma with glands"] * 3, refs)
  assert "meteor" not in good and "Java" in good["skipped"]["meteor"]
  assert good["cider"] > bad["cider"] > 0
  assert tm.coco_tokenize("Tumor, (grade 2).") == "tumor grade 2"


@pytest.mark.slow
def test_meteor_with_java():
  pytest.importorskip("pycocoevalcap")
  if shutil.which("java") is None:
    pytest.skip("METEOR needs Java")
  out = tm.score(["tumor cells invade the stroma", ""],
                 ["tumor cells invade the stroma", "benign glands"])
  assert out["skipped"] == {}
  # Exact match scores 1, the empty prediction 0: the mean is 50.
  assert out["meteor"] == pytest.approx(50.0, abs=0.01)
  assert math.isfinite(out["cider"])
