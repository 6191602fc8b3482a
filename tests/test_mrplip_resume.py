"""MR-PLIP through the real Grain pipeline: a crashed run, rerun, equals an uninterrupted one.

The toy recipe covers the trainer's checkpoint logic (test_checkpoint.py); this covers what
MR-PLIP adds on the way: bag records, the pipeline's iterator state inside the checkpoint,
and the on-device augmentation fields of its batches.
"""

import os

import pytest

from mrplip_helpers import TINY
from pathjax import config_lib
from train_helpers import ROOT, assert_crash_resumes_exactly

CONFIG = os.path.join(ROOT, "configs", "mrplip.py") + ":smoke"


def _config(records, tokenizer):
  overrides = [o for o in TINY if not o.startswith("model.text.overrides.vocab_size")] + [
      "model.text.overrides.vocab_size=0", f"input.records_dir={records}",
      f"input.tokenizer={tokenizer}", "total_steps=6", "log_every=1", "checkpoint_every=2",
      "keep_checkpoints=2", "evals=()"]
  return config_lib.load_config(CONFIG, overrides)


@pytest.mark.slow
def test_crash_then_rerun_matches_uninterrupted_run(tiny_training_data, tmp_path):
  records, tokenizer = tiny_training_data
  config = _config(records, tokenizer)
  assert config.input.augment.enabled and config.input.augment.on_device
  assert_crash_resumes_exactly(config, tmp_path, crash_step=5)  # resumes from step 4
