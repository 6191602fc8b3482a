"""Records directories: pairs of ArrayRecord shards (bags, pixels) plus a manifest written last.

Layout: `DIR/bags-<name>.array_record` holds bag records (schema.encode_bag: coordinates,
captions, tree; no pixels) and `DIR/pixels-<name>.array_record` beside it holds one encoded
JPEG per record, which `Patch.pixel` points into. Both are written with group_size:1, so a
reader fetches exactly the records it asks for: a training example reads its bag and the
few JPEGs it samples. A pair is written under temporary names and renamed pixels first,
bags last (the bag shard marks the pair complete), and the manifest is written
(atomically) only when every pair is complete, so a directory without a manifest is never
mistaken for a finished dataset.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import threading
from typing import Any, Iterable, Sequence

from array_record.python import array_record_module

from pathjax.input import schema, storage

MANIFEST = "manifest.json"
SHARD_PATTERN = "bags-{index:05d}-of-{count:05d}.array_record"
BAG_PREFIX, PIXEL_PREFIX = "bags-", "pixels-"
# One record per chunk, so a random read fetches only that record. JPEGs do not compress:
# pixel records are stored as they are; bag records (text) keep the default compression.
BAG_WRITER_OPTIONS = "group_size:1"
PIXEL_WRITER_OPTIONS = "group_size:1,uncompressed"


class IncompleteRecordsError(FileNotFoundError):
  """A records directory without a manifest: a `tile` run that did not finish."""


class RecordsDirNotFoundError(IncompleteRecordsError):
  """No records directory at all (a wrong path, not an interrupted `tile`); a subclass so
  every caller that reports unusable records reports this too, with its own message."""


def atomic_write_text(path: str, text: str) -> None:
  """Whole file or nothing, under a temporary name unique across hosts (removed on failure)."""
  storage.write_text_atomic(path, text)


def pixels_path(bag_shard: str) -> str:
  """The pixel shard that goes with a bag shard (same directory, `pixels-` for `bags-`)."""
  head, name = os.path.split(bag_shard)
  if not name.startswith(BAG_PREFIX):
    raise ValueError(f"{bag_shard}: a bag shard's name starts with {BAG_PREFIX!r}")
  return os.path.join(head, PIXEL_PREFIX + name[len(BAG_PREFIX):])


def write_slide_shards(bag_shard: str, bags: Iterable[schema.Bag]) -> dict[str, int]:
  """Writes bags (patches with their JPEG bytes) as a bag shard + pixel shard, atomically.

  Sets each `Patch.pixel`. Returns {"bags", "patches", "bag_bytes", "pixel_bytes"}. An
  exception from `bags` leaves nothing behind but temporary files (removed here).
  """
  pix = pixels_path(bag_shard)
  # Unique per attempt: two attempts of one slide (two hosts, the same pid) never share a file.
  tmp_bags, tmp_pix = storage.unique_tmp(bag_shard), storage.unique_tmp(pix)
  bag_writer = array_record_module.ArrayRecordWriter(tmp_bags, BAG_WRITER_OPTIONS)
  pix_writer = array_record_module.ArrayRecordWriter(tmp_pix, PIXEL_WRITER_OPTIONS)
  n_bags = n_patches = 0
  complete = False
  try:
    for bag in bags:
      for p in bag.patches:
        if not p.jpeg:
          raise ValueError(f"{bag.slide_id} bag {bag.bag_index}: a patch has no JPEG bytes")
        pix_writer.write(p.jpeg)
        p.pixel = n_patches
        n_patches += 1
      bag_writer.write(schema.encode_bag(bag))
      n_bags += 1
    complete = True
  finally:
    bag_writer.close()
    pix_writer.close()
    if not complete:
      for t in (tmp_bags, tmp_pix):
        if os.path.exists(t):
          os.remove(t)
  os.replace(tmp_pix, pix)
  os.replace(tmp_bags, bag_shard)
  return {"bags": n_bags, "patches": n_patches, "bag_bytes": os.path.getsize(bag_shard),
          "pixel_bytes": os.path.getsize(pix)}


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  atomic_write_text(storage.join(directory, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise RecordsDirNotFoundError(
        f"records directory {directory} does not exist (or is not a directory); check the path, "
        "or make it with `pathjax tile --out DIR`")
  if not os.path.exists(path):
    raise IncompleteRecordsError(
        f"{directory} has no {MANIFEST}: it is not a finished records directory (a `pathjax tile` "
        "run was interrupted or is still running); re-run `pathjax tile` with the same --out to "
        "complete it")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def shard_paths(directory: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, f"{BAG_PREFIX}*.array_record")))


def _num_records(path: str) -> int:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


class BagRecords:
  """Random access to the bags of a records directory and to their patches' JPEGs.

  `bag(i)` decodes bag i without pixels, `jpegs(bag, patch_indices)` reads just those
  patches' JPEGs (one batched read), `full_bag(i)` both. Picklable (readers reopen lazily
  in each Grain worker), so it can sit inside a MapDataset transform.
  """

  def __init__(self, bag_shards: Sequence[str]):
    self.bag_shards = list(bag_shards)
    self.pixel_shards = [pixels_path(p) for p in self.bag_shards]
    counts = [_num_records(p) for p in self.bag_shards]
    self._starts = [0]
    for c in counts:
      self._starts.append(self._starts[-1] + c)
    self._readers: dict[str, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _readers={}, _lock=threading.Lock())

  def _reader(self, path: str):
    reader = self._readers.get(path)
    if reader is None:
      with self._lock:  # Grain's read threads may ask for the same file at once
        reader = self._readers.get(path)
        if reader is None:
          reader = array_record_module.ArrayRecordReader(
              path, "readahead_buffer_size:0", file_reader_buffer_size=32768)
          self._readers[path] = reader
    return reader

  def _locate(self, index: int) -> tuple[int, int]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"bag {index} out of range [0, {len(self)})")
    shard = bisect.bisect_right(self._starts, index) - 1
    return shard, index - self._starts[shard]

  def bag(self, index: int) -> schema.Bag:
    shard, position = self._locate(index)
    return schema.decode_bag(self._reader(self.bag_shards[shard]).read([position])[0])

  def jpegs(self, index: int, bag: schema.Bag, patch_indices: Sequence[int]) -> list[bytes]:
    """The JPEG bytes of `bag.patches[i]` for i in patch_indices (bag = self.bag(index))."""
    if not len(patch_indices):
      return []
    shard, _ = self._locate(index)
    positions = [bag.patches[int(i)].pixel for i in patch_indices]
    return list(self._reader(self.pixel_shards[shard]).read(positions))

  def full_bag(self, index: int) -> schema.Bag:
    """Bag `index` with every patch's JPEG loaded."""
    bag = self.bag(index)
    for p, data in zip(bag.patches, self.jpegs(index, bag, range(len(bag.patches)))):
      p.jpeg = data
    return bag

  def close(self) -> None:
    for reader in self._readers.values():
      reader.close()
    self._readers = {}


