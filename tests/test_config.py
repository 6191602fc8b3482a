"""Config files, variants and overrides: errors name what is valid, before anything runs."""

import subprocess
import sys

import pytest

from pathjax import config_lib
from pathjax.config_lib import ConfigError

MRPLIP = "configs/mrplip.py"


def test_variants_and_ablations_load():
  for variant in ("smoke", "vitb16", "vitl16", "smoke,no_cvta", "vitl16,no_mrtva,single_mag"):
    config = config_lib.load_config(f"{MRPLIP}:{variant}")
    assert config.recipe == "mrplip"
  assert config_lib.load_config(f"{MRPLIP}:smoke,no_cvta").loss.w_cvta == 0.0
  assert config_lib.load_config(f"{MRPLIP}:smoke,single_mag").input.levels == (2,)


def test_unknown_variant_lists_valid_ones():
  with pytest.raises(ConfigError, match="valid variants: smoke, vitb16, vitl16"):
    config_lib.load_config(f"{MRPLIP}:smokey")
  with pytest.raises(ConfigError, match="no_cvta"):
    config_lib.load_config(f"{MRPLIP}:smoke,no_cvt")


def test_overrides_are_typed():
  config = config_lib.load_config(f"{MRPLIP}:smoke", [
      "batch_size=16", "optimizer.lr=3e-4", "loss.contrastive=sigmoid", "model.scan=false",
      "input.levels=(0, 2)", "optimizer.lr_multipliers=(('vision_tower/.*', 0.5),)"])
  assert config.batch_size == 16 and isinstance(config.batch_size, int)
  assert "global_batch_size" not in config.input  # batch_size is the one batch-size field
  assert config.optimizer.lr == pytest.approx(3e-4)
  assert config.loss.contrastive == "sigmoid"
  assert config.model.scan is False
  assert config.input.levels == (0, 2)
  assert config.optimizer.lr_multipliers == (("vision_tower/.*", 0.5),)


def test_override_errors():
  with pytest.raises(ConfigError, match=r"loss has no field 'w_cvt'; valid fields: .*w_cvta"):
    config_lib.load_config(f"{MRPLIP}:smoke", ["loss.w_cvt=1"])
  with pytest.raises(ConfigError, match="expected int"):
    config_lib.load_config(f"{MRPLIP}:smoke", ["batch_size=many"])
  with pytest.raises(ConfigError, match="expected true/false"):
    config_lib.load_config(f"{MRPLIP}:smoke", ["model.scan=maybe"])
  with pytest.raises(ConfigError, match="is a group"):
    config_lib.load_config(f"{MRPLIP}:smoke", ["loss=1"])
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.load_config("configs/nope.py:smoke")


def test_split_config_overrides():
  rest, overrides = config_lib.split_config_overrides(
      ["train", "--config=x.py", "--config.a.b=1", "--config.c", "2", "--workdir", "w"])
  assert rest == ["train", "--config=x.py", "--workdir", "w"]
  assert overrides == ["a.b=1", "c=2"]


def test_cli_rejects_typo_before_running(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "pathjax", "train", f"--config={MRPLIP}:smoke",
       "--workdir", str(tmp_path / "w"), "--config.optimizer.lrr=1"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "optimizer has no field 'lrr'" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_the_removed_global_batch_field_names_batch_size(tmp_path):
  """`input.global_batch_size` is gone: setting it (override, config file, or an input
  config handed to the pipeline) is a ConfigError that names `batch_size`."""
  from pathjax.input import pipeline
  with pytest.raises(ConfigError, match=r"input\.global_batch_size was removed; set batch_size"):
    config_lib.load_config(f"{MRPLIP}:smoke", ["input.global_batch_size=8"])
  old = tmp_path / "old.py"
  old.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n"
                 "  return ml_collections.ConfigDict(\n"
                 "      {'batch_size': 8, 'input': {'global_batch_size': 8}})\n")
  with pytest.raises(ConfigError, match=rf"{old}: .*set batch_size"):
    config_lib.load_config(str(old))
  cfg = pipeline.default_input_config()
  cfg.global_batch_size = 8
  with pytest.raises(ConfigError, match="set batch_size"):
    pipeline.make_train_iterator(cfg, batch_size=8, process_index=0, process_count=1)
