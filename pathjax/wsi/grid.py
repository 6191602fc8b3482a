"""The multi-resolution quad-tree grid: bags of a root patch and its descendants.

Magnifications are given lowest first (5, 10, 20, 40). Each finer magnification must be an
integer multiple k of the previous one (2 for a quad-tree), so every patch has k*k children
that tile it exactly. The root extent (level-0 pixels of a root patch) is rounded to a
multiple of the product of these factors, so every descendant has exact integer level-0
coordinates and extent; patches are resized to `patch_size` when read, and the rounding
changes the scale by less than half a pixel per leaf patch.

Roots lie on a regular grid from the slide's top-left corner and lie wholly inside the
slide; a root becomes a bag when its tissue fraction (thumbnail mask) reaches the threshold.

Order within a bag (the record schema's): root first, then breadth-first, row-major within
a level; `parent` is the index of a patch's parent.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


class GridError(ValueError):
  """Magnifications or sizes that cannot form a multi-resolution grid."""


@dataclasses.dataclass(frozen=True)
class GridPatch:
  level: int
  magnification: float
  x: int
  y: int
  extent: int
  parent: int


def parse_magnifications(value: str | Sequence[float]) -> tuple[float, ...]:
  if isinstance(value, str):
    try:
      mags = tuple(float(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError as e:
      raise GridError(f"magnifications must be numbers separated by commas, got {value!r}") from e
  else:
    mags = tuple(float(v) for v in value)
  return validate_magnifications(mags)


def validate_magnifications(mags: Sequence[float]) -> tuple[float, ...]:
  mags = tuple(float(m) for m in mags)
  if not mags:
    raise GridError("at least one magnification is needed")
  if any(m <= 0 for m in mags):
    raise GridError(f"magnifications must be positive, got {mags}")
  for a, b in zip(mags, mags[1:]):
    k = b / a
    if k < 1.5 or abs(k - round(k)) > 1e-6:
      raise GridError(
          f"magnifications must increase by integer factors (5,10,20,40 is a quad-tree); "
          f"{b:g}/{a:g} = {k:g}")
  return mags


def split_factors(mags: Sequence[float]) -> tuple[int, ...]:
  """Children per side between consecutive magnifications (2 for a quad-tree)."""
  return tuple(int(round(b / a)) for a, b in zip(mags, mags[1:]))


def root_extent(base_magnification: float, mags: Sequence[float], patch_size: int) -> int:
  """Level-0 pixels per side of a root patch: patch_size at mags[0], made exactly divisible."""
  unit = int(np.prod(split_factors(mags))) if len(mags) > 1 else 1
  raw = patch_size * base_magnification / mags[0]
  extent = max(1, int(round(raw / unit))) * unit
  return extent


def bag_layout(x: int, y: int, extent: int, mags: Sequence[float]) -> list[GridPatch]:
  """The patches of the bag rooted at level-0 (x, y) with root side `extent`."""
  factors = split_factors(mags)
  patches = [GridPatch(0, float(mags[0]), int(x), int(y), int(extent), -1)]
  level_start, level_count, side = 0, 1, int(extent)
  for level, k in enumerate(factors, start=1):
    child_side = side // k
    new_start = len(patches)
    parents = range(level_start, level_start + level_count)
    # Row-major over the whole level: the level is a (n*k) x (n*k) grid of children.
    n = int(round(np.sqrt(level_count)))
    for row in range(n * k):
      for col in range(n * k):
        parent = level_start + (row // k) * n + (col // k)
        assert parent in parents
        patches.append(GridPatch(level, float(mags[level]), int(x + col * child_side),
                                 int(y + row * child_side), child_side, parent))
    level_start, level_count, side = new_start, len(patches) - new_start, child_side
  return patches


def root_positions(width: int, height: int, extent: int) -> list[tuple[int, int]]:
  """Top-left corners of every whole root patch inside a width x height slide, row-major."""
  return [(x, y) for y in range(0, height - extent + 1, extent)
          for x in range(0, width - extent + 1, extent)]


def bags_per_level(mags: Sequence[float]) -> list[int]:
  counts = [1]
  for k in split_factors(mags):
    counts.append(counts[-1] * k * k)
  return counts
