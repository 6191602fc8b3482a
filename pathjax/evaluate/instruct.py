"""Slide chat evaluation (pathjax.recipes.slide_instruct): multiple-choice VQA accuracy and
captioning BLEU / ROUGE-L on the recipe's held-out conversations.

Tasks (registered at import; `config.evals` entries with `data` "heldout", "train" or "all"):

  slide_vqa       multiple-choice questions (task "mcq"): the model's greedy answer to the
                  question (the gold assistant turn removed) is parsed for the option it
                  picks (instructions.parse_choice: an option's text exactly, or "B", "B.",
                  "(B) ...") and must be the gold option; chance = mean 1 / number of choices (0.25 for A-D), printed
                  beside the accuracy. Also accuracy per question kind (dominant / absent / share)
                  and the share of questions given the most frequent answer (a model stuck at
                  one letter scores that letter's gold share, near chance but not chance).
  slide_caption   captioning conversations (task "caption"): generated reports vs the true
                  ones with pathjax.evaluate.text_metrics (BLEU, ROUGE-L) next to the most
                  frequent training caption.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pathjax.evaluate.results import TaskResult
from pathjax.evaluate.tasks import register_task
from pathjax.input import instructions as inst


class SlideChatModel:
  """A slide_instruct recipe's answers for (slide id, conversation) pairs, in batches."""

  def __init__(self, recipe, params, *, batch_size: int = 16):
    self.recipe, self.params, self.batch_size = recipe, params, int(batch_size)
    self._cache: dict[str, dict] = {}

  def _slide(self, sid: str) -> dict:
    from pathjax.recipes.pathalign import slide_arrays
    if sid not in self._cache:
      sf = self.recipe.embeddings[sid]
      self._cache[sid] = slide_arrays(sf.features, sf.grid, self.recipe._num_patches(), None,
                                      np.float32)
    return self._cache[sid]

  def answer(self, slides: Sequence[str], conversations: Sequence[Sequence[dict]], *,
             max_new_tokens: int = 32) -> list[str]:
    out: list[str] = []
    for a in range(0, len(slides), self.batch_size):
      arrs = [self._slide(s) for s in slides[a:a + self.batch_size]]
      stack = lambda k: np.stack([x[k] for x in arrs])
      out += self.recipe.answer(self.params, stack("features"), stack("coords"), stack("patch_mask"),
                                conversations[a:a + self.batch_size], max_new_tokens=max_new_tokens)
    return out


def _question_kind(record: dict) -> str:
  text = " ".join(m["content"] for m in record["messages"] if m["role"] == "user").lower()
  for kind, key in (("dominant", "dominates"), ("absent", "absent"), ("share", "share")):
    if key in text:
      return kind
  return "other"


def run_vqa(records: list[dict], model: SlideChatModel, *, report=print) -> TaskResult:
  """Exact-match multiple-choice accuracy over `records` (task "mcq")."""
  prompts = [r["messages"][:-1] for r in records]
  answers = model.answer([r["slide"] for r in records], prompts, max_new_tokens=12)
  picked = [inst.parse_choice(a, r.get("choices")) for a, r in zip(answers, records)]
  hit = np.array([p == r["answer"] for p, r in zip(picked, records)], float)
  chance = float(np.mean([1.0 / len(r.get("choices") or inst.LETTERS) for r in records]))
  letters = [p for p in picked if p is not None]
  top = max(set(letters), key=letters.count) if letters else None
  metrics: dict[str, Any] = {"accuracy": float(hit.mean()), "chance": chance, "n": float(len(records)),
                             "unparsed": float(np.mean([p is None for p in picked])),
                             # A head stuck at one answer scores the gold share of that letter.
                             "top_answer_share": letters.count(top) / len(records) if top else 0.0}
  kinds = [_question_kind(r) for r in records]
  for k in sorted(set(kinds)):
    sel = np.array([x == k for x in kinds])
    metrics[f"accuracy_{k}"] = float(hit[sel].mean())
  summary = (f"multiple-choice VQA over {len(records)} questions: accuracy "
             f"{metrics['accuracy']:.3f} (chance {chance:.3f}); "
             + ", ".join(f"{k} {metrics[f'accuracy_{k}']:.2f}" for k in sorted(set(kinds)))
             + f"; unparsed answers {metrics['unparsed']:.2f}; the most frequent answer ({top}) "
             f"is given to {metrics['top_answer_share']:.2f} of the questions (1.00: a constant answer)")
  report(summary)
  preds = [{"slide": r["slide"], "answer": r["answer"], "generated": a, "correct": bool(h)}
           for r, a, h in zip(records, answers, hit)]
  return TaskResult("slide_vqa", metrics, preds, summary=summary)


