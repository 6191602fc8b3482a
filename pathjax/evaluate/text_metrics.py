"""Generated-text metrics (report generation, captioning): the libraries' own scorers.

`score(predictions, references)` returns, on a 0-100 scale:

* `bleu`: corpus BLEU from sacrebleu (its default 13a tokenizer, exponential smoothing,
  a reference string or a list of them per prediction), with `bleu_1`..`bleu_4` its n-gram
  precisions and
  `bleu_bp` the brevity penalty (0-1).
* `rouge_l`: mean over predictions of rouge-score's ROUGE-L F-measure (Porter stemming, its
  default tokenizer: lowercase, alphanumeric words).
* `meteor` and `cider` through pycocoevalcap (optional extra `captioning`): CIDEr-D
  (pycocoevalcap's `Cider`, pure Python; its idf comes from the references of this corpus,
  so one prediction alone scores 0) and METEOR 1.5 (pycocoevalcap's jar, needs Java on
  PATH). Both get texts lowercased with punctuation dropped (what COCO's PTB tokenizer does,
  without starting Java for it). When the extra or Java is missing the metric is left out
  and `skipped` says why, so a caller never mistakes a missing metric for a zero.

`most_frequent_baseline(train_texts)` is the report a model that ignores its input would
write; `report_generation(...)` scores predictions and that baseline on the same references
and `format_comparison` prints them side by side.
"""

from __future__ import annotations

import collections
import functools
import re
import shutil
from typing import Any, Iterable, Sequence

PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                         "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}",
                         '"', "/", "\\", "*", "#", "%", "&", "+", "=", "<", ">", "|", "~", "@"])
CAPTIONING_EXTRA = "pip install 'pathjax[captioning]' (pycocoevalcap)"


class TextMetricsError(ValueError):
  """Predictions and references that cannot be scored together (the message says why)."""


def _check(predictions: Sequence[str], references: Sequence[str | Sequence[str]]
           ) -> tuple[list[str], list[list[str]]]:
  """(predictions, references as a list of reference lists); refuses mismatched inputs."""
  predictions, references = list(predictions), list(references)
  if len(predictions) != len(references):
    raise TextMetricsError(f"{len(predictions)} predictions but {len(references)} references; "
                           "score one prediction per reference (or per list of references)")
  if not predictions:
    raise TextMetricsError("no predictions to score")
  bad = next((i for i, t in enumerate(predictions) if not isinstance(t, str)), None)
  if bad is not None:
    raise TextMetricsError(f"prediction {bad} is a {type(predictions[bad]).__name__}, not a string")
  refs = []
  for i, r in enumerate(references):
    r = [r] if isinstance(r, str) else list(r)
    if not r or not all(isinstance(x, str) for x in r):
      raise TextMetricsError(f"reference {i} must be a string or a non-empty list of strings")
    refs.append(r)
  return predictions, refs


