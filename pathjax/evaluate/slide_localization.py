"""The `localization` task (PathFLIP): text prompt -> per-patch heatmap -> pointing game and
heatmap AUC against the ground-truth class masks of synthetic slides.

For every slide of the split (default: held-out) with a class map in the truth file(s)
(`data.truth` of the recipe's config: `truth.npz` written by `pathjax synth-slides`, several
comma-separated), and every tissue class present on at least one patch: the class's prompt
(its report name, e.g. "fibrous stroma", or `prompts`: a JSON file {class: text}) -> the
model's map (region attention x within-region patch attention, recipe predict function
"region_attention"; for grid regions averaged over the grid's translations unless
`shifts=False`, see pathflip.slide_heatmaps) -> the pointing game (hit when the top patch
is of the class; chance = the class's share of the slide's tissue patches) and the heatmap
AUC against the class's patches. A patch belongs to a class when the class covers at least
half of it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pathjax.evaluate import localization as loc
from pathjax.evaluate.results import TaskResult, format_table
from pathjax.evaluate import slides as _slides  # may be mid-import (slides -> tasks -> here)
from pathjax.evaluate.tasks import register_task

TARGET_COVER = 0.5


def read_truths(spec: str) -> dict:
  """{slide id: synth.SlideTruth} from one or more comma-separated truth.npz files."""
  from pathjax.wsi import synth
  if not spec:
    raise _slides.SlideEvalError("localization needs ground truth: set data.truth to truth.npz (written "
                         "by `pathjax synth-slides` next to reports.jsonl; comma-separate several)")
  out = {}
  for path in [p for p in str(spec).split(",") if p]:
    if not os.path.isfile(path):
      raise _slides.SlideEvalError(f"data.truth: {path} does not exist (truth.npz from `pathjax synth-slides`)")
    out.update(synth.read_truth(path))
  return out


def class_prompts(prompts: str | None) -> dict[str, str]:
  """class -> prompt text: the synthetic reports' names of the classes, or a JSON file."""
  from pathjax.wsi import synth
  if not prompts:
    return dict(synth.REPORT_NAMES)
  if not os.path.isfile(prompts):
    raise _slides.SlideEvalError(f"localization prompts {prompts}: not a file (JSON {{class: text}})")
  with open(prompts, encoding="utf-8") as f:
    try:
      table = json.load(f)
    except json.JSONDecodeError as e:
      raise _slides.SlideEvalError(f"{prompts}: not JSON ({e.msg}); write {{class: text}}") from None
  return {str(k): str(v) for k, v in table.items()}


def slide_extent(embeddings, slide_id: str, coords: np.ndarray, grid: np.ndarray) -> int:
  """A patch's level-0 side: the manifest's "extent", else from coords = grid * extent."""
  for s in embeddings.manifest["slides"]:
    if s.get("slide_id") == slide_id and s.get("extent"):
      return int(float(s["extent"]))
  cols = grid[:, 0] > 0
  if cols.any():
    return int(np.median(coords[cols, 0] / grid[cols, 0]))
  raise _slides.SlideEvalError(f"cannot tell the patch extent of slide {slide_id} (no 'extent' in the "
                       "embeddings manifest)")


def class_targets(truth, coords: np.ndarray, extent: int) -> dict[str, np.ndarray]:
  """class -> boolean [N]: patches the class covers by at least TARGET_COVER."""
  from pathjax.wsi import synth
  return {c: loc.mask_fractions(truth.class_map == i, coords, extent, truth.scale) >= TARGET_COVER
          for i, c in enumerate(synth.TISSUE_CLASSES)}


