"""The record schema shared by the tiler (writer) and the input pipeline (reader).

A bag record is one MR-PLIP *bag*: a root patch at the lowest magnification and its
quad-tree descendants at each finer magnification. Its pixels are not inside it: each
patch's encoded JPEG is its own record in the slide's pixel shard, and `Patch.pixel` is
its position there (records.py). So a training example that uses a root-to-leaf chain of
4 patches reads a ~15 KB bag record and 4 JPEGs (~100 KB), not the ~2 MB of all 85
patches (schema version 1 stored them inline; that read cost half the input pipeline's CPU).
Records are msgpack maps (no pickle), so any language can read them.

Patch order inside a bag is breadth-first and row-major within a level: index 0 is the
root, then the 4 patches of level 1, the 16 of level 2, ... `parent` holds the index of a
patch's parent (-1 for the root), so samplers never recompute the tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

SCHEMA_VERSION = 2


@dataclasses.dataclass
class Patch:
  level: int            # 0 = root (lowest magnification), 1, 2, ...
  magnification: float  # objective power of this patch, e.g. 5.0, 10.0, 20.0, 40.0
  x: int                # level-0 pixel coordinates of the top-left corner
  y: int
  extent: int           # side of the patch in level-0 pixels
  tissue: float         # tissue fraction in [0, 1] from the thumbnail mask
  jpeg: bytes           # encoded JPEG, patch_size x patch_size x 3; b"" until loaded
  parent: int           # index of the parent patch in the bag, -1 for the root
  caption: str = ""     # empty when missing (see has_caption)
  has_caption: bool = False
  keywords: list[str] = dataclasses.field(default_factory=list)
  label: str = ""       # ground-truth class where known (synthetic slides), else ""
  pixel: int = -1       # position of the JPEG in the slide's pixel shard (set by the writer)


@dataclasses.dataclass
class Bag:
  slide_id: str
  bag_index: int               # index of the bag within its slide
  mpp: float                   # level-0 microns per pixel of the slide
  patch_size: int              # pixels per side of every patch after resizing
  magnifications: list[float]  # one per level, lowest first
  patches: list[Patch]
  keywords: list[str] = dataclasses.field(default_factory=list)  # the bag's text bag

  def level_indices(self, level: int) -> list[int]:
    return [i for i, p in enumerate(self.patches) if p.level == level]

  def children(self, index: int) -> list[int]:
    return [i for i, p in enumerate(self.patches) if p.parent == index]


def encode_bag(bag: Bag) -> bytes:
  """The bag record: everything but the JPEG bytes (each patch must have its `pixel`)."""
  data = dataclasses.asdict(bag)
  for p in data["patches"]:
    if p["pixel"] < 0:
      raise ValueError(f"{bag.slide_id} bag {bag.bag_index}: a patch has no pixel record; "
                       "write bags with records.write_slide_shards")
    del p["jpeg"]
  data["schema_version"] = SCHEMA_VERSION
  return msgpack.packb(data, use_bin_type=True)


def decode_bag(record: bytes) -> Bag:
  """A bag from its record, JPEGs not loaded (`Patch.jpeg == b""`)."""
  data: dict[str, Any] = msgpack.unpackb(record, raw=False)
  version = data.pop("schema_version", None)
  if version != SCHEMA_VERSION:
    raise ValueError(f"record schema version {version}, this pathjax reads {SCHEMA_VERSION}; "
                     "re-run `pathjax tile` with this version")
  data["patches"] = [Patch(jpeg=b"", **p) for p in data["patches"]]
  return Bag(**data)
