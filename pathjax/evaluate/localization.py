"""Localization metrics for text-conditioned slide heatmaps (PathFLIP).

A heatmap is one score per patch of a slide ([N], the slide's stored patch order). PathFLIP
makes it from the region head's attention over regions times each region's within-region
attention over patches (`patch_scores`). It is scored against a boolean target per patch
(patches of the queried class or lesion, `mask_fractions` from a pixel mask such as the
synthetic slides' class map):

- pointing game: whether the highest-scoring patch is a target. Ties count as the expected
  hit of a random tie-break (the share of targets among the tied maxima), so a constant
  heatmap scores exactly the chance level, the target's share of the tissue patches.
- heatmap AUC: ROC AUC of the scores against the targets (ties count half), NaN for a
  slide whose patches are all or none targets.

`localization_metrics` averages both over slides that have at least one target patch and
reports the chance level beside them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from pathjax.evaluate.metrics import binary_auc


def patch_scores(region_weights: np.ndarray, patch_weights: np.ndarray, index: np.ndarray,
                 mask: np.ndarray, num_patches: int) -> np.ndarray:
  """Per-patch heatmap [N]: sum over region rows l and real slots s with index[l, s] = n of
  region_weights[l] * patch_weights[l, s]. region_weights [L], patch_weights / index / mask
  [L, S] (`pathjax.input.regions.Regions`); a region sampled twice contributes twice, as the
  attention mass the model gives it does."""
  region_weights = np.asarray(region_weights, np.float64)
  patch_weights, index, mask = (np.asarray(a) for a in (patch_weights, index, mask))
  if patch_weights.shape != index.shape or mask.shape != index.shape or region_weights.shape != index.shape[:1]:
    raise ValueError(f"shapes disagree: region_weights {region_weights.shape}, patch_weights "
                     f"{patch_weights.shape}, index {index.shape}, mask {mask.shape}")
  mask = mask.astype(bool)
  out = np.zeros(num_patches, np.float64)
  np.add.at(out, index[mask], (region_weights[:, None] * patch_weights)[mask])
  return out


def mask_fractions(mask: np.ndarray, coords: np.ndarray, extent: int, scale: int = 1) -> np.ndarray:
  """Fraction of each patch covered by a boolean pixel mask.

  mask [h, w] at 1/scale of level 0 (the synthetic slides' class map has scale 16),
  coords [N, 2] level-0 (x, y) of each patch's top-left corner, extent its level-0 side.
  A patch covers mask cells [x // scale, ceil((x + extent) / scale)) (at least one cell);
  cells outside the mask count as not covered.
  """
  mask = np.asarray(mask, bool)
  coords = np.asarray(coords, np.int64)
  h, w = mask.shape
  integral = np.zeros((h + 1, w + 1), np.int64)
  integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)
  x0, y0 = coords[:, 0] // scale, coords[:, 1] // scale
  x1 = np.maximum(x0 + 1, -(-(coords[:, 0] + extent) // scale))
  y1 = np.maximum(y0 + 1, -(-(coords[:, 1] + extent) // scale))
  cx0, cx1, cy0, cy1 = (np.clip(a, 0, lim) for a, lim in ((x0, w), (x1, w), (y0, h), (y1, h)))
  covered = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
  return covered / ((x1 - x0) * (y1 - y0))


def pointing_hit(scores: np.ndarray, target: np.ndarray) -> float:
  """1 if the top patch is a target, 0 if not; the target share among tied maxima."""
  scores, target = np.asarray(scores, np.float64), np.asarray(target, bool)
  if scores.shape != target.shape or scores.ndim != 1 or not len(scores):
    raise ValueError(f"scores {scores.shape} and target {target.shape} must be equal [N >= 1]")
  top = scores == scores.max()
  return float(target[top].mean())


def localization_metrics(slides: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
  """Means over slides with a target patch: {"pointing_game", "pointing_chance" (mean target
  share of the patches), "heatmap_auc" (over slides where it is defined), "slides",
  "slides_without_target"}."""
  hits, chance, aucs, skipped = [], [], [], 0
  for scores, target in slides:
    target = np.asarray(target, bool)
    if not target.any():
      skipped += 1
      continue
    hits.append(pointing_hit(scores, target))
    chance.append(float(target.mean()))
    auc = binary_auc(target, np.asarray(scores, np.float64))
    if not np.isnan(auc):
      aucs.append(auc)
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
  return {"pointing_game": mean(hits), "pointing_chance": mean(chance), "heatmap_auc": mean(aucs),
          "slides": len(hits), "slides_without_target": skipped}


def scores_to_grid(scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """The heatmap as an image [rows, cols] over the patch grid (grid [N, 2] = col, row);
  cells without a patch are NaN (transparent when painted)."""
  grid = np.asarray(grid, np.int64)
  out = np.full((grid[:, 1].max() + 1, grid[:, 0].max() + 1), np.nan)
  out[grid[:, 1], grid[:, 0]] = np.asarray(scores, np.float64)
  return out