def answer_prior_accuracy(train: Sequence[dict], test: Sequence[dict]) -> dict[str, float]:
  """A slide-blind baseline for multiple-choice questions: each test question answered with
  its option that was most often the right one for the same question (its text without the
  options, e.g. "what share of the tissue is tumor?") in training (ties: the first option).
  What VQA accuracy a model that ignores the slide can reach from the question and its
  options alone; overall and per kind."""
  from collections import Counter

  def question(r):
    text = " ".join(m["content"] for m in r["messages"] if m["role"] == "user")
    return text.replace(inst.IMAGE, "").split("\nA. ")[0].strip()

  right = Counter()
  for r in train:
    if r.get("choices"):
      right[(question(r), r["choices"][inst.LETTERS.index(r["answer"])])] += 1
  hits, kinds = [], []
  for r in test:
    kind, q = _question_kind(r), question(r)
    options = r.get("choices") or []
    pick = max(range(len(options)), key=lambda i: (right[(q, options[i])], -i)) if options else -1
    hits.append(pick >= 0 and inst.LETTERS[pick] == r["answer"])
    kinds.append(kind)
  hits_ = np.array(hits, float)
  out = {"accuracy": float(hits_.mean()) if len(hits) else 0.0}
  for k in sorted(set(kinds)):
    out[f"accuracy_{k}"] = float(hits_[np.array([x == k for x in kinds])].mean())
  return out


def run_caption(records: list[dict], model: SlideChatModel, *, train_texts: Sequence[str] | None,
                max_new_tokens: int = 64, report=print) -> TaskResult:
  from pathjax.evaluate import text_metrics
  refs = [r["messages"][-1]["content"] for r in records]
  gen = model.answer([r["slide"] for r in records], [r["messages"][:-1] for r in records],
                     max_new_tokens=max_new_tokens)
  kw = dict(coco=False, meteor=False)
  metrics: dict[str, Any] = {"n": float(len(records))}
  if train_texts:
    result = text_metrics.report_generation(gen, refs, train_texts=train_texts, **kw)
    metrics.update(model=result["model"], most_frequent_caption=result["baseline"])
    table = text_metrics.format_comparison(result)
  else:
    metrics["model"] = text_metrics.score(gen, refs, **kw)
    table = "\n".join(f"{k}: {v:.2f}" for k, v in metrics["model"].items() if isinstance(v, float))
  summary = "\n".join([f"captioning over {len(records)} held-out slides", table,
                       f"example {records[0]['slide']}:\n  generated: {gen[0]}\n  true:      {refs[0]}"])
  report(summary)
  preds = [{"slide": r["slide"], "caption": t, "generated": g} for r, t, g in zip(records, refs, gen)]
  return TaskResult("slide_caption", metrics, preds, summary=summary)


def _inputs(task: str):
  def make_inputs(eval_cfg, recipe):
    get = lambda k, d=None: eval_cfg.get(k, d) if hasattr(eval_cfg, "get") else getattr(eval_cfg, k, d)
    split = get("data", "") or "heldout"
    if split not in ("heldout", "train", "all"):
      raise ValueError(f"evals: a slide chat task's data is the recipe's split: heldout, train or "
                       f"all (got {split!r})")
    limit = int(get("max_examples", 0) or 0)
    cache: dict[str, Any] = {}

    def load():
      if "ds" not in cache:
        records = recipe.records(split, tasks=(task,))
        if limit:
          records = records[:limit]
        train = None
        if task == "caption" and split != "train":
          train = [r["messages"][-1]["content"] for r in recipe.records("train", tasks=("caption",))]
        cache["ds"] = (records, train)
      return cache["ds"], None

    def embedder(params):
      model = cache.get("model")
      if model is None:
        model = cache["model"] = SlideChatModel(recipe, params, batch_size=int(get("batch_size", 16) or 16))
      model.params = params
      return model
    return load, embedder
  return make_inputs


@register_task("slide_vqa", needs=("answer",), per_magnification=False, make_inputs=_inputs("mcq"))
def _slide_vqa(dataset, model, *, report=print, **unused):
  records, _ = dataset
  return run_vqa(records, model, report=report)


@register_task("slide_caption", needs=("answer",), per_magnification=False,
               make_inputs=_inputs("caption"))
def _slide_caption(dataset, model, *, report=print, **unused):
  records, train = dataset
  return run_caption(records, model, train_texts=train, report=report)


def probe_visual_tokens(model: SlideChatModel, train: dict[str, str], test: dict[str, str], *,
                        C: float = 1.0) -> dict[str, float]:
  """Is a slide label ({slide: label}, e.g. its dominant tissue) recoverable from the frozen
  encoder's visual tokens? A standardised logistic-regression probe on the flattened tokens
  of the `train` slides, scored on the `test` slides, next to the majority-label rate: the
  ceiling of what the LLM can read from the image for that question."""
  import jax
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  recipe = model.recipe
  fn = jax.jit(lambda p, f, c, m: recipe.encoder.visual_tokens(p, f, c, m)[0])

  def feats(slides):
    rows = []
    for s in slides:
      a = model._slide(s)
      rows.append(np.asarray(fn(model.params["encoder"], a["features"][None], a["coords"][None],
                                a["patch_mask"][None]))[0].reshape(-1))
    return np.stack(rows)
  tr, te = sorted(train), sorted(test)
  ytr, yte = np.array([train[s] for s in tr]), np.array([test[s] for s in te])
  clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
  clf.fit(feats(tr), ytr)
  values, counts = np.unique(ytr, return_counts=True)
  return {"accuracy": float(np.mean(clf.predict(feats(te)) == yte)),
          "majority": float(np.mean(yte == values[counts.argmax()])),
          "chance": 1.0 / len(values),
          "n_train": float(len(tr)), "n_test": float(len(te))}
