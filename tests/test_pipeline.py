"""Grain input pipeline: determinism, exact continuation, host sharding, sampling geometry."""

import numpy as np
import pytest

from pathjax.bench.input import write_synthetic_records, write_synthetic_tokenizer
from pathjax.input import pipeline, records, sampling, schema

NUM_BAGS = 12
BATCH = 4  # the global batch (config.batch_size)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  rec = write_synthetic_records(str(root / "records"), num_bags=NUM_BAGS, patch_size=32,
                                num_levels=3, num_shards=3, distinct_images=16)
  tok = write_synthetic_tokenizer(str(root / "tok"), vocab_size=600)
  source, _ = records.open_records(rec)
  bags = [source.full_bag(i) for i in range(len(source))]
  return rec, tok, bags


def config(data, **kw):
  rec, tok, _ = data
  cfg = pipeline.default_input_config()
  cfg.records_dir = rec
  cfg.tokenizer = tok
  cfg.context_length = 16
  cfg.max_keywords = 6
  cfg.class_names = ("tumor", "stroma", "lymphocytes", "normal")
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout(data):
  b = next(pipeline.make_train_iterator(config(data), batch_size=BATCH, process_index=0, process_count=1))
  assert b["images"].shape == (4, 3, 32, 32, 3) and b["images"].dtype == np.uint8
  assert b["magnification"].dtype == np.float32 and b["magnification"].shape == (4, 3)
  np.testing.assert_array_equal(b["magnification"], np.tile([5.0, 10.0, 20.0], (4, 1)))
  assert b["caption_ids"].shape == (4, 3, 16) and b["caption_ids"].dtype == np.int32
  assert b["keyword_ids"].shape == (4, 6, 16) and b["keyword_mask"].shape == (4, 6)
  for key in ("caption_mask", "keyword_mask", "patch_mask"):
    assert b[key].dtype == bool
  assert b["labels"].dtype == np.int32 and b["labels"].min() >= -1 and b["labels"].max() < 4
  np.testing.assert_array_equal(b["level"], np.tile([0, 1, 2], (4, 1)))
  np.testing.assert_array_equal(b["parent"], np.tile([-1, 0, 1], (4, 1)))


def test_determinism(data):
  cfg = config(data)
  a = take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1, seed=3), 4)
  b = take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1, seed=3), 4)
  c = take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1, seed=4), 4)
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x["images"], y["images"]) for x, y in zip(a, c))
  assert any(not np.array_equal(x["record_index"], y["record_index"]) for x, y in zip(a, c))


@pytest.mark.parametrize("stop", [1, 2, 3, 5])
def test_exact_continuation_after_state_restore(data, stop):
  # 12 bags, batch 4: 3 batches per epoch, so stops 2 and 3 continue across an epoch boundary.
  cfg = config(data)
  reference = take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1), stop + 4)
  it = pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1)
  take(it, stop)
  state = it.get_state()
  restored = pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1)
  restored.set_state(state)
  assert_batches_equal(take(restored, 4), reference[stop:])


def test_orbax_round_trip_of_iterator_state(data, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  cfg = config(data)
  it = pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1)
  take(it, 2)
  expected = take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1), 5)[2:]
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(fresh, 3), expected)


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_host_shards_are_disjoint_and_complete(data, process_count, shuffle):
  cfg = config(data, shuffle=shuffle)
  steps_per_epoch = NUM_BAGS // BATCH
  epochs = {0: [], 1: []}
  for p in range(process_count):
    it = pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=p, process_count=process_count)
    batches = take(it, 2 * steps_per_epoch)
    assert batches[0]["images"].shape[0] == BATCH // process_count
    for e in (0, 1):
      seen = np.concatenate([b["record_index"] for b in
                             batches[e * steps_per_epoch:(e + 1) * steps_per_epoch]])
      epochs[e].append(seen)
  for e, per_host in epochs.items():
    everything = np.concatenate(per_host)
    assert sorted(everything.tolist()) == list(range(NUM_BAGS)), (e, per_host)
  if shuffle:
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_do_not_depend_on_process_count(data, process_count):
  """Host p reads the p-th block of each global batch: assembled, they equal one host's."""
  cfg = config(data)
  single = take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1), 5)
  hosts = [take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=p, process_count=process_count), 5)
           for p in range(process_count)]
  for step, expected in enumerate(single):
    assembled = {k: np.concatenate([h[step][k] for h in hosts]) for k in expected
                 if isinstance(expected[k], np.ndarray)}
    assert_batches_equal([assembled], [{k: expected[k] for k in assembled}])