def coco_tokenize(text: str) -> str:
  """Lowercased words with punctuation tokens dropped, space-joined (COCO caption style)."""
  tokens = re.findall(r"\w+(?:'\w+)?|[^\w\s]", text.lower())
  return " ".join(t for t in tokens if t not in PUNCTUATION)


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
  import sacrebleu
  predictions, references = _check(predictions, references)
  width = max(len(r) for r in references)  # sacrebleu: None pads a shorter reference list
  streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
  result = sacrebleu.corpus_bleu(predictions, streams)
  out = {"bleu": float(result.score), "bleu_bp": float(result.bp)}
  out.update({f"bleu_{n + 1}": float(p) for n, p in enumerate(result.precisions)})
  return out


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Mean ROUGE-L F-measure x 100 (rouge-score, stemmed)."""
  from rouge_score import rouge_scorer
  predictions, references = _check(predictions, references)
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  total = sum(scorer.score_multi(ref, pred)["rougeL"].fmeasure
              for pred, ref in zip(predictions, references))
  return 100.0 * total / len(predictions)


def coco_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
                 meteor: bool = True) -> tuple[dict[str, float], dict[str, str]]:
  """(CIDEr-D and METEOR x 100, {metric: why it was skipped})."""
  predictions, references = _check(predictions, references)
  try:
    from pycocoevalcap.cider.cider import Cider
  except ImportError:
    why = f"pycocoevalcap is not installed: {CAPTIONING_EXTRA}"
    return {}, {"cider": why, **({"meteor": why} if meteor else {})}
  res = {i: [coco_tokenize(p)] for i, p in enumerate(predictions)}
  gts = {i: [coco_tokenize(x) for x in r] for i, r in enumerate(references)}
  scores: dict[str, float] = {}
  skipped: dict[str, str] = {}
  scores["cider"] = 100.0 * float(Cider().compute_score(gts, res)[0])
  if not meteor:
    return scores, skipped
  if shutil.which("java") is None:
    skipped["meteor"] = "METEOR needs Java (the java command is not on PATH)"
    return scores, skipped
  # The jar cannot score an empty hypothesis line; an empty prediction scores 0 by definition.
  keep = [i for i in res if res[i][0].strip()]
  if keep:
    _, per = _meteor().compute_score({i: gts[i] for i in keep}, {i: res[i] for i in keep})
    scores["meteor"] = 100.0 * float(sum(per)) / len(res)
  else:
    scores["meteor"] = 0.0
  return scores, skipped


@functools.lru_cache(maxsize=1)
def _meteor():
  """One METEOR Java process per Python process (it takes seconds to load its tables);
  pycocoevalcap's Meteor stops it when it is garbage collected."""
  from pycocoevalcap.meteor.meteor import Meteor
  return Meteor()


def score(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
          coco: bool = True, meteor: bool = True) -> dict[str, Any]:
  """BLEU, ROUGE-L and (when available) CIDEr-D / METEOR, all x 100, plus `n` and `skipped`.

  `coco=False` leaves out pycocoevalcap's metrics, `meteor=False` the Java one (seconds to
  start)."""
  predictions, references = _check(predictions, references)
  out: dict[str, Any] = {"n": len(predictions)}
  out.update(bleu(predictions, references))
  out["rouge_l"] = rouge_l(predictions, references)
  skipped: dict[str, str] = {}
  if coco:
    extra, skipped = coco_metrics(predictions, references, meteor=meteor)
    out.update(extra)
  out["skipped"] = skipped
  return out


def most_frequent_baseline(train_texts: Iterable[str]) -> str:
  """The most frequent training text (whitespace-normalised; ties: the first seen)."""
  counts = collections.Counter(" ".join(t.split()) for t in train_texts
                               if isinstance(t, str) and t.strip())
  if not counts:
    raise TextMetricsError("no non-empty training text to take a most-frequent baseline from")
  return counts.most_common(1)[0][0]


def report_generation(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
                      train_texts: Iterable[str] | None = None, baseline: str | None = None,
                      coco: bool = True, meteor: bool = True) -> dict[str, Any]:
  """Scores `predictions` and the most-frequent-report baseline on the same references.

  The baseline is `baseline` if given, else `most_frequent_baseline(train_texts)`. Returns
  {"model": score(...), "baseline": score(...), "baseline_text": str, "n": int}."""
  predictions, references = _check(predictions, references)
  if baseline is None:
    if train_texts is None:
      raise TextMetricsError("pass train_texts (for the most-frequent baseline) or baseline")
    baseline = most_frequent_baseline(train_texts)
  kw = dict(coco=coco, meteor=meteor)
  return {"n": len(predictions), "baseline_text": baseline,
          "model": score(predictions, references, **kw),
          "baseline": score([baseline] * len(references), references, **kw)}


def format_comparison(result: dict[str, Any]) -> str:
  """A small table: one row per metric, model and baseline columns."""
  names = [k for k in ("bleu", "rouge_l", "meteor", "cider") if k in result["model"]]
  lines = [f"{'metric':<10}{'model':>9}{'baseline':>10}"]
  for k in names:
    lines.append(f"{k:<10}{result['model'][k]:>9.2f}{result['baseline'].get(k, float('nan')):>10.2f}")
  for metric, why in result["model"].get("skipped", {}).items():
    lines.append(f"{metric}: skipped ({why})")
  lines.append(f"n = {result['n']}; baseline = the most frequent training report: "
               f"{result['baseline_text'][:80]!r}")
  return "\n".join(lines)