def run_localization(ds, heatmaps, truths: dict, *, prompts=None, report=print) -> TaskResult:
  """`heatmaps(features, grid, texts) -> [T, N]`; see the module docstring."""
  texts = class_prompts(prompts)
  per_class: dict[str, list] = {}
  preds = []
  missing = [s for s in ds.slide_ids if s not in truths]
  if len(missing) == len(ds.slide_ids):
    raise _slides.SlideEvalError(f"none of the {len(ds.slide_ids)} slides has a class map in data.truth "
                         f"(e.g. {missing[:3]}); point data.truth at their truth.npz")
  for sid in ds.slide_ids:
    if sid not in truths:
      continue
    sf = ds.data.embeddings[sid]
    coords = np.asarray(sf.coords, np.int64)
    targets = class_targets(truths[sid], coords, slide_extent(ds.data.embeddings, sid, coords, sf.grid))
    present = [c for c, t in targets.items() if t.any() and c in texts]
    if not present:
      continue
    scores = heatmaps(np.asarray(sf.features, np.float32), np.asarray(sf.grid), [texts[c] for c in present])
    for c, s in zip(present, scores):
      per_class.setdefault(c, []).append((s, targets[c]))
      preds.append({"slide": sid, "class": c, "prompt": texts[c],
                    "hit": loc.pointing_hit(s, targets[c]), "chance": float(targets[c].mean())})
  pairs = [p for c in per_class for p in per_class[c]]
  if not pairs:
    raise _slides.SlideEvalError("no slide of the split has a tissue class on any patch: nothing to localize")
  metrics = loc.localization_metrics(pairs)
  rows = [{"class": "all", **{k: metrics[k] for k in ("pointing_game", "pointing_chance", "heatmap_auc")},
           "n": metrics["slides"]}]
  for c in sorted(per_class):
    m = loc.localization_metrics(per_class[c])
    metrics[f"{c}/pointing_game"], metrics[f"{c}/pointing_chance"] = m["pointing_game"], m["pointing_chance"]
    metrics[f"{c}/heatmap_auc"] = m["heatmap_auc"]
    rows.append({"class": c, **{k: m[k] for k in ("pointing_game", "pointing_chance", "heatmap_auc")},
                 "n": m["slides"]})
  metrics["pairs"] = float(metrics.pop("slides"))
  metrics.pop("slides_without_target", None)
  ratio = metrics["pointing_game"] / max(metrics["pointing_chance"], 1e-9)
  metrics["pointing_over_chance"] = ratio
  summary = (f"localization over {len(ds.slide_ids) - len(missing)} slides, {len(pairs)} (slide, "
             f"class) pairs: pointing game {metrics['pointing_game']:.3f} vs chance "
             f"{metrics['pointing_chance']:.3f} ({ratio:.2f}x), heatmap AUC "
             f"{metrics['heatmap_auc']:.3f}\n"
             + format_table(rows, ["class", "pointing_game", "pointing_chance", "heatmap_auc", "n"]))
  report(summary)
  return TaskResult("localization", metrics, preds, summary=summary)


def make_inputs(eval_cfg, recipe):
  """(load() -> ((SlideEvalSet, truths), None), embedder(params) -> heatmaps fn)."""
  import jax
  from pathjax.recipes.pathflip import slide_heatmaps
  get = lambda k, d=None: eval_cfg.get(k, d) if hasattr(eval_cfg, "get") else getattr(eval_cfg, k, d)
  split = get("data", "") or "heldout"
  if split not in ("heldout", "train", "all"):
    raise _slides.SlideEvalError(f"evals: the localization task's data is the recipe's split: heldout, "
                         f"train or all (got {split!r})")
  cache = {}
  fn = jax.jit(lambda p, *a, num_regions: recipe.predict_fns(p)["region_attention"](
      *a, num_regions=num_regions), static_argnames=("num_regions",))

  def load():
    if "ds" not in cache:
      cache["ds"] = (_slides.eval_set(recipe, split), read_truths(recipe.config.data.get("truth", "")))
    return cache["ds"], None

  def embedder(params):
    if recipe.tokenizer is None:
      raise _slides.SlideEvalError("localization needs input.tokenizer (the Q-Former's tokenizer)")
    mc = recipe.config.model

    def heatmaps(features, grid, texts):
      ids, mask = recipe.sub_tokenizer(texts)
      call = lambda f, c, m, i, t, r: fn(params, f, c, m, i, t, num_regions=r)
      return slide_heatmaps(call, features, grid, ids, mask, method=mc.regions, size=int(mc.region_size),
                            shifts=bool(get("shifts", True)))
    return heatmaps
  return load, embedder


@register_task("localization", needs=("region_attention",), per_magnification=False,
               make_inputs=make_inputs)
def _localization(dataset, embedder, *, prompts=None, report=print, **unused):
  ds, truths = dataset
  return run_localization(ds, embedder, truths, prompts=prompts, report=report)
