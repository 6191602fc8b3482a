"""PathFLIP regions: windows and grid blocks, partial windows, small slides, sampling."""

import numpy as np
import pytest

from pathjax.input import regions as rg


def _patches(r: rg.Regions) -> list[list[int]]:
  return [list(map(int, i[m])) for i, m in zip(r.index, r.mask)]


def test_windows_keep_last_partial_window():
  r = rg.window_regions(10, 4)
  assert r.index.shape == r.mask.shape == (3, 4) and r.index.dtype == np.int32
  assert _patches(r) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert r.mask[2].tolist() == [True, True, False, False]
  assert r.index[2, 2:].tolist() == [0, 0]  # padding gathers a valid row
  assert r.region.tolist() == [0, 1, 2]


def test_windows_exact_multiple_and_small_slides():
  assert _patches(rg.window_regions(8, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  r = rg.window_regions(3, 256)  # fewer patches than one window (the public code crashes)
  assert r.index.shape == (1, 256) and r.mask.sum() == 3
  assert _patches(rg.window_regions(1, 4)) == [[0]]
  with pytest.raises(ValueError, match="without patches"):
    rg.window_regions(0, 4)
  with pytest.raises(ValueError, match="size"):
    rg.window_regions(5, 0)


def test_sampling_fewer_windows_duplicates_all_kept():
  r = rg.window_regions(10, 4, num_regions=7, rng=np.random.default_rng(0))
  assert r.index.shape == (7, 4)
  assert r.region[:3].tolist() == [0, 1, 2]          # every window once...
  assert set(r.region[3:].tolist()) <= {0, 1, 2}     # ...then random duplicates
  for row in range(7):
    np.testing.assert_array_equal(r.index[row], rg.window_regions(10, 4).index[r.region[row]])
    np.testing.assert_array_equal(r.mask[row], rg.window_regions(10, 4).mask[r.region[row]])


def test_sampling_more_windows_distinct_in_order_and_deterministic():
  draw = lambda seed: rg.window_regions(100, 4, num_regions=6, rng=np.random.default_rng(seed))
  r = draw(1)
  assert len(set(r.region.tolist())) == 6 and np.all(np.diff(r.region) > 0)
  np.testing.assert_array_equal(r.index, draw(1).index)
  assert not np.array_equal(r.region, draw(2).region)
  # every window is equally likely
  counts = np.bincount(np.concatenate([draw(s).region for s in range(2000)]), minlength=25)
  p = 6 / 25
  assert np.all(np.abs(counts / 2000 - p) < 5 * np.sqrt(p * (1 - p) / 2000))


def test_sampling_arguments():
  assert rg.window_regions(10, 4, num_regions=3, rng=np.random.default_rng(0)).region.tolist() == [0, 1, 2]
  with pytest.raises(ValueError, match="rng"):
    rg.window_regions(10, 4, num_regions=2)
  with pytest.raises(ValueError, match="num_regions"):
    rg.window_regions(10, 4, num_regions=0, rng=np.random.default_rng(0))


def test_grid_blocks_are_2d_neighbourhoods():
  # A 5 x 3 (cols x rows) grid with holes, stored in raster order.
  cells = [(x, y) for y in range(3) for x in range(5) if (x, y) not in {(1, 0), (4, 2)}]
  grid = np.array(cells, np.int32)
  r = rg.grid_regions(grid, 2)
  assert r.index.shape == (5, 4)  # blocks (row, col): (0,0) (0,1) (0,2) (1,0) (1,1); (1,2) is empty
  for idx, m in zip(r.index, r.mask):
    pts = grid[idx[m]]
    assert len(np.unique(pts // 2, axis=0)) == 1  # one block each
    for slot in np.nonzero(m)[0]:                 # slot = (y % 2) * 2 + x % 2
      x, y = grid[idx[slot]]
      assert slot == (y % 2) * 2 + x % 2
  assert sorted(i for p in _patches(r) for i in p) == list(range(len(grid)))
  assert r.mask.sum(axis=1).tolist() == [3, 4, 2, 2, 2]
  first = grid[r.index[0][r.mask[0]]].tolist()
  assert first == [[0, 0], [0, 1], [1, 1]]


def test_grid_small_slide_sampling_and_errors():
  r = rg.grid_regions(np.array([[7, 9]]), 16, num_regions=3, rng=np.random.default_rng(0))
  assert r.index.shape == (3, 256) and r.mask.sum() == 3 and r.region.tolist() == [0, 0, 0]
  with pytest.raises(ValueError, match="duplicate"):
    rg.grid_regions(np.array([[0, 0], [0, 0]]), 2)
  with pytest.raises(ValueError, match="integers"):
    rg.grid_regions(np.zeros((2, 2), np.float32), 2)
  with pytest.raises(ValueError, match="shape"):
    rg.grid_regions(np.zeros((0, 2), np.int32), 2)
  with pytest.raises(ValueError, match="side"):
    rg.grid_regions(np.zeros((1, 2), np.int32), 0)


def test_gather_under_jit():
  import jax
  import jax.numpy as jnp
  feats = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
  r = rg.window_regions(10, 4, num_regions=5, rng=np.random.default_rng(0))
  out = jax.jit(lambda f, i, m: jnp.where(m[..., None], f[i], 0.0))(feats, r.index, r.mask)
  assert out.shape == (5, 4, 3)
  np.testing.assert_array_equal(np.asarray(out)[r.mask], feats[r.index[r.mask]])
  assert np.all(np.asarray(out)[~r.mask] == 0)


def test_make_regions_by_name():
  from pathjax.input.subcaptions import slide_rng
  grid = np.array([[x, y] for y in range(5) for x in range(6)], np.int32)
  w = rg.make_regions("window", 4, num_patches=30, num_regions=3, rng=slide_rng(0, "s", 0, 1))
  np.testing.assert_array_equal(w.index, rg.make_regions("window", 4, grid=grid, num_regions=3,
                                                         rng=slide_rng(0, "s", 0, 1)).index)
  g = rg.make_regions("grid", 4, grid=grid)
  np.testing.assert_array_equal(g.index, rg.grid_regions(grid, 2).index)
  assert g.index.shape == (9, 4)
  with pytest.raises(ValueError, match="square"):
    rg.make_regions("grid", 8, grid=grid)
  with pytest.raises(ValueError, match="grid coordinates"):
    rg.make_regions("grid", 4, num_patches=30)
  with pytest.raises(ValueError, match="num_patches"):
    rg.make_regions("window", 4)
  with pytest.raises(ValueError, match="unknown region method"):
    rg.make_regions("random", 4, num_patches=3)
