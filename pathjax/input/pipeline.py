"""Grain input pipelines over bag records: training, evaluation and a flat patch view.

Training (`make_train_iterator`)
--------------------------------
A Grain `MapDataset` over a virtual index stream, so every example is a pure function of
(seed, epoch, position) and the iterator state is one integer:

    host-local index i -> step s, offset o = divmod(i, b)        (b = B / P, the host batch)
                       -> global stream position g = s * B + p * b + o
                       -> epoch, j = divmod(g, N)
                       -> record = permutation_epoch[j]   (numpy, cached per epoch)
                       -> read, decode JPEG, sample patches and keywords, augment (rng seeded
                          by (seed, epoch, record)), batch, tokenize

* One global stream: the epochs' permutations, concatenated. Global batch s is positions
  [s * B, (s + 1) * B) of it, and host p of P reads the p-th contiguous block of b. So the
  assembled global batch is the same, row for row, for any number of processes (a run on 2
  hosts sees exactly the batches of a run on 1), hosts read disjoint examples, all step in
  lock-step, and every record appears once per epoch. Batches run across epoch boundaries.
* Shuffling: a fresh permutation of all N records per epoch, global across hosts (the
  shuffle happens before the split), seeded by (seed, epoch).
* Epochs: `num_epochs=None` repeats forever; batches run across epoch boundaries.
* Per-host batch = batch_size / process_count, drop_remainder (`batch_size` is the global
  batch, the config's top-level `batch_size`).
* Workers: `worker_count > 0` runs the pipeline in Grain worker processes (`mp_prefetch`);
  the batches are identical to `worker_count = 0`.
* State: the returned object is Grain's `DatasetIterator`: `it.get_state()` (a small JSON-able
  dict) and `it.set_state(state)` continue with exactly the next batch, across epoch
  boundaries too. Restore into an iterator built with the same config, seed, process
  count and worker_count. With orbax, save it inside a Composite:
      ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))
      ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it))
  (one `process_<i>-of-<n>.json` per host).

Batch (numpy, per host; P patches per example: P = L levels for chain sampling)
    images        uint8   [B, P, H, W, 3]  (normalise on device: transforms.normalize_on_device)
    magnification float32 [B, P]
    level         int32   [B, P]   index into the emitted levels
    parent        int32   [B, P]   index of the parent within the example, -1 for the root
    patch_index   int32   [B, P]   index of the patch in its bag (schema order), -1 for padding
    patch_mask    bool    [B, P]   present and passing the tissue threshold
    labels        int32   [B, P]   index of Patch.label in config.class_names, -1 if unknown
    color_transform float32 [B, P, 3, 4]  (training, augment.on_device: colour jitter to
    dihedral      int32   [B, P]          apply on device; transforms.normalize_on_device)
    caption_ids   int32   [B, P, ctx]   (when a tokenizer is given)
    caption_mask  bool    [B, P]   the patch has a caption
    keyword_ids   int32   [B, K, ctx]   (when a tokenizer is given)
    keyword_mask  bool    [B, K]
    record_index  int32   [B]      which record (bag) the example came from
    (eval only) valid bool [B]     False for padding in the final batch

Text ids follow pathjax.input.tokenize (bos ... eos pad, pad != eos; pool at
argmax(ids == eos_id)).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from pathjax.input import records as records_lib
from pathjax.input import sampling
from pathjax.input import transforms
from pathjax.input.input_config import SAMPLING_MODES, default_input_config  # noqa: F401  (re-exported)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def children_per_level(config) -> int | str:
  mode = config.get("sampling", "chain")
  if mode == "chain":
    return 1
  if mode == "all":
    return "all"
  if mode == "children":
    return int(config.children_per_level)
  raise ValueError(f"config.input.sampling must be one of {SAMPLING_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------
# Index plan: host-local position -> (epoch, record, valid)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  num_records: int
  process_index: int = 0
  process_count: int = 1
  shuffle: bool = True
  seed: int = 0
  pad: bool = False  # eval: ceil(N / P) per host, positions past N are padding (invalid)
  block: int = 1     # training: the host batch b (global batch = process_count * block)

  def __post_init__(self):
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
    if self.per_epoch == 0:
      raise ValueError(f"{self.num_records} records cannot feed {self.process_count} processes")

  @property
  def per_epoch(self) -> int:
    if self.pad:
      return -(-self.num_records // self.process_count)
    return self.num_records // self.process_count

  def epoch_seed(self, epoch: int) -> int:
    return int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])

  def permutation(self, epoch: int) -> np.ndarray:
    """The epoch's global order of records (cached; 4 or 8 bytes per record)."""
    cache = self.__dict__.setdefault("_perm_cache", {})
    perm = cache.get(epoch)
    if perm is None:
      dtype = np.int32 if self.num_records < 2**31 else np.int64
      perm = np.random.default_rng(self.epoch_seed(epoch)).permutation(self.num_records).astype(dtype)
      if len(cache) >= 2:
        cache.pop(min(cache))
      cache[epoch] = perm
    return perm

  def locate(self, index: int) -> tuple[int, int, bool]:
    if not self.pad:
      step, offset = divmod(int(index), self.block)
      g = (step * self.process_count + self.process_index) * self.block + offset
      epoch, g = divmod(g, self.num_records)
      if self.shuffle and self.num_records > 1:
        g = int(self.permutation(epoch)[g])
      return epoch, g, True
    epoch, j = divmod(int(index), self.per_epoch)
    g = j * self.process_count + self.process_index
    valid = g < self.num_records
    if not valid:
      g = g % self.num_records
    if self.shuffle and self.num_records > 1:
      # A cached numpy permutation per epoch: grain's index_shuffle measured ~0.7 ms of CPU
      # per call here, as much as decoding a JPEG.
      g = int(self.permutation(epoch)[g])
    return epoch, g, valid


