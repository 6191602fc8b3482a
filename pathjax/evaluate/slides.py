"""Slide-level evaluation for PathAlign: retrieval, zero-shot classification, report generation.

Tasks (registered at import; also usable from training through `config.evals` entries whose
`kind` is one of these names and whose `data` is "heldout", "train" or "all", the split of the
recipe's own data.embeddings + data.reports; `labels` names a slide -> class file):

  slide_retrieval      slide -> report and report -> slide top-1/3/5/10 over held-out slides,
                       by ITC similarity (max over queries) and, for a recipe with an "itm"
                       predict function, by ITC re-ranked with ITM over the ITC top-k
                       (`rerank_k`); chance levels printed beside them.
  slide_zeroshot       zero-shot slide classification from prompts (a prompt file, or the
                       class names with CONCH's templates): AUC, balanced accuracy, ...
                       For a patch model (predict functions "image" and "text", no "slide":
                       MR-PLIP, a converted CLIP) MI-Zero's protocol: every patch of a slide
                       (a records:DIR[@MAG] or slides:DIR data spec, read by
                       pathjax.evaluate.data) is scored against the class prompts (cosine),
                       and each class's slide score is the mean of its k largest patch scores
                       (`topk`: MI-Zero's sweep 1, 5, 10, 50, 100 by default; every k is
                       reported as top{k}/..., the headline metrics are the median k's).
  report_generation    (stage 2) generated reports scored with
                       pathjax.evaluate.text_metrics.score (BLEU, ROUGE-L) when that module is
                       installed, against a most-frequent-training-report baseline.

Candidates are the distinct report texts of the split: slides sharing an identical report
are all correct for it (and it for them). Chance for top-k with p correct among C
candidates is 1 - C(C-p, k) / C(C, k), averaged over queries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from pathjax.evaluate import metrics as metrics_lib
from pathjax.evaluate.results import TaskResult, format_table
from pathjax.evaluate.tasks import register_task


class SlideEvalError(ValueError):
  """Evaluation inputs that cannot be used (the message names the file and the fix)."""


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass
class SlideEvalSet:
  """Slides of one split with their paired report texts (and class labels when known)."""
  slide_ids: list[str]
  texts: list[str]
  data: Any                                  # pathalign.SlideReportData
  labels: list[str] | None = None
  train_texts: list[str] | None = None       # for the most-frequent-report baseline

  def __len__(self) -> int:
    return len(self.slide_ids)


def read_labels(path: str) -> dict[str, str]:
  """slide -> class from JSON {slide: label}, JSON lines {"slide", "label"} or CSV slide,label."""
  if not os.path.isfile(path):
    raise SlideEvalError(f"labels file {path} does not exist (JSON {{slide: label}}, JSON lines "
                         "with slide and label, or CSV slide,label)")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    if path.endswith(".csv"):
      import csv
      rows = list(csv.DictReader(text.splitlines()))
      return {r["slide"]: r["label"] for r in rows}
    if text.lstrip().startswith("{") and not path.endswith(".jsonl"):
      return {str(k): str(v) for k, v in json.loads(text).items()}
    return {str(o["slide"]): str(o["label"]) for o in map(json.loads, filter(str.strip, text.splitlines()))}
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise SlideEvalError(f"{path}: not a labels file (JSON {{slide: label}}, JSON lines or CSV "
                         f"slide,label): {e}") from None


def eval_set(recipe, split: str = "heldout", labels: str | None = None) -> SlideEvalSet:
  """The recipe's own data (data.embeddings + data.reports) restricted to `split`."""
  data = recipe.data(split)
  lab = None
  if labels:
    table = read_labels(labels)
    missing = [s for s in data.slide_ids if s not in table]
    if missing:
      raise SlideEvalError(f"labels file {labels} has no label for {len(missing)} slide(s), e.g. "
                           f"{missing[:3]}")
    lab = [table[s] for s in data.slide_ids]
  train_texts = None
  if split != "train":
    try:
      train_texts = recipe.data("train").texts
    except ValueError:
      train_texts = None
  return SlideEvalSet(list(data.slide_ids), list(data.texts), data, lab, train_texts)


# ----------------------------------------------------------------------------- model