def test_uneven_records_every_record_once_per_epoch():
  """Batches run across epoch boundaries; each epoch's records are all read exactly once."""
  n, procs, block = 10, 3, 2
  plans = [pipeline.ShardPlan(n, p, procs, seed=0, block=block) for p in range(procs)]
  stream = []
  for step in range(5):  # 5 global batches of 6 = 3 epochs of 10
    for pl in plans:
      stream += [pl.locate(step * block + o) for o in range(block)]
  for epoch in range(3):
    assert sorted(r for e, r, _ in stream if e == epoch) == list(range(n))


def test_chain_geometry(data):
  _, _, bags = data
  it = pipeline.make_train_iterator(config(data), batch_size=BATCH, process_index=0, process_count=1)
  for batch in take(it, 3):
    for r, idx, mags in zip(batch["record_index"], batch["patch_index"], batch["magnification"]):
      bag = bags[r]
      assert bag.patches[idx[0]].parent == -1
      for l in range(1, len(idx)):
        child, parent = bag.patches[idx[l]], bag.patches[idx[l - 1]]
        assert child.parent == idx[l - 1] and child.level == l
        assert parent.x <= child.x < parent.x + parent.extent
        assert mags[l] == child.magnification


def test_children_sampling_geometry(data):
  _, _, bags = data
  it = pipeline.make_train_iterator(config(data, sampling="children", children_per_level=2), batch_size=BATCH,
                                    process_index=0, process_count=1)
  batch = next(it)
  assert batch["images"].shape[1] == 1 + 2 + 4
  np.testing.assert_array_equal(batch["level"][0], [0, 1, 1, 2, 2, 2, 2])
  for r, idx, parent in zip(batch["record_index"], batch["patch_index"], batch["parent"]):
    for j in range(1, len(idx)):
      assert bags[r].patches[idx[j]].parent == idx[parent[j]]
    assert len(set(idx.tolist())) == len(idx)


def test_all_sampling_is_the_full_bag(data):
  _, _, bags = data
  batch = next(pipeline.make_train_iterator(config(data, sampling="all"), batch_size=BATCH, process_index=0,
                                            process_count=1))
  assert batch["images"].shape[1] == 21
  for r, idx in zip(batch["record_index"], batch["patch_index"]):
    assert sorted(idx.tolist()) == list(range(len(bags[r].patches)))


def test_levels_subset_points_parent_at_nearest_emitted_ancestor(data):
  _, _, bags = data
  batch = next(pipeline.make_train_iterator(config(data, levels=(0, 2)), batch_size=BATCH, process_index=0,
                                            process_count=1))
  np.testing.assert_array_equal(batch["magnification"][0], [5.0, 20.0])
  for r, idx in zip(batch["record_index"], batch["patch_index"]):
    grandparent = bags[r].patches[bags[r].patches[idx[1]].parent].parent
    assert grandparent == idx[0]


def test_min_tissue_prefers_and_masks(data):
  _, _, bags = data
  rng = np.random.default_rng(0)
  for bag in bags:
    for _ in range(5):
      sel = sampling.select_patches(bag, rng, children_per_level=1, min_tissue=0.5)
      for pos in range(1, len(sel.indices)):
        patch = bag.patches[sel.indices[pos]]
        assert sel.valid[pos] == (patch.tissue >= 0.5)
        if not sel.valid[pos]:  # chosen only when no sibling passes
          siblings = bag.children(patch.parent)
          assert all(bag.patches[s].tissue < 0.5 for s in siblings)


def test_missing_levels_are_padded_and_masked(data):
  _, _, bags = data
  bag = bags[0]
  shallow = schema.Bag(bag.slide_id, 0, bag.mpp, bag.patch_size, bag.magnifications,
                       [p for p in bag.patches if p.level < 2], bag.keywords)
  sel = sampling.select_patches(shallow, np.random.default_rng(0), children_per_level=1)
  assert list(sel.indices[:2] >= 0) == [True, True] and sel.indices[2] == -1
  assert list(sel.valid) == [True, True, False]


def test_keyword_masking(data):
  _, _, bags = data
  from pathjax.input.tokenize import TextTokenizer
  tok = TextTokenizer(data[1], 16)
  empty = tok("")
  for k in (2, 40):
    it = pipeline.make_train_iterator(config(data, max_keywords=k), batch_size=BATCH, process_index=0,
                                      process_count=1)
    batch = next(it)
    for r, mask, ids in zip(batch["record_index"], batch["keyword_mask"], batch["keyword_ids"]):
      n = len(set(bags[r].keywords))
      assert mask.sum() == min(k, n)
      assert mask[:mask.sum()].all()
      for row in ids[~mask]:
        np.testing.assert_array_equal(row, empty)
      decoded = {tok.decode(row).replace(" ", "") for row in ids[mask]}
      assert decoded <= {kw.replace(" ", "") for kw in bags[r].keywords}
  texts, mask = sampling.select_keywords(["a", "b", "a", ""], 4, None)
  assert texts == ["a", "b", "", ""] and mask.tolist() == [True, True, False, False]


