"""PathFLIP regions: groups of a slide's patches, as index and mask arrays for a gather.

A slide's patch features [N, D] (stored order, `pathjax.embed_slides`) become L regions of
S patches each: `index` [L, S] int32 into the patch list and `mask` [L, S] bool (True = a
real patch). Padding slots hold index 0 and mask False, so `features[index]` is always a
valid gather (jittable on device) and the mask goes to the Q-Former's cross-attention.

Two ways to form regions:
- `window_regions`: windows of S consecutive patches in stored order (the paper). The last
  partial window is kept and masked (the public code drops it), and a slide with fewer
  than S patches is one partial window (the public code crashes).
- `grid_regions`: square blocks of side b of the patch grid (S = b * b), from the integer
  grid coordinates [N, 2]; a patch at grid (x, y) sits in block (x // b, y // b) at slot
  (y % b) * b + (x % b), so a region is a real 2D neighbourhood wherever stored order
  wraps around rows. Blocks without tissue do not exist.

Both sample L regions per slide (`num_regions`): L distinct regions drawn at random (kept
in slide order) when the slide has at least L, else all of them followed by L - W random
duplicates (the paper's duplication); `num_regions=None` returns every region once
(evaluation, localization). Sampling takes a numpy Generator, so callers make it
deterministic per (seed, slide, epoch): `pathjax.input.subcaptions.slide_rng(seed, slide,
epoch, stream=1)`. `make_regions` picks the method by name (a config value).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

METHODS = ("window", "grid")


@dataclasses.dataclass(frozen=True)
class Regions:
  index: np.ndarray   # [L, S] int32 patch indices (0 in padding slots)
  mask: np.ndarray    # [L, S] bool, True = a real patch
  region: np.ndarray  # [L] int32: which of the slide's W regions each row is (duplicates repeat)

  @property
  def num_regions(self) -> int:
    return self.index.shape[0]


def _sample(index: np.ndarray, mask: np.ndarray, num_regions: int | None,
            rng: np.random.Generator | None) -> Regions:
  w = index.shape[0]
  if num_regions is None:
    rows = np.arange(w)
  else:
    if num_regions < 1:
      raise ValueError(f"num_regions must be >= 1 (or None for all), got {num_regions}")
    if rng is None:
      raise ValueError("sampling num_regions regions needs an rng (numpy Generator)")
    if w >= num_regions:
      rows = np.sort(rng.choice(w, size=num_regions, replace=False))
    else:
      rows = np.concatenate([np.arange(w), rng.integers(w, size=num_regions - w)])
  rows = rows.astype(np.int32)
  return Regions(index[rows], mask[rows], rows)


def window_regions(num_patches: int, size: int, num_regions: int | None = None,
                   rng: np.random.Generator | None = None) -> Regions:
  """Windows of `size` consecutive patches of a slide with `num_patches` patches."""
  if size < 1:
    raise ValueError(f"region size must be >= 1, got {size}")
  if num_patches < 1:
    raise ValueError("a slide without patches has no regions (embed-slides skips such slides)")
  w = -(-num_patches // size)
  flat = np.arange(w * size, dtype=np.int64)
  mask = (flat < num_patches).reshape(w, size)
  index = np.where(mask, flat.reshape(w, size), 0).astype(np.int32)
  return _sample(index, mask, num_regions, rng)


def grid_regions(grid: np.ndarray, side: int, num_regions: int | None = None,
                 rng: np.random.Generator | None = None) -> Regions:
  """Square blocks of `side` x `side` grid cells; grid [N, 2] integer (x, y) = (col, row)."""
  grid = np.asarray(grid)
  if side < 1:
    raise ValueError(f"block side must be >= 1, got {side}")
  if grid.ndim != 2 or grid.shape[1] != 2 or grid.shape[0] < 1:
    raise ValueError(f"grid must be [N >= 1, 2] (col, row), got shape {grid.shape}")
  if not np.issubdtype(grid.dtype, np.integer):
    raise ValueError(f"grid coordinates must be integers, got {grid.dtype}")
  if len(np.unique(grid, axis=0)) != len(grid):
    raise ValueError("grid has duplicate coordinates; each patch needs its own grid cell")
  block = grid // side
  slot = (grid[:, 1] % side) * side + grid[:, 0] % side
  keys, region_of = np.unique(block[:, ::-1], axis=0, return_inverse=True)  # raster order (row, col)
  region_of = region_of.reshape(-1)
  index = np.zeros((len(keys), side * side), np.int32)
  mask = np.zeros((len(keys), side * side), bool)
  index[region_of, slot] = np.arange(len(grid), dtype=np.int32)
  mask[region_of, slot] = True
  return _sample(index, mask, num_regions, rng)


def make_regions(method: str, size: int, *, num_patches: int | None = None,
                 grid: np.ndarray | None = None, num_regions: int | None = None,
                 rng: np.random.Generator | None = None) -> Regions:
  """Regions of `size` patches by `method`: "window" (needs num_patches) or "grid" (needs
  grid [N, 2]; size must be a square, the block side is its root), so both give [L, size]."""
  if method == "window":
    if num_patches is None:
      num_patches = None if grid is None else len(grid)
    if num_patches is None:
      raise ValueError("window regions need num_patches (or the grid, for its length)")
    return window_regions(num_patches, size, num_regions, rng)
  if method == "grid":
    side = math.isqrt(size) if size > 0 else 0
    if side * side != size or side < 1:
      raise ValueError(f"grid regions need a square region size (side * side), got {size}; "
                       f"e.g. 256 = 16 x 16")
    if grid is None:
      raise ValueError("grid regions need the patches' grid coordinates [N, 2]")
    if num_patches is not None and num_patches != len(grid):
      raise ValueError(f"num_patches {num_patches} != {len(grid)} grid rows")
    return grid_regions(grid, side, num_regions, rng)
  raise ValueError(f"unknown region method {method!r}; valid: {', '.join(METHODS)}")
