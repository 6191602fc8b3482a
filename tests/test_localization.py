"""Localization metrics: heatmap composition, mask coverage, pointing game, heatmap AUC."""

import numpy as np
import pytest

from pathjax.evaluate import localization as loc
from pathjax.input import regions as rg


def _auc_direct(scores, target):
  pos, neg = scores[target], scores[~target]
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_patch_scores_sum_over_regions():
  r = rg.window_regions(5, 2, num_regions=4, rng=np.random.default_rng(0))  # 3 windows + 1 duplicate
  rw = np.array([0.1, 0.2, 0.3, 0.4])
  pw = np.arange(8, dtype=np.float64).reshape(4, 2) / 10
  got = loc.patch_scores(rw, pw, r.index, r.mask, 5)
  want = np.zeros(5)
  for l in range(4):
    for s in range(2):
      if r.mask[l, s]:
        want[r.index[l, s]] += rw[l] * pw[l, s]
  np.testing.assert_allclose(got, want)
  assert got[4] == pytest.approx(rw[2] * pw[2, 0] + (rw[3] * pw[3, 0] if r.region[3] == 2 else 0))
  with pytest.raises(ValueError, match="shapes"):
    loc.patch_scores(rw[:3], pw, r.index, r.mask, 5)


def test_mask_fractions_brute_force():
  rng = np.random.default_rng(0)
  mask = rng.random((20, 30)) < 0.3
  coords = np.array([[0, 0], [32, 16], [100, 60], [470, 300], [16 * 29, 16 * 19], [8, 8]])
  got = loc.mask_fractions(mask, coords, extent=40, scale=16)
  for (x, y), g in zip(coords, got):
    x0, y0 = x // 16, y // 16
    x1, y1 = max(x0 + 1, -(-(x + 40) // 16)), max(y0 + 1, -(-(y + 40) // 16))
    cells = [mask[j, i] if j < 20 and i < 30 else False for j in range(y0, y1) for i in range(x0, x1)]
    assert g == pytest.approx(np.mean(cells))


def test_pointing_game_and_auc():
  target = np.array([False, True, True, False, False])
  assert loc.pointing_hit(np.array([0.1, 0.9, 0.2, 0.3, 0.0]), target) == 1.0
  assert loc.pointing_hit(np.array([0.9, 0.1, 0.2, 0.3, 0.0]), target) == 0.0
  assert loc.pointing_hit(np.ones(5), target) == pytest.approx(0.4)      # constant map = chance
  assert loc.pointing_hit(np.array([1, 1, 0, 0, 0.]), target) == 0.5
  with pytest.raises(ValueError):
    loc.pointing_hit(np.ones(3), target)
  rng = np.random.default_rng(1)
  slides = []
  for n in (10, 25, 7):
    t = rng.random(n) < 0.3
    t[0] = True
    slides.append((np.round(rng.random(n) + 0.5 * t, 1), t))  # rounding makes ties
  slides.append((rng.random(6), np.zeros(6, bool)))           # no target: skipped
  slides.append((rng.random(4), np.ones(4, bool)))            # all target: no AUC
  m = loc.localization_metrics(slides)
  assert m["slides"] == 4 and m["slides_without_target"] == 1
  assert m["heatmap_auc"] == pytest.approx(np.mean([_auc_direct(s, t) for s, t in slides[:3]]))
  assert m["pointing_game"] == pytest.approx(np.mean([loc.pointing_hit(s, t) for s, t in slides[:3]] + [1.0]))
  assert m["pointing_chance"] == pytest.approx(np.mean([t.mean() for _, t in slides[:3]] + [1.0]))
  assert np.isnan(loc.localization_metrics([])["pointing_game"])


def test_scores_to_grid():
  grid = np.array([[0, 0], [2, 1], [1, 0]])
  out = loc.scores_to_grid(np.array([1.0, 2.0, 3.0]), grid)
  assert out.shape == (2, 3)
  assert out[0, 0] == 1 and out[1, 2] == 2 and out[0, 1] == 3 and np.isnan(out[1, 0])
