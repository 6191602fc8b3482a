"""MR-PLIP through the real Grain pipeline: a crashed run, rerun, equals an uninterrupted one.

The toy recipe covers the trainer's checkpoint logic (test_checkpoint.py); this covers what
MR-PLIP adds on the way: bag records, the pipeline's iterator state inside the checkpoint,
and the on-device augmentation fields of its batches.
"""

import os

import pytest

from mrplip_helpers import TINY
from pathjax import config_lib
from pathjax.train import train
from train_helpers import ROOT, Crash, comparable, crash_at

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
  train(config, tmp_path / "straight")

  with pytest.raises(Crash):
    train(config, tmp_path / "crashed", evaluators=[crash_at(5)])
  assert max(comparable(tmp_path / "crashed")) == 4
  train(config, tmp_path / "crashed")  # the same command again: resumes from step 4
  straight, resumed = comparable(tmp_path / "straight"), comparable(tmp_path / "crashed")
  assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
  assert resumed == straight
