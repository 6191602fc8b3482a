"""Toy regression recipe: the trainer's test bed and the smallest complete config.

  pathjax train --config=configs/toy.py --workdir /tmp/toy
  pathjax train --config=configs/toy.py:accum --workdir /tmp/toy_accum --config.total_steps=50

Variants: `default` (plain AdamW), `accum` (2 micro-batches per step), `frozen` (encoder
frozen, head at 10x learning rate). Every trainer field is documented in
pathjax/train_config.py (`default_train_config`); this file adds the recipe's own groups.
"""

import ml_collections

from pathjax.config_lib import pick_variant
from pathjax.train_config import default_train_config

VARIANTS = {"default": {}, "accum": {}, "frozen": {}}


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, "default")
  config = default_train_config()
  config.recipe = "toy"
  config.seed = 0
  config.batch_size = 16
  config.total_steps = 40
  config.log_every = 1
  config.checkpoint_every = 10
  config.keep_checkpoints = 3
  config.model = ml_collections.ConfigDict(dict(in_dim=8, hidden=32, out_dim=4))
  config.data = ml_collections.ConfigDict(dict(num_examples=512, seed=1, noise=0.01))
  opt = config.optimizer
  opt.lr = 3e-3
  opt.end_lr = 3e-4
  opt.warmup_steps = 5
  opt.weight_decay = 1e-4
  if variant == "accum":
    opt.accumulate_steps = 2
  if variant == "frozen":
    opt.freeze = (r"encoder/.*",)
    opt.lr_multipliers = ((r"head/.*", 10.0),)
  return config