class SlideModel:
  """Jitted predict functions of a PathAlign recipe over fixed-shape batches."""

  def __init__(self, recipe, params, *, batch_size: int = 16):
    import jax
    self.recipe, self.params = recipe, params
    self.batch_size = int(batch_size)
    fns = recipe.predict_fns(None)
    del fns  # keys only; the jitted closures below take params as an argument
    self._slide = jax.jit(lambda p, f, c, m: recipe.predict_fns(p)["slide"](f, c, m))
    self._text = jax.jit(lambda p, ids, mask: recipe.predict_fns(p)["text"](ids, mask))
    self._itm = jax.jit(lambda p, f, c, m, ids, mask: recipe.predict_fns(p)["itm"](f, c, m, ids, mask))
    self._cache: dict[str, dict] = {}

  def slide_arrays(self, ds: SlideEvalSet) -> dict[str, np.ndarray]:
    """Every slide of `ds` at M = min(max_patches, longest) patches (a fixed sample per slide)."""
    key = id(ds)
    if key not in self._cache:
      from pathjax.recipes.pathalign import slide_arrays
      cfg = self.recipe.config.data
      m = max(1, min(int(cfg.max_patches), max(ds.data.patches)))
      rows = []
      for i, sid in enumerate(ds.slide_ids):
        sf = ds.data.embeddings[sid]
        rows.append(slide_arrays(sf.features, sf.grid, m, np.random.default_rng([0, i]), np.float32))
      self._cache[key] = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return self._cache[key]

  def _batches(self, n: int):
    for start in range(0, n, self.batch_size):
      yield start, min(n, start + self.batch_size)

  def _pad(self, a: np.ndarray, n: int) -> np.ndarray:
    if len(a) == n:
      return a
    return np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])

  def embed_slides(self, ds: SlideEvalSet) -> np.ndarray:
    arr = self.slide_arrays(ds)
    out = []
    for a, b in self._batches(len(ds)):
      f, c, m = (self._pad(arr[k][a:b], self.batch_size) for k in ("features", "coords", "patch_mask"))
      out.append(np.asarray(self._slide(self.params, f, c, m))[:b - a])
    return np.concatenate(out)                                  # [N, Q, E]

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if self.recipe.tokenizer is None:
      raise SlideEvalError("evaluation needs input.tokenizer (the Q-Former's tokenizer)")
    return self.recipe.tokenizer(list(texts))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    ids, mask = self.tokenize(texts)
    out = []
    for a, b in self._batches(len(ids)):
      out.append(np.asarray(self._text(self.params, self._pad(ids[a:b], self.batch_size),
                                       self._pad(mask[a:b], self.batch_size)))[:b - a])
    return np.concatenate(out)                                  # [T, E]

  def match(self, ds: SlideEvalSet, slide_index: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """ITM match probabilities of pairs (slide_index[k], texts[k])."""
    arr = self.slide_arrays(ds)
    ids, mask = self.tokenize(texts)
    out = []
    for a, b in self._batches(len(ids)):
      sel = slide_index[a:b]
      args = [self._pad(arr[k][sel], self.batch_size) for k in ("features", "coords", "patch_mask")]
      args += [self._pad(ids[a:b], self.batch_size), self._pad(mask[a:b], self.batch_size)]
      out.append(np.asarray(self._itm(self.params, *args))[:b - a])
    return np.concatenate(out)


def similarity(slide_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
  """ITC similarity [N, T]: max over queries of the cosine (as losses_blip.itc_similarity);
  one embedding per slide [N, E] (PathFLIP) is one query."""
  slide_emb = np.asarray(slide_emb)
  if slide_emb.ndim == 2:
    slide_emb = slide_emb[:, None]
  return np.max(np.einsum("nqe,te->ntq", slide_emb, text_emb), axis=-1)


def chance_at_k(positives: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """Expected recall@k of a random ranking: 1 - C(C - p, k) / C(C, k), averaged over rows."""
  c = positives.shape[1]
  p = positives.sum(1)
  return {k: float(np.mean([1.0 - math.comb(c - int(pi), min(k, c)) / math.comb(c, min(k, c))
                            for pi in p])) for k in ks}


# ---------------------------------------------------------------------------- tasks


def run_retrieval(ds: SlideEvalSet, model: SlideModel, *, ks: Sequence[int] = (1, 3, 5, 10),
                  rerank_k: int = 10, report=print) -> TaskResult:
  """Top-k retrieval both ways by ITC similarity, and re-ranked by ITM when the recipe has
  an "itm" predict function (PathAlign; PathFLIP has none: its rows are ITC only)."""
  recipe = getattr(model, "recipe", None)
  has_itm = "itm" in recipe.predict_fns(None) if recipe is not None else hasattr(model, "match")
  candidates = list(dict.fromkeys(ds.texts))                  # distinct reports
  col = {t: j for j, t in enumerate(candidates)}
  pos = np.zeros((len(ds), len(candidates)), bool)
  pos[np.arange(len(ds)), [col[t] for t in ds.texts]] = True  # slide i -> its report
  img, txt = model.embed_slides(ds), model.embed_texts(candidates)
  sim = similarity(img, txt)                                  # [N slides, C reports]
  ks = tuple(int(k) for k in ks)
  rows, metrics = [], {}
  for direction, s, p in (("slide_to_report", sim, pos), ("report_to_slide", sim.T, pos.T)):
    itc = metrics_lib.recall_at_k(s, p, ks)
    chance = chance_at_k(p, ks)
    if not has_itm:
      for kk in ks:
        metrics[f"{direction}/itc_top{kk}"] = itc[kk]
        metrics[f"{direction}/chance_top{kk}"] = chance[kk]
        rows.append({"direction": direction, "k": kk, "itc": itc[kk], "chance": chance[kk]})
      continue
    # ITM re-ranking of each query's ITC top-k (BLIP-2's retrieval protocol).
    k = min(int(rerank_k), s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    if direction == "slide_to_report":
      slides, texts = np.repeat(np.arange(s.shape[0]), k), [candidates[j] for j in top.reshape(-1)]
    else:
      slides, texts = top.reshape(-1), [candidates[i] for i in np.repeat(np.arange(s.shape[0]), k)]
    prob = model.match(ds, slides, texts).reshape(s.shape[0], k)
    reranked = np.full(s.shape, -np.inf)
    np.put_along_axis(reranked, top, 1.0 + prob, axis=1)      # top-k first, ordered by ITM
    itm = metrics_lib.recall_at_k(np.where(np.isfinite(reranked), reranked, s - 10.0), p, ks)
    for kk in ks:
      metrics[f"{direction}/itc_top{kk}"] = itc[kk]
      metrics[f"{direction}/itm_top{kk}"] = itm[kk]
      metrics[f"{direction}/chance_top{kk}"] = chance[kk]
      rows.append({"direction": direction, "k": kk, "itc": itc[kk], "itc+itm": itm[kk],
                   "chance": chance[kk]})
  metrics["num_slides"], metrics["num_reports"] = float(len(ds)), float(len(candidates))
  how = (f"ITM re-ranks the ITC top-{min(int(rerank_k), len(candidates))}" if has_itm
         else "cosine similarity")
  summary = (f"slide retrieval over {len(ds)} slides / {len(candidates)} distinct reports ({how})\n"
             + format_table(rows, ["direction", "k", "itc"] + (["itc+itm"] if has_itm else [])
                            + ["chance"]))
  report(summary)
  preds = [{"slide": sid, "report": t, "top1_report": candidates[int(np.argmax(sim[i]))],
            "correct_top1": bool(pos[i, int(np.argmax(sim[i]))])}
           for i, (sid, t) in enumerate(zip(ds.slide_ids, ds.texts))]
  return TaskResult("slide_retrieval", metrics, preds, summary=summary)


def run_zeroshot(ds: SlideEvalSet, model: SlideModel, *, prompts=None, report=print) -> TaskResult:
  from pathjax.evaluate import prompts as prompts_lib
  if ds.labels is None:
    raise SlideEvalError("slide_zeroshot needs slide labels: set the evaluation's `labels` "
                         "(a JSON {slide: label} file)")
  classes = sorted(set(ds.labels))
  p = prompts_lib.load_prompts(prompts) if prompts else prompts_lib.default_prompts(classes)
  mapping = prompts_lib.match_labels(p, ds.labels)
  classifier = prompts_lib.build_classifier(p, model.embed_texts)     # [C, E]
  img = model.embed_slides(ds)
  scores = similarity(img, classifier)                                # [N, C]
  index = {c: i for i, c in enumerate(p.classes)}
  y = np.array([index[mapping[l]] for l in ds.labels])
  m = metrics_lib.classification_metrics(y, metrics_lib.softmax(scores * 100.0))
  counts = np.bincount(y, minlength=len(p.classes))
  m["chance_balanced_accuracy"] = 1.0 / len(p.classes)
  m["chance_auc"] = 0.5
  m["majority_accuracy"] = float(counts.max() / counts.sum())
  summary = (f"zero-shot slide classification, {len(ds)} slides, {len(p.classes)} classes: "
             f"AUC {m['auc']:.4f} (chance 0.5), balanced accuracy {m['balanced_accuracy']:.4f} "
             f"(chance {1.0 / len(p.classes):.4f}), accuracy {m['accuracy']:.4f} "
             f"(majority {m['majority_accuracy']:.4f})")
  report(summary)
  preds = [{"slide": s, "label": l, "pred": p.classes[int(np.argmax(scores[i]))]}
           for i, (s, l) in enumerate(zip(ds.slide_ids, ds.labels))]
  return TaskResult("slide_zeroshot", m, preds, summary=summary)


def run_report_generation(ds: SlideEvalSet, model: SlideModel, *, max_new_tokens: int = 48,
                          num_beams: int = 1, coco: bool = False, report=print) -> TaskResult:
  """Generated reports (stage 2) against the true ones: BLEU / ROUGE-L (and CIDEr with
  coco=True) through pathjax.evaluate.text_metrics, next to the most frequent training
  report (when the split is not the training split)."""
  if "generate" not in model.recipe.predict_fns(None):
    raise SlideEvalError("report_generation needs a stage-2 model (predict function 'generate')")
  arr = model.slide_arrays(ds)
  fn = model.recipe.predict_fns(model.params)["generate"]
  generated = []
  for a, b in model._batches(len(ds)):
    generated += fn(arr["features"][a:b], arr["coords"][a:b], arr["patch_mask"][a:b],
                    max_new_tokens=max_new_tokens, num_beams=num_beams)
  metrics: dict[str, Any] = {"num_slides": float(len(ds))}
  try:
    from pathjax.evaluate import text_metrics
  except ImportError:
    text_metrics = None
  table = ""
  if text_metrics is not None:
    kw = dict(coco=coco, meteor=False)
    if ds.train_texts:
      result = text_metrics.report_generation(generated, ds.texts, train_texts=ds.train_texts, **kw)
      metrics.update(model=result["model"], most_frequent_report=result["baseline"])
      table = text_metrics.format_comparison(result)
    else:
      metrics["model"] = text_metrics.score(generated, ds.texts, **kw)
      table = "\n".join(f"{k}: {v:.2f}" for k, v in metrics["model"].items() if isinstance(v, float))
  summary = "\n".join([f"report generation over {len(ds)} slides", table,
                       f"example {ds.slide_ids[0]}:\n  generated: {generated[0]}\n"
                       f"  true:      {ds.texts[0]}"])
  report(summary)
  preds = [{"slide": s, "report": t, "generated": g}
           for s, t, g in zip(ds.slide_ids, ds.texts, generated)]
  return TaskResult("report_generation", metrics, preds, summary=summary)


# ------------------------------------------------------------ patch models (MI-Zero)


MIZERO_TOPK = (1, 5, 10, 50, 100)   # MI-Zero's top-k sweep (its run_mizero's `topj`)


def topk_pool(scores: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
  """MI-Zero's top-k pooling of one slide's patch scores [N, C]: per class, the mean of its
  min(k, N) largest patch scores. Returns {k: [C]}."""
  s = -np.sort(-np.asarray(scores, np.float32), axis=0)          # descending per class
  return {int(k): s[:max(1, min(int(k), len(s)))].mean(axis=0) for k in ks}


def _topk_tuple(topk) -> tuple[int, ...]:
  ks = (topk,) if isinstance(topk, (int, np.integer)) else tuple(topk or MIZERO_TOPK)
  if not ks or any(int(k) < 1 for k in ks):
    raise SlideEvalError(f"slide_zeroshot: topk must be positive integers, got {topk!r}")
  return tuple(int(k) for k in ks)


@dataclasses.dataclass
class SlidePatchSet:
  """Labelled slides as their patches (a pathjax.evaluate.data Dataset with `slides`)."""
  patches: Any
  slide_ids: list[str]
  labels: list[str]

  def __len__(self) -> int:
    return len(self.slide_ids)


def patch_eval_set(dataset, labels) -> SlidePatchSet:
  """The slides of `dataset` (patches grouped by `dataset.slides`) with their labels
  (`labels`: a labels file or a {slide: label} mapping)."""
  if not any(s is not None for s in dataset.slides):
    raise SlideEvalError(f"{dataset.name}: slide_zeroshot for a patch model needs patches grouped "
                         "by slide: use a records:DIR[@MAG] or slides:DIR data spec")
  if not labels:
    raise SlideEvalError("slide_zeroshot needs slide labels: give a labels file (JSON {slide: "
                         "label}, JSON lines with slide and label, or CSV slide,label)")
  table = read_labels(labels) if isinstance(labels, str) else dict(labels)
  ids = sorted({s for s in dataset.slides if s is not None})
  missing = [s for s in ids if s not in table]
  if missing:
    raise SlideEvalError(f"labels {labels if isinstance(labels, str) else ''} have no label for "
                         f"{len(missing)} slide(s) of {dataset.name}, e.g. {missing[:3]}")
  return SlidePatchSet(dataset, ids, [str(table[s]) for s in ids])


def run_patch_zeroshot(ps: SlidePatchSet, embedder, *, prompts=None, topk=MIZERO_TOPK,
                       batch_size: int = 64, progress=None, report=print) -> TaskResult:
  """MI-Zero zero-shot slide classification with a patch model (pathjax.evaluate.features
  Embedder: unit-norm image and text embeddings)."""
  from pathjax.evaluate import features as features_lib
  from pathjax.evaluate import prompts as prompts_lib
  ks = _topk_tuple(topk)
  classes = sorted(set(ps.labels))
  p = prompts_lib.load_prompts(prompts) if prompts else prompts_lib.default_prompts(classes)
  mapping = prompts_lib.match_labels(p, ps.labels)
  classifier = prompts_lib.build_classifier(p, embedder.text)          # [C, E]
  feats = features_lib.extract_features(ps.patches, embedder, batch_size=batch_size,
                                        progress=progress, desc="embed slide patches", report=report)
  scores = feats.embeddings @ classifier.T                            # [patches, C] cosine
  rows: dict[str, list[int]] = {}
  for row, i in enumerate(feats.indices):
    rows.setdefault(ps.patches.slides[int(i)], []).append(row)
  kept = [j for j, s in enumerate(ps.slide_ids) if s in rows]
  lost = [s for s in ps.slide_ids if s not in rows]
  if lost:
    report(f"warning: {len(lost)} slide(s) have no readable patch and are left out: {lost[:5]}")
  if not kept:
    raise SlideEvalError(f"{ps.patches.name}: no slide has a readable patch")
  pooled = [topk_pool(scores[rows[ps.slide_ids[j]]], ks) for j in kept]
  index = {c: i for i, c in enumerate(p.classes)}
  y = np.array([index[mapping[ps.labels[j]]] for j in kept])
  counts = np.bincount(y, minlength=len(p.classes))
  headline = sorted(ks)[len(ks) // 2]
  m: dict[str, Any] = {}
  for k in ks:
    slide_scores = np.stack([q[k] for q in pooled])                   # [slides, C]
    m[f"top{k}"] = metrics_lib.classification_metrics(y, metrics_lib.softmax(slide_scores * 100.0))
  m.update(m[f"top{headline}"])
  m.update(topk=float(headline), num_slides=float(len(kept)), num_patches=float(len(feats)),
           chance_balanced_accuracy=1.0 / len(p.classes), chance_auc=0.5,
           majority_accuracy=float(counts.max() / counts.sum()))
  table = format_table([{"k": k, "auc": m[f"top{k}"]["auc"],
                         "balanced_accuracy": m[f"top{k}"]["balanced_accuracy"]} for k in ks],
                       ["k", "auc", "balanced_accuracy"])
  summary = (f"zero-shot slide classification (MI-Zero top-k pooling of {len(feats)} patch "
             f"scores), {len(kept)} slides, {len(p.classes)} classes: AUC {m['auc']:.4f} "
             f"(chance 0.5), balanced accuracy {m['balanced_accuracy']:.4f} (chance "
             f"{1.0 / len(p.classes):.4f}) at k={headline}\n{table}")
  report(summary)
  head = np.stack([q[headline] for q in pooled])
  preds = [{"slide": ps.slide_ids[j], "label": ps.labels[j],
            "pred": p.classes[int(np.argmax(head[r]))],
            **{f"score_{c}": float(head[r, ci]) for ci, c in enumerate(p.classes)}}
           for r, j in enumerate(kept)]
  return TaskResult("slide_zeroshot", m, preds, summary=summary)


# --------------------------------------------------------------- registry / training


def make_inputs(eval_cfg, recipe):
  """(load() -> (SlideEvalSet, None), embedder(params) -> SlideModel) for the registry; for
  a patch model (no "slide" predict function) (load() -> (SlidePatchSet, None),
  embedder(params) -> a features Embedder) over the data spec `data`."""
  get = lambda k, d=None: eval_cfg.get(k, d) if hasattr(eval_cfg, "get") else getattr(eval_cfg, k, d)
  provided = set(recipe.predict_fns(None))
  if "slide" not in provided:
    if not {"image", "text"} <= provided:
      raise SlideEvalError(f"slide tasks need predict functions 'slide' and 'text' (a slide "
                           f"model) or 'image' and 'text' (a patch model); the recipe provides "
                           f"{sorted(provided)}")
    return _patch_inputs(eval_cfg, recipe, get)
  split = get("data", "") or "heldout"
  if split not in ("heldout", "train", "all"):
    raise SlideEvalError(f"evals: a slide task's data is the recipe's split: heldout, train or "
                         f"all (got {split!r})")
  labels = get("labels", "") or None
  cache = {}

  def load():
    if "ds" not in cache:
      cache["ds"] = eval_set(recipe, split, labels)
    return cache["ds"], None

  def embedder(params):
    model = cache.get("model")
    if model is None:
      model = cache["model"] = SlideModel(recipe, params, batch_size=int(get("batch_size", 16) or 16))
    model.params = params
    return model
  return load, embedder


def _patch_inputs(eval_cfg, recipe, get):
  from pathjax.evaluate import data as data_lib
  from pathjax.evaluate.registry import recipe_embedder
  spec, labels = get("data", "") or "", get("labels", "") or ""
  if not spec or spec in ("heldout", "train", "all"):
    raise SlideEvalError(f"evals: slide_zeroshot for a patch model reads patches: set `data` to a "
                         f"records:DIR[@MAG] or slides:DIR spec (got {spec!r}) and `labels` to a "
                         "slide -> class file")
  cache = {}
  make = recipe_embedder(recipe)

  def load():
    if "ds" not in cache:
      cache["ds"] = patch_eval_set(data_lib.load_dataset(spec), labels)
    return cache["ds"], None
  return load, make


@register_task("slide_retrieval", needs=("slide", "text"), per_magnification=False,
               make_inputs=make_inputs)
def _slide_retrieval(dataset, embedder, *, k=10, report=print, **unused):
  return run_retrieval(dataset, embedder, rerank_k=int(k or 10), report=report)


# needs "text" only: a slide model adds "slide", a patch model "image" (make_inputs checks).
@register_task("slide_zeroshot", needs=("text",), per_magnification=False,
               make_inputs=make_inputs)
def _slide_zeroshot(dataset, embedder, *, prompts=None, labels=None, topk=None, batch_size=64,
                    progress=None, report=print, **unused):
  if isinstance(dataset, SlideEvalSet):
    return run_zeroshot(dataset, embedder, prompts=prompts, report=report)
  if not isinstance(dataset, SlidePatchSet):   # `pathjax eval --data SPEC --labels FILE`
    dataset = patch_eval_set(dataset, labels)
  return run_patch_zeroshot(dataset, embedder, prompts=prompts, topk=topk or MIZERO_TOPK,
                            batch_size=int(batch_size or 64), progress=progress, report=report)


@register_task("report_generation", needs=("slide", "generate"), per_magnification=False,
               make_inputs=make_inputs)
def _report_generation(dataset, embedder, *, report=print, **unused):
  return run_report_generation(dataset, embedder, report=report)


