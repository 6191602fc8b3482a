"""Optimizer from `config.optimizer`: AdamW, warmup + cosine, regex rules over parameter paths.

Parameter paths are the '/'-joined keys of the parameter tree ("text/layers_0/mlp/kernel").
Every rule below is a list of regular expressions matched with `re.fullmatch` against that
path, in the style of big_vision's `optax.py`:

* `freeze`: matching parameters never change. The trainer (pathjax.train.ParamSplit) keeps
  them out of the train state altogether: no gradients, no optimizer state, no checkpoint;
  the transformation built here only ever sees trainable parameters.
* `wd_exclude`: matching parameters get no weight decay (biases, norm scales, embeddings).
* `lr_multipliers`: a list of `(regex, multiplier)`; the first match scales that parameter's
  update (and so its effective learning rate and decoupled weight decay).

The chain is: clip by global norm ->
Adam moments -> decoupled weight decay (masked) -> learning-rate schedule -> multipliers.
Boxed (logically partitioned) parameter trees work too: rules see a box as one parameter,
so `tx.init` on boxed params gives optimizer state boxed with the params' logical axes.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

def path_str(path: Sequence[Any]) -> str:
  """'/'-joined dict keys / sequence indices of a tree path (box `.value` attributes skipped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":
        parts.append(key.name)
    else:
      parts.append(str(key))
  return "/".join(parts)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def tree_map_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """Maps `fn(path_string, leaf)` over a tree; a logical-partitioning box counts as a leaf."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree, is_leaf=_is_box)


def parameter_paths(tree: Any) -> list[str]:
  paths = []
  tree_map_paths(lambda p, _: paths.append(p), tree)
  return paths


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
  out = []
  for pattern in patterns:
    try:
      out.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"invalid parameter regex {pattern!r}: {e}") from None
  return out


def matches_any(path: str, patterns: Sequence[re.Pattern]) -> bool:
  return any(p.fullmatch(path) for p in patterns)


def make_mask(patterns: Sequence[str], match_value: bool = True) -> Callable[[Any], Any]:
  """A function params -> bool tree: `match_value` where a path matches one of `patterns`."""
  compiled = compile_patterns(patterns)
  return lambda tree: tree_map_paths(
      lambda p, _: matches_any(p, compiled) == match_value, tree)


def lr_multiplier_for(path: str, rules: Sequence[tuple[re.Pattern, float]]) -> float:
  for pattern, mult in rules:
    if pattern.fullmatch(path):
      return mult
  return 1.0


def scale_by_multipliers(multipliers: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Scales each update by the multiplier of the first regex matching its path."""
  rules = [(p, float(m)) for p, m in zip(compile_patterns([r for r, _ in multipliers]),
                                           [m for _, m in multipliers])]

  def update_fn(updates, state, params=None):
    del params
    def scale(path, u):
      mult = lr_multiplier_for(path, rules)
      return u if mult == 1.0 else u * jnp.asarray(mult, u.dtype)
    return tree_map_paths(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_from` (default 0) to `lr` over `warmup_steps`, then
  `schedule` down to `end_lr`.

  schedules: "cosine" (cosine decay to end_lr at total_steps), "linear", "constant".
  """
  lr, end_lr = float(opt_config.lr), float(opt_config.get("end_lr", 0.0))
  warmup = int(opt_config.get("warmup_steps", 0))
  start = float(opt_config.get("warmup_from", 0.0))
  name = opt_config.get("schedule", "cosine")
  decay_steps = max(int(total_steps) - warmup, 1)
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(start, lr, warmup, max(int(total_steps), warmup + 1),
                                              end_value=end_lr)
  if name == "linear":
    decay = optax.linear_schedule(lr, end_lr, decay_steps)
  elif name == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown optimizer.schedule {name!r}; valid: cosine, linear, constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(start, lr, warmup), decay], [warmup])


def make_optimizer(opt_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, learning-rate schedule) from `config.optimizer` (fields documented in configs/toy.py)."""
  name = opt_config.get("name", "adamw")
  if name != "adamw":
    raise ValueError(f"unknown optimizer.name {name!r}; valid: adamw")
  schedule = make_schedule(opt_config, total_steps)
  chain = []
  clip = opt_config.get("grad_clip_norm", None)
  if clip:
    chain.append(optax.clip_by_global_norm(float(clip)))
  chain.append(optax.scale_by_adam(b1=float(opt_config.b1), b2=float(opt_config.b2),
                                   eps=float(opt_config.eps)))
  if float(opt_config.weight_decay):
    chain.append(optax.add_decayed_weights(
        float(opt_config.weight_decay), mask=make_mask(opt_config.wd_exclude, match_value=False)))
  chain.append(optax.scale_by_learning_rate(schedule))
  multipliers = [tuple(rule) for rule in opt_config.get("lr_multipliers", ())]
  if multipliers:
    chain.append(scale_by_multipliers(multipliers))
  return optax.chain(*chain), schedule


def describe_rules(opt_config, params: Any) -> list[str]:
  """One line per parameter: path, frozen?, weight decay?, lr multiplier (for logs and tests)."""
  freeze = compile_patterns(opt_config.get("freeze", ()))
  wd_ex = compile_patterns(opt_config.get("wd_exclude", ()))
  mults = [(p, float(m)) for p, m in zip(
      compile_patterns([r for r, _ in opt_config.get("lr_multipliers", ())]),
      [m for _, m in opt_config.get("lr_multipliers", ())])]
  lines = []
  for path in parameter_paths(params):
    lines.append(f"{path} frozen={matches_any(path, freeze)} "
                 f"wd={not matches_any(path, wd_ex) and bool(float(opt_config.weight_decay))} "
                 f"lr_mult={lr_multiplier_for(path, mults)}")
  return lines


__all__ = ["make_optimizer", "make_schedule", "make_mask", "compile_patterns", "matches_any",
           "path_str", "parameter_paths", "describe_rules"]
