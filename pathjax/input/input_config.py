"""`config.input`: the fields of the training input pipeline (pathjax.input.pipeline).

Kept apart from the pipeline so config files import no data-loading code (grain, records).
The global batch is not here: it is the top-level `config.batch_size`, the one batch-size
field every consumer reads (a config that still sets `input.global_batch_size` is refused by
pathjax.config_lib, naming `batch_size`).
"""

from __future__ import annotations

import ml_collections

from pathjax.input import transforms

SAMPLING_MODES = ("chain", "children", "all")


def default_input_config() -> ml_collections.ConfigDict:
  """`config.input` of a recipe config (every field is an override: --config.input.X=...)."""
  c = ml_collections.ConfigDict()
  c.records_dir = ""            # a finished `pathjax tile` output
  c.levels = None               # tree levels to emit (0 = root / lowest magnification); None = all
  c.image_size = 0              # 0: the records' patch size; else resize to this
  c.sampling = "chain"          # 'chain' (1 patch per level) | 'children' | 'all' (full bag)
  c.children_per_level = 2      # k children per chosen patch when sampling == 'children'
  c.min_tissue = 0.0            # descendants below this tissue fraction are avoided and masked
  c.max_keywords = 16           # K: keywords per example (the text bag), masked when fewer
  c.context_length = 77
  c.tokenizer = ""              # tokenizer directory (or hub name when online)
  c.augment = transforms.augment_config()
  c.worker_count = 0            # Grain worker processes (0 = in the main process)
  c.worker_buffer_size = 2      # batches buffered per worker
  c.read_threads = 0            # threads per process reading/decoding (0 = synchronous)
  c.num_epochs = None           # None = repeat forever
  c.shuffle = True
  c.seed = 0
  c.class_names = ()            # Patch.label vocabulary for `labels`
  return c
