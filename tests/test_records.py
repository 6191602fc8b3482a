"""Records directories: bag + pixel shard pairs, atomic writes, refusal of incomplete ones."""

import os
import pickle

import pytest

from pathjax.bench.input import textured_jpegs, write_synthetic_records
from pathjax.input import records, schema

import numpy as np


def _bag(slide, index, jpegs):
  patches = [schema.Patch(level=int(i > 0), magnification=5.0 if i == 0 else 10.0, x=i, y=0,
                          extent=64, tissue=0.9, jpeg=j, parent=-1 if i == 0 else 0,
                          caption=f"patch {i}", has_caption=True) for i, j in enumerate(jpegs)]
  return schema.Bag(slide_id=slide, bag_index=index, mpp=0.5, patch_size=16,
                    magnifications=[5.0, 10.0], patches=patches)


@pytest.fixture(scope="module")
def pool():
  return textured_jpegs(10, 16, np.random.default_rng(0))


def test_shard_pair_roundtrip(tmp_path, pool):
  bags = [_bag("s", 0, pool[:5]), _bag("s", 1, pool[5:10])]
  shard = str(tmp_path / "bags-s.array_record")
  out = records.write_slide_shards(shard, bags)
  assert out["bags"] == 2 and out["patches"] == 10
  assert os.path.isfile(records.pixels_path(shard))
  records.write_manifest(str(tmp_path), {"shards": ["bags-s.array_record"],
                                         "schema_version": schema.SCHEMA_VERSION})
  source, _ = records.open_records(str(tmp_path))
  assert len(source) == 2
  meta = source.bag(1)
  assert [p.jpeg for p in meta.patches] == [b""] * 5 and [p.pixel for p in meta.patches] == list(range(5, 10))
  assert source.jpegs(1, meta, [3, 0]) == [pool[8], pool[5]]
  full = pickle.loads(pickle.dumps(source)).full_bag(0)  # readers reopen after pickling
  assert [p.jpeg for p in full.patches] == pool[:5] and full.patches[2].caption == "patch 2"
  with pytest.raises(IndexError):
    source.bag(2)


def test_failed_write_leaves_nothing(tmp_path, pool):
  def bags():
    yield _bag("s", 0, pool[:3])
    raise RuntimeError("slide went away")
  shard = str(tmp_path / "bags-s.array_record")
  with pytest.raises(RuntimeError):
    records.write_slide_shards(shard, bags())
  assert os.listdir(tmp_path) == []


def test_missing_pixel_shard_and_old_schema_are_refused(tmp_path):
  rec = write_synthetic_records(str(tmp_path / "r"), num_bags=4, patch_size=16, num_levels=2,
                                num_shards=2, distinct_images=4)
  records.open_records(rec)
  os.remove(os.path.join(rec, "pixels-00001-of-00002.array_record"))
  with pytest.raises(records.IncompleteRecordsError, match="pixels-00001-of-00002"):
    records.open_records(rec)
  old = write_synthetic_records(str(tmp_path / "old"), num_bags=2, patch_size=16, num_levels=2,
                                num_shards=1, distinct_images=2)
  manifest = records.read_manifest(old)
  records.write_manifest(old, {**manifest, "schema_version": 1})
  with pytest.raises(records.IncompleteRecordsError, match="re-run `pathjax tile`"):
    records.open_records(old)