def resolve_process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


# ----------------------------------------------------------------------------------------
# Example construction (runs in workers; everything here is picklable)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  levels: tuple[int, ...] | None
  children_per_level: int | str
  min_tissue: float
  max_keywords: int
  image_size: int
  class_names: tuple[str, ...]
  augment: transforms.AugmentSpec
  seed: int


class BagExamples:
  """Callable: host-local index -> one example dict (numpy arrays and strings)."""

  def __init__(self, source, plan: ShardPlan, spec: ExampleSpec, *, train: bool):
    self.source = source
    self.plan = plan
    self.spec = spec
    self.train = train
    self._label_index = {name: i for i, name in enumerate(spec.class_names)}

  def __call__(self, index: int) -> dict[str, Any]:
    epoch, record, valid = self.plan.locate(index)
    return self.example(record, epoch, valid)

  def example(self, record: int, epoch: int, valid: bool = True) -> dict[str, Any]:
    spec = self.spec
    bag = self.source.bag(record)
    rng = np.random.default_rng([spec.seed, epoch, record])
    sel = sampling.select_patches(bag, rng, children_per_level=spec.children_per_level,
                                  levels=spec.levels, min_tissue=spec.min_tissue)
    present = [int(i) for i in sel.indices if i >= 0]
    jpegs = dict(zip(present, self.source.jpegs(record, bag, present)))
    size = spec.image_size or bag.patch_size
    aug = spec.augment if (self.train and spec.augment.enabled) else None
    shared = transforms.sample_params(rng, aug) if aug is not None and aug.consistent else None
    n = len(sel.indices)
    on_device = aug is not None and aug.on_device
    images = np.zeros((n, size, size, 3), np.uint8)
    if on_device:
      color = np.broadcast_to(transforms.IDENTITY_COLOR, (n, 3, 4)).copy()
      dihedral = np.zeros((n,), np.int32)
    mags = np.zeros((n,), np.float32)
    labels = np.full((n,), -1, np.int32)
    caption_mask = np.zeros((n,), bool)
    captions = [""] * n
    tree_levels = list(spec.levels) if spec.levels is not None else list(range(len(bag.magnifications)))
    for p, bi in enumerate(sel.indices):
      if bi < 0:  # a patch the bag lacks: zeros, masked
        tree_level = tree_levels[sel.level[p]]
        if tree_level < len(bag.magnifications):
          mags[p] = bag.magnifications[tree_level]
        continue
      patch = bag.patches[bi]
      if aug is None:
        images[p] = transforms.decode_to_array(jpegs[int(bi)], size)
      else:
        params = shared if shared is not None else transforms.sample_params(rng, aug)
        pixels = transforms.decode_to_array(jpegs[int(bi)], None if "crop" in params else size)
        if on_device:
          images[p], color[p], dihedral[p] = transforms.augment_for_device(pixels, params, size)
        else:
          images[p] = transforms.augment_image(pixels, params, size)
      mags[p] = patch.magnification
      labels[p] = self._label_index.get(patch.label, -1)
      caption_mask[p] = bool(patch.has_caption)
      captions[p] = patch.caption if patch.has_caption else ""
    keywords, keyword_mask = sampling.select_keywords(bag.keywords, spec.max_keywords,
                                                      rng if self.train else None)
    example = {
        "images": images, "magnification": mags, "level": sel.level, "parent": sel.parent,
        "patch_mask": sel.valid, "patch_index": sel.indices, "labels": labels, "caption_mask": caption_mask,
        "keyword_mask": keyword_mask, "record_index": np.int32(record), "valid": np.bool_(valid),
        "captions": captions, "keywords": keywords,
    }
    if on_device:
      example.update(color_transform=color, dihedral=dihedral)
    return example