def open_records(directory: str) -> tuple[BagRecords, dict[str, Any]]:
  """Random access to the bags of a finished records directory, and its manifest."""
  manifest = read_manifest(directory)
  if manifest.get("schema_version", schema.SCHEMA_VERSION) != schema.SCHEMA_VERSION:
    raise IncompleteRecordsError(
        f"{directory} holds record schema version {manifest.get('schema_version')}, this pathjax "
        f"reads {schema.SCHEMA_VERSION}; re-run `pathjax tile` into a new --out")
  paths = shard_paths(directory)
  expected = manifest.get("shards")
  if expected is not None and sorted(os.path.basename(p) for p in paths) != sorted(expected):
    raise IncompleteRecordsError(
        f"{directory}: shards on disk {[os.path.basename(p) for p in paths]} differ from the "
        f"manifest's {expected}; re-run `pathjax tile` with the same --out")
  if not paths:
    raise IncompleteRecordsError(f"{directory}: the manifest lists no shards (no bags were written)")
  missing = [os.path.basename(pixels_path(p)) for p in paths if not os.path.isfile(pixels_path(p))]
  if missing:
    raise IncompleteRecordsError(
        f"{directory}: pixel shards {missing} are missing; re-run `pathjax tile` with the same --out")
  return BagRecords(paths), manifest
