"""Which patches (and keywords) of a bag make one training example.

A bag is a quad-tree: the root at the lowest magnification (level 0) and 4 children per
patch at each finer level (schema.py). Per example the sampler walks the tree from the root:

* `children_per_level=1` (default): one random root-to-leaf chain, one patch per level.
* `children_per_level=k`: k random children of every chosen patch at each level, so level l
  holds k**l patches (MR-PLIP's bag subsampling).
* `children_per_level='all'`: the full bag (4**l patches at level l; 85 for 4 levels).

The output has a static shape for a given (number of levels, k), whatever the bag holds:
patches a bag lacks (a slide without the finest magnification) are padded and marked
invalid. Patches are ordered level by level; `parent` is the index of a patch's parent in
the *selection* (-1 for the root), so a model never needs the bag's tree.

`levels` picks which tree levels are emitted (default all). The walk still passes through
the levels that are not emitted, and `parent` then points to the nearest emitted ancestor.

With `min_tissue > 0`, children whose tissue fraction is below it are chosen only when no
better child is left, and are marked invalid (`valid=False`) so losses can skip them. The
root is always valid (the tiler keeps only bags whose root passes its threshold).

Everything is a function of the bag and a numpy Generator, so an example is deterministic
given its seed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pathjax.input.schema import Bag

BRANCHING = 4


@dataclasses.dataclass
class Selection:
  indices: np.ndarray  # int32 [P]: index into bag.patches, -1 for padding
  level: np.ndarray    # int32 [P]: position of the patch's level in `levels`
  parent: np.ndarray   # int32 [P]: index of the parent within the selection, -1 for roots/padding
  valid: np.ndarray    # bool [P]: present and passing the tissue threshold


def per_level_counts(num_levels: int, children_per_level: int | str) -> list[int]:
  """Patches selected at each tree level (0 .. num_levels-1)."""
  if children_per_level == "all":
    k = BRANCHING
  else:
    k = int(children_per_level)
    if not 1 <= k <= BRANCHING:
      raise ValueError(f"children_per_level must be 1..{BRANCHING} or 'all', got {children_per_level!r}")
  return [k ** l for l in range(num_levels)]


def num_selected(levels: Sequence[int], children_per_level: int | str) -> int:
  counts = per_level_counts(max(levels) + 1, children_per_level)
  return sum(counts[l] for l in levels)


def children_lists(bag: Bag) -> list[list[int]]:
  children: list[list[int]] = [[] for _ in bag.patches]
  for i, patch in enumerate(bag.patches):
    if patch.parent >= 0:
      children[patch.parent].append(i)
  return children


def select_patches(bag: Bag, rng: np.random.Generator | None, *,
                   children_per_level: int | str = 1,
                   levels: Sequence[int] | None = None,
                   min_tissue: float = 0.0) -> Selection:
  """Chooses the patches of one example. `rng=None` takes the first children (eval)."""
  num_tree_levels = len(bag.magnifications)
  levels = list(range(num_tree_levels)) if levels is None else [int(l) for l in levels]
  if sorted(set(levels)) != levels or levels[0] < 0:
    raise ValueError(f"levels must be increasing and non-negative, got {levels}")
  depth = levels[-1] + 1
  k = BRANCHING if children_per_level == "all" else int(children_per_level)
  per_level_counts(depth, children_per_level)  # validates k
  children = children_lists(bag)
  roots = [i for i, p in enumerate(bag.patches) if p.parent < 0]
  # Each tree level: a list of (bag index or -1, emitted ancestor position or -1).
  out_idx: list[int] = []
  out_level: list[int] = []
  out_parent: list[int] = []
  out_valid: list[bool] = []
  current = [(roots[0] if roots else -1, -1)]
  for tree_level in range(depth):
    emitted = tree_level in levels
    next_level = []
    for bag_index, ancestor in current:
      pos = ancestor
      if emitted:
        pos = len(out_idx)
        out_idx.append(bag_index)
        out_level.append(levels.index(tree_level))
        out_parent.append(ancestor)
        present = bag_index >= 0
        passes = tree_level == 0 or (present and bag.patches[bag_index].tissue >= min_tissue)
        out_valid.append(bool(present and passes))
      if tree_level + 1 < depth:
        kids = children[bag_index] if bag_index >= 0 else []
        if rng is not None and len(kids) > 1:
          kids = [kids[j] for j in rng.permutation(len(kids))]
        if min_tissue > 0:
          kids = sorted(kids, key=lambda j: bag.patches[j].tissue < min_tissue)  # stable
        chosen = kids[:k] + [-1] * max(0, k - len(kids))
        next_level.extend((c, pos) for c in chosen)
    current = next_level
  return Selection(np.asarray(out_idx, np.int32), np.asarray(out_level, np.int32),
                   np.asarray(out_parent, np.int32), np.asarray(out_valid, bool))


def select_keywords(keywords: Sequence[str], max_keywords: int,
                    rng: np.random.Generator | None) -> tuple[list[str], np.ndarray]:
  """Up to `max_keywords` distinct keywords (random without replacement, or the first ones
  when `rng` is None), padded with "" to exactly `max_keywords`; returns (texts, mask)."""
  unique = list(dict.fromkeys(k for k in keywords if k))
  if rng is not None and len(unique) > max_keywords:
    unique = [unique[j] for j in sorted(rng.choice(len(unique), max_keywords, replace=False))]
  chosen = unique[:max_keywords]
  mask = np.zeros((max_keywords,), bool)
  mask[:len(chosen)] = True
  return chosen + [""] * (max_keywords - len(chosen)), mask
