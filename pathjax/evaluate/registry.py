"""Periodic evaluation inside training: `make_evaluator(eval_config, recipe)`.

The trainer calls `make_evaluator` once per entry of `config.evals` and then
`evaluator(params, step) -> {name/metric: float}` every `eval_config.every` steps. Fields of
an entry (`eval_config()` gives the defaults):

    kind            a registered task (pathjax.evaluate.tasks.task_names(): zeroshot,
                    cross_mag, linear_probe, knn, kshot, retrieval, ...) or module.path:name
    name            prefix of the returned metrics (default: kind)
    every           steps between runs (read by the trainer; also `evaluator.every`)
    data            a data spec (pathjax.evaluate.data), e.g. "slides:/data/synth" or
                    "records:/data/val@20"
    train_data      probes: training data spec ("" = a stratified split of `data`)
    prompts         zero-shot prompt file (name in data/prompts or a path; "" = class names)
    magnification   evaluate at this magnification (0 = as stored)
    magnifications  cross_mag: the magnifications (default 5, 10, 20, 40)
    max_examples    a fixed random subset of at most this many examples (0 = all)
    batch_size      images per forward pass
    k, shots, seeds, seed, test_fraction: probe options

The model side is `recipe.predict_fns(params)`, an open set of named functions; a task
declares the keys it needs (pathjax.evaluate.tasks.register_task) and the evaluator checks
them before reading data. "image" and "text" are jitted once per evaluator with
the params as an argument (no recompilation per call); the tokenizer is
`recipe.config.input.tokenizer`. Every host runs the same evaluation on the same data (the
data are small and read identically), so params sharded across hosts are fine: the host
arrays are replicated inputs of the jitted encoders.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import ml_collections
import numpy as np

from pathjax.evaluate import data as data_lib
from pathjax.evaluate import features as features_lib
from pathjax.evaluate import tasks as tasks_lib


def eval_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "zeroshot"
  c.name = ""
  c.every = 1000
  c.data = ""
  c.train_data = ""
  c.prompts = ""
  c.magnification = 0.0
  c.magnifications = (5.0, 10.0, 20.0, 40.0)
  c.max_examples = 0
  c.batch_size = 64
  c.k = 20
  c.shots = (1, 2, 4, 8, 16)
  c.seeds = 5
  c.seed = 0
  c.test_fraction = 0.3
  c.labels = ""             # slide tasks: a slide -> class file (JSON, JSON lines or CSV)
  c.topk = ()               # slide_zeroshot, patch models: top-k pooling ks (() = MI-Zero's)
  c.shifts = True           # localization, grid regions: maps averaged over the grid's translations
  c.update(overrides)
  return c


def _get(cfg, key, default=None):
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def recipe_embedder(recipe, tokenizer=None) -> Callable[[Any], features_lib.Embedder]:
  """params -> Embedder over `recipe.predict_fns(params)`'s image and text, jitted once."""
  import jax
  cfg = recipe.config
  image_jit = jax.jit(lambda p, x: recipe.predict_fns(p)["image"](x))
  text_jit = jax.jit(lambda p, ids: recipe.predict_fns(p)["text"](ids))
  state = {"tokenizer": tokenizer}

  def make(params) -> features_lib.Embedder:
    if state["tokenizer"] is None:
      from pathjax.input.tokenize import TextTokenizer
      state["tokenizer"] = TextTokenizer(cfg.input.tokenizer, context_length=cfg.input.context_length)
    return features_lib.Embedder.from_encoders(
        lambda x: image_jit(params, x), lambda ids: text_jit(params, ids), state["tokenizer"],
        int(cfg.input.image_size), name=f"recipe {getattr(cfg, 'recipe', '')}")
  return make


def make_evaluator(eval_cfg, recipe, *, tokenizer=None, log: Callable[[str], None] | None = None):
  """evaluator(params, step) -> dict of floats, keys "{name}/{metric}"."""
  kind = _get(eval_cfg, "kind", "zeroshot")
  try:
    task = tasks_lib.get_task(kind)
  except ValueError as e:
    raise ValueError(f"evals: {e}") from None
  provided = set(recipe.predict_fns(None))  # keys only: the functions are not called
  if not set(task.needs) <= provided:
    raise ValueError(f"evals: task {kind!r} needs predict functions {sorted(task.needs)}, but "
                     f"recipe {recipe.config.recipe!r} provides {sorted(provided)}")
  if task.make_inputs is not None:  # a task over the recipe's own data (slide tasks)
    return _own_data_evaluator(eval_cfg, recipe, task, kind, log)
  spec = _get(eval_cfg, "data", "")
  if not spec:
    raise ValueError(f"evals: the {kind} entry needs `data` (a data spec such as slides:DIR, "
                     "imagefolder:DIR, records:DIR@20)")
  name = _get(eval_cfg, "name") or kind
  log = log or (lambda s: logging.getLogger("pathjax.evaluate").info("%s: %s", name, s))
  max_examples = int(_get(eval_cfg, "max_examples", 0) or 0)
  seed = int(_get(eval_cfg, "seed", 0) or 0)
  embedder_for = recipe_embedder(recipe, tokenizer)
  cache: dict[str, Any] = {}

  def datasets():
    if "data" not in cache:
      ds = data_lib.load_dataset(spec)
      for w in ds.warnings:
        log(w)
      cache["data"] = ds.limit(max_examples, seed=seed) if max_examples else ds
      train_spec = _get(eval_cfg, "train_data", "")
      cache["train"] = data_lib.load_dataset(train_spec) if train_spec else None
    return cache["data"], cache["train"]

  def evaluator(params, step: int | None = None) -> dict[str, float]:
    ds, train = datasets()
    result = tasks_lib.run_task(
        kind, ds, embedder_for(params), prompts=_get(eval_cfg, "prompts", "") or None,
        train_dataset=train, magnification=float(_get(eval_cfg, "magnification", 0) or 0) or None,
        magnifications=tuple(_get(eval_cfg, "magnifications", ()) or ()) or None,
        batch_size=int(_get(eval_cfg, "batch_size", 64)), k=int(_get(eval_cfg, "k", 20)),
        shots=tuple(_get(eval_cfg, "shots", (1, 2, 4, 8, 16))), seeds=int(_get(eval_cfg, "seeds", 5)),
        test_fraction=float(_get(eval_cfg, "test_fraction", 0.3)), seed=seed, progress=False, report=log)
    scalars = {k: v for k, v in result.scalars(f"{name}/").items() if np.isfinite(v)}
    return scalars

  evaluator.every = int(_get(eval_cfg, "every", 1000) or 0)
  evaluator.name = name
  evaluator.kind = kind
  return evaluator


def _own_data_evaluator(eval_cfg, recipe, task, kind: str, log):
  """Evaluator for a task with `make_inputs` (its data and embedder come from the recipe)."""
  name = _get(eval_cfg, "name") or kind
  log = log or (lambda s: logging.getLogger("pathjax.evaluate").info("%s: %s", name, s))
  load, embedder = task.make_inputs(eval_cfg, recipe)
  options = {k: _get(eval_cfg, k) for k in ("prompts", "k", "batch_size", "seed", "topk")}

  def evaluator(params, step: int | None = None) -> dict[str, float]:
    ds, train = load()
    result = task.run(ds, embedder(params), train_dataset=train, progress=False, report=log,
                      **{k: v for k, v in options.items() if v not in (None, "")})
    return {k: v for k, v in result.scalars(f"{name}/").items() if np.isfinite(v)}

  evaluator.every = int(_get(eval_cfg, "every", 1000) or 0)
  evaluator.name = name
  evaluator.kind = kind
  return evaluator
