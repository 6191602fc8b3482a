"""The trainer's config fields, shared by every recipe config (`default_train_config()`).

Every field is documented here; recipe configs start from `default_train_config()` and add
their own groups (`config.model`, `config.data`, ...). configs/toy.py is the smallest example.
"""

from __future__ import annotations

import ml_collections

from pathjax.sharding import DEFAULT_MESH_AXES, FSDP_TENSOR_RULES


def default_optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw",            # only AdamW for now
      lr=1e-3,                 # peak learning rate (after warmup)
      end_lr=0.0,              # learning rate at total_steps
      warmup_steps=0,          # linear warmup from 0 to lr
      schedule="cosine",       # after warmup: cosine | linear | constant
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,        # decoupled (AdamW), multiplied by the learning rate
      # Regexes (re.fullmatch on '/'-joined parameter paths) excluded from weight decay.
      wd_exclude=(r".*bias", r".*scale", r".*norm.*", r".*(pos_embed|cls|embedding).*"),
      lr_multipliers=(),       # ((regex, multiplier), ...): first match wins
      freeze=(),               # regexes: frozen params live outside the train state (no grads,
                               # no optimizer state, not checkpointed; reloaded on every start)
      grad_clip_norm=1.0,      # clip by global norm over trainable grads; 0 disables
      # >1: the global batch is split into this many micro-batches inside the jitted step
      # (lax.scan); gradients are averaged, so the update equals one big-batch step while
      # activation memory scales with the micro-batch.
      accumulate_steps=1,
  ))


def default_train_config() -> ml_collections.ConfigDict:
  """Trainer fields with defaults. Recipe configs add their own groups on top."""
  config = ml_collections.ConfigDict()
  config.recipe = ""                  # module name under pathjax/recipes (e.g. "toy", "mrplip")
  config.seed = 0                     # params init, training rng (folded with the step), data order
  config.batch_size = 8               # global batch (split over processes, then devices)
  config.total_steps = 100
  config.log_every = 10               # fetch metrics, write metrics.jsonl / tb, print progress
  config.checkpoint_every = 100       # also saved at the end and on SIGTERM
  config.keep_checkpoints = 3         # keep the last N
  config.async_checkpoints = True     # orbax writes in a background thread
  config.checkpoint_frozen = False    # also store frozen parameters (they are reloaded anyway)
  config.mesh = ml_collections.ConfigDict(dict(
      axes=DEFAULT_MESH_AXES,         # ("slice", "data", "fsdp", "tensor")
      shape=(1, -1, 1, 1)))           # one -1 fills up with the remaining devices
  config.axis_rules = FSDP_TENSOR_RULES  # logical axis name -> mesh axes
  config.optimizer = default_optimizer_config()
  config.precision = ml_collections.ConfigDict(dict(
      param_dtype="float32",          # params and optimizer state
      compute_dtype="float32"))       # activations/matmuls; the recipe casts (bfloat16 on TPU/GPU)
  # Periodic evaluations: ConfigDicts with `kind` (resolved by
  # pathjax.evaluate.registry.make_evaluator(eval_config, recipe)), `every` (steps) and an
  # optional `name` (metric prefix, default kind). Evaluators run on process 0's schedule on
  # every process and return {metric: float}; they are logged with the training metrics.
  config.evals = []
  config.export_model = False         # write WORKDIR/model (recipe.export) at the end
  return config