class Collate:
  """Stacks examples into a batch and tokenizes its texts in one call."""

  def __init__(self, tokenizer=None, text_keys: Sequence[tuple[str, str]] = (
      ("captions", "caption_ids"), ("keywords", "keyword_ids")), keep: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.text_keys = tuple(text_keys)
    self.keep = tuple(keep)

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch: dict[str, np.ndarray] = {}
    text_fields = {k for k, _ in self.text_keys}
    for key in examples[0]:
      if key in text_fields:
        continue
      values = [e[key] for e in examples]
      batch[key] = np.stack(values) if not isinstance(values[0], str) else np.asarray(values)
    for key, out_key in self.text_keys:
      if key not in examples[0]:
        continue
      texts = [e[key] for e in examples]
      if key in self.keep:
        batch[key] = np.asarray(texts)
      if self.tokenizer is None:
        continue
      if isinstance(texts[0], str):
        batch[out_key] = self.tokenizer(texts)
      else:
        flat = [t for ts in texts for t in ts]
        ids = self.tokenizer(flat)
        batch[out_key] = ids.reshape(len(texts), len(texts[0]), ids.shape[-1])
    return batch


# ----------------------------------------------------------------------------------------
# Builders


def _as_text_tokenizer(tokenizer, config):
  from pathjax.input.tokenize import TextTokenizer
  if tokenizer is None and config.get("tokenizer"):
    tokenizer = config.tokenizer
  if tokenizer is None or isinstance(tokenizer, TextTokenizer):
    return tokenizer
  return TextTokenizer(tokenizer, config.get("context_length", 77))


def _spec(config, seed) -> ExampleSpec:
  levels = config.get("levels")
  return ExampleSpec(
      levels=None if levels is None else tuple(int(l) for l in levels),
      children_per_level=children_per_level(config),
      min_tissue=float(config.get("min_tissue", 0.0)),
      max_keywords=int(config.get("max_keywords", 16)),
      image_size=int(config.get("image_size", 0) or 0),
      class_names=tuple(config.get("class_names", ()) or ()),
      augment=transforms.AugmentSpec.from_config(config.get("augment")),
      seed=int(seed))


def _mark_flags_parsed():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _finish(ds: grain.MapDataset, config, worker_count: int | None):
  read_threads = int(config.get("read_threads", 0))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=max(read_threads * 2, 0)))
  workers = int(config.get("worker_count", 0) if worker_count is None else worker_count)
  if workers > 0:
    _mark_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(config.get("worker_buffer_size", 2))))
  return it_ds


def _per_host_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  return global_batch // process_count


def _check_input_config(config) -> None:
  from pathjax.config_lib import check_renamed
  check_renamed(config, "input")