def test_captions_and_labels_follow_patches(data):
  _, _, bags = data
  from pathjax.input.tokenize import TextTokenizer
  tok = TextTokenizer(data[1], 64)
  it = pipeline.make_train_iterator(config(data, context_length=64), batch_size=BATCH, tokenizer=tok,
                                    process_index=0, process_count=1)
  names = ("tumor", "stroma", "lymphocytes", "normal")
  batch = next(it)
  for b, r in enumerate(batch["record_index"]):
    for l, i in enumerate(batch["patch_index"][b]):
      patch = bags[r].patches[i]
      assert batch["caption_mask"][b, l] == patch.has_caption
      assert batch["labels"][b, l] == names.index(patch.label)
      if patch.has_caption:
        assert tok.decode(batch["caption_ids"][b, l]).replace(" ", "") == \
            patch.caption.lower().replace(" ", "")


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_iterator_covers_every_record_once(data, process_count):
  cfg = config(data)
  seen = []
  lengths = set()
  for p in range(process_count):
    batches = list(pipeline.make_eval_iterator(cfg, batch_size=5, process_index=p,
                                               process_count=process_count))
    lengths.add(len(batches))
    for b in batches:
      assert b["images"].shape[0] == 5
      seen += b["record_index"][b["valid"]].tolist()
  assert len(lengths) == 1
  assert sorted(seen) == list(range(NUM_BAGS))


def test_eval_iterator_has_no_augmentation(data):
  _, _, bags = data
  from pathjax.input import transforms
  batch = next(pipeline.make_eval_iterator(config(data), batch_size=2, process_index=0,
                                           process_count=1))
  r, i = batch["record_index"][0], batch["patch_index"][0, 1]
  np.testing.assert_array_equal(batch["images"][0, 1],
                                transforms.decode_to_array(bags[r].patches[i].jpeg))
  again = next(pipeline.make_eval_iterator(config(data), batch_size=2, process_index=0,
                                           process_count=1))
  np.testing.assert_array_equal(batch["images"], again["images"])


def test_augmentation_config_switches(data):
  cfg = config(data)
  cfg.augment.enabled = False
  plain = next(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1))
  cfg.augment.enabled = True
  cfg.augment.hed_sigma = 0.05
  cfg.augment.crop_scale = (0.5, 1.0)
  aug = next(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1))
  np.testing.assert_array_equal(plain["record_index"], aug["record_index"])
  assert aug["images"].shape == plain["images"].shape and aug["images"].dtype == np.uint8
  assert not np.array_equal(plain["images"], aug["images"])


@pytest.mark.slow
def test_workers_match_in_process(data):
  cfg = config(data)
  ref = take(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1), 5)
  it = pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1, worker_count=2)
  got = take(it, 3)
  state = it.get_state()
  assert_batches_equal(got, ref[:3])
  restored = pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1, worker_count=2)
  restored.set_state(state)
  assert_batches_equal(take(restored, 2), ref[3:])


def test_device_augmentation_batch_matches_host_batch(data):
  import jax.numpy as jnp

  from pathjax.input import transforms
  cfg = config(data)
  assert cfg.augment.on_device  # the default
  dev = next(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1))
  cfg.augment.on_device = False
  host = next(pipeline.make_train_iterator(cfg, batch_size=BATCH, process_index=0, process_count=1))
  assert "color_transform" not in host and "dihedral" not in host
  assert dev["color_transform"].shape == (4, 3, 3, 4) and dev["dihedral"].shape == (4, 3)
  assert len(np.unique(dev["dihedral"])) > 1
  applied = np.asarray(transforms.augment_on_device(
      jnp.asarray(dev["images"]), jnp.asarray(dev["color_transform"]), jnp.asarray(dev["dihedral"])))
  mask = dev["patch_mask"]
  np.testing.assert_allclose(applied[mask], host["images"][mask], atol=0.5 + 1e-4)
  np.testing.assert_array_equal(dev["caption_ids"], host["caption_ids"])
  shapes = pipeline.batch_shapes(config(data, image_size=32, levels=(0, 1, 2)), 4)
  assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == \
      {k: (v.shape, v.dtype) for k, v in dev.items()}
