"""What a recipe gives the trainer. The trainer never looks at a recipe's name.

A recipe module `pathjax/recipes/<name>.py` defines `make_recipe(config) -> Recipe`; the
config names it in `config.recipe`. Everything recipe-specific (model assembly, loss, batch
layout, which towers a trained model exports) lives behind this interface.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Protocol

import jax

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


class Recipe(Protocol):
  config: Any

  def init(self, rng: jax.Array, batch: Batch) -> Any:
    """Parameters (boxed with logical axis names) for a global batch of these shapes.

    Only ever traced (`jax.eval_shape`, `jax.jit`); `batch` holds ShapeDtypeStructs."""

  def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool) -> tuple[jax.Array, Metrics]:
    """Scalar loss and metrics for a global batch (device arrays, images still uint8)."""

  def example_batch(self, global_batch_size: int) -> Batch:
    """`jax.ShapeDtypeStruct`s of a global batch, for tracing and AOT compiles (no data)."""

  def train_iterator(self, process_index: int, process_count: int) -> Iterator[Batch]:
    """This host's batches (global batch / process count). Supports get_state/set_state."""

  def predict_fns(self, params: Any) -> dict[str, Callable[..., Any]]:
    """Named jittable functions of a trained model, an open set picked by key, e.g.
    {"image": f(uint8 NHWC) -> [N, E], "text": f(ids) -> [N, E]} for a patch model, or
    "slide", "region", "generate" for slide-level recipes. Evaluation tasks and
    `pathjax embed` ask for the keys they need (pathjax.evaluate.registry). Only builds
    closures: `predict_fns(None)` must work, to list the keys."""

  def export(self, params: Any) -> dict[str, Any]:
    """Towers to write into a model directory (see pathjax.models.model_dir)."""

  # Optional:
  # `frozen_patterns() -> tuple[str, ...]`: regexes over parameter paths of towers the
  #   recipe always freezes (added to config.optimizer.freeze).
  # `load_pretrained(abstract, wanted) -> {path: jax.Array}`: published weights for some of
  #   the '/'-joined parameter paths in `wanted`, each placed in the sharding of
  #   `abstract[path]` (a ShapeDtypeStruct; `abstract` holds every parameter). The trainer
  #   asks for frozen paths on every start and for trainable ones on a fresh start only;
  #   what the recipe does not return is initialised randomly.


def make_recipe(config, mesh: jax.sharding.Mesh | None = None) -> Recipe:
  """Imports `pathjax.recipes.<config.recipe>` and returns its `make_recipe(config, mesh)`.

  `mesh` is the training mesh, passed to losses that shard explicitly (shard_map rings);
  None outside training (evaluation, export), where batches are not sharded.
  """
  try:
    module = importlib.import_module(f"pathjax.recipes.{config.recipe}")
  except ModuleNotFoundError as e:
    if e.name != f"pathjax.recipes.{config.recipe}":
      raise
    import pkgutil
    import pathjax.recipes
    valid = [m.name for m in pkgutil.iter_modules(pathjax.recipes.__path__) if m.name != "base"]
    raise ValueError(f"unknown recipe {config.recipe!r}; valid recipes: {', '.join(valid)}") from None
  return module.make_recipe(config, mesh=mesh)