def make_train_dataset(config, *, batch_size: int, tokenizer=None, process_index=None,
                       process_count=None, seed=None, worker_count=None) -> grain.IterDataset:
  """The training IterDataset (see the module docstring); `iter()` it to get batches.
  `batch_size`: the global batch (all hosts)."""
  _check_input_config(config)
  process_index, process_count = resolve_process(process_index, process_count)
  seed = int(config.get("seed", 0) if seed is None else seed)
  source, _ = records_lib.open_records(config.records_dir)
  batch = _per_host_batch(int(batch_size), process_count)
  plan = ShardPlan(len(source), process_index, process_count,
                   shuffle=bool(config.get("shuffle", True)), seed=seed, block=batch)
  num_epochs = config.get("num_epochs")
  # Whole global batches only: the last partial one of the final epoch is dropped.
  length = (sys.maxsize if num_epochs is None else
            len(source) * int(num_epochs) // int(batch_size) * batch)
  if length < batch:
    raise ValueError(f"{len(source)} records x {num_epochs} epochs cannot fill one global "
                     f"batch of {batch_size}")
  examples = BagExamples(source, plan, _spec(config, seed), train=True)
  text = _as_text_tokenizer(tokenizer, config)
  ds = grain.MapDataset.range(length).map(examples)
  ds = ds.batch(batch, drop_remainder=True, batch_fn=Collate(text))
  ds = ds.map(_drop_valid)
  return _finish(ds, config, worker_count)


def _drop_valid(batch):
  batch.pop("valid", None)
  return batch


def make_train_iterator(config, *, batch_size: int, tokenizer=None, process_index=None,
                        process_count=None, seed=None, worker_count=None) -> grain.DatasetIterator:
  """Iterator of per-host training batches; has get_state()/set_state() (module docstring).

  `config` is `config.input` (default_input_config()); `batch_size` the global batch (the
  config's top-level `batch_size`), split over processes. `tokenizer`: a TextTokenizer, a
  transformers tokenizer, a directory, or None for `config.tokenizer` (no text ids if empty).
  `process_index/process_count` default to jax's; pass them to simulate hosts.
  """
  return iter(make_train_dataset(config, batch_size=batch_size, tokenizer=tokenizer,
                                 process_index=process_index,
                                 process_count=process_count, seed=seed,
                                 worker_count=worker_count))


def make_eval_iterator(config, *, tokenizer=None, records_dir=None, batch_size=None,
                       process_index=None, process_count=None, worker_count=None):
  """One pass over every record in order, no augmentation; the final batch is padded.

  Each host gets ceil(N / P) positions (host p: records p, p+P, ...); `valid` [B] marks
  real examples (padding repeats a real record with valid=False). The sampled patches and
  keywords are fixed per record (seeded by config.seed). `batch_size` is per host; the
  default is config.eval_batch_size / process_count (one of the two must be given).
  """
  _check_input_config(config)
  process_index, process_count = resolve_process(process_index, process_count)
  source, _ = records_lib.open_records(records_dir or config.get("eval_records_dir")
                                       or config.records_dir)
  plan = ShardPlan(len(source), process_index, process_count, shuffle=False,
                   seed=int(config.get("seed", 0)), pad=True)
  if batch_size is None:
    if not config.get("eval_batch_size"):
      raise ValueError("make_eval_iterator needs batch_size (per host) or config.eval_batch_size")
    batch_size = _per_host_batch(int(config.eval_batch_size), process_count)
  num_batches = -(-plan.per_epoch // batch_size)
  examples = BagExamples(source, plan, _spec(config, config.get("seed", 0)), train=False)
  text = _as_text_tokenizer(tokenizer, config)
  ds = grain.MapDataset.range(num_batches * batch_size).map(_PadTo(examples, plan.per_epoch))
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=Collate(text))
  return iter(_finish(ds, config, worker_count))


class _PadTo:
  """Positions past `n` repeat position 0 with valid=False."""

  def __init__(self, fn, n):
    self.fn, self.n = fn, n

  def __call__(self, index):
    if index < self.n:
      return self.fn(index)
    example = self.fn(0)
    example["valid"] = np.bool_(False)
    return example


def batches_per_epoch(config, batch_size: int, process_count: int | None = None) -> int:
  """Training steps per epoch (global batches of `batch_size`), for schedules."""
  if process_count is None:
    import jax
    process_count = jax.process_count()
  source, _ = records_lib.open_records(config.records_dir)
  _per_host_batch(int(batch_size), process_count)  # checks divisibility
  return len(source) // int(batch_size)


def batch_shapes(config, global_batch_size: int) -> dict[str, "jax.ShapeDtypeStruct"]:
  """ShapeDtypeStructs of a global training batch of `make_train_iterator` (tracing/AOT).

  Needs `config.levels` (or the default of 4 tree levels) and `config.image_size`, since no
  records are read.
  """
  levels = config.get("levels")
  levels = tuple(range(4)) if levels is None else tuple(int(l) for l in levels)
  p = sampling.num_selected(levels, children_per_level(config))
  size = int(config.get("image_size", 0) or 0)
  if not size:
    raise ValueError("example_batch needs config.input.image_size (the records' patch size)")
  b, k, t = global_batch_size, int(config.get("max_keywords", 16)), int(config.get("context_length", 77))
  import jax
  shape = lambda dims, dtype: jax.ShapeDtypeStruct(dims, np.dtype(dtype))
  return {
      "images": shape((b, p, size, size, 3), np.uint8),
      "magnification": shape((b, p), np.float32),
      "level": shape((b, p), np.int32),
      "parent": shape((b, p), np.int32),
      "patch_mask": shape((b, p), bool),
      "patch_index": shape((b, p), np.int32),
      "labels": shape((b, p), np.int32),
      "caption_mask": shape((b, p), bool),
      "keyword_mask": shape((b, k), bool),
      "record_index": shape((b,), np.int32),
      "caption_ids": shape((b, p, t), np.int32),
      "keyword_ids": shape((b, k, t), np.int32),
      **({"color_transform": shape((b, p, 3, 4), np.float32),
          "dihedral": shape((b, p), np.int32)} if _augments_on_device(config) else {}),
  }


def _augments_on_device(config) -> bool:
  spec = transforms.AugmentSpec.from_config(config.get("augment"))
  return spec.enabled and spec.on_device
