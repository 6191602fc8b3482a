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
    """Parameters (boxed with logical axis names) for a global batch of this shape."""

  def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool) -> tuple[jax.Array, Metrics]:
    """Scalar loss and metrics for a global batch (device arrays, images still uint8)."""

  def example_batch(self, global_batch_size: int) -> Batch:
    """A batch of the right shapes and dtypes (numpy zeros) for tracing and AOT compiles."""

  def train_iterator(self, process_index: int, process_count: int) -> Iterator[Batch]:
    """This host's batches (global batch / process count). Supports get_state/set_state."""

  def encoders(self, params: Any) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """Embedding functions into the shared space: {"image": f(uint8 NHWC), "text": f(ids)}."""

  def export(self, params: Any) -> dict[str, Any]:
    """Towers to write into a model directory (see pathjax.models.model_dir)."""

  # Optional: `load_pretrained(params, param_shardings) -> params` replaces parts of freshly
  # initialised (unboxed, sharded) parameters with published weights; the trainer calls it
  # when a run starts from scratch, never on resume.


def make_recipe(config) -> Recipe:
  """Imports `pathjax.recipes.<config.recipe>` and returns its `make_recipe(config)`."""
  try:
    module = importlib.import_module(f"pathjax.recipes.{config.recipe}")
  except ModuleNotFoundError as e:
    if e.name != f"pathjax.recipes.{config.recipe}":
      raise
    import pkgutil
    import pathjax.recipes
    valid = [m.name for m in pkgutil.iter_modules(pathjax.recipes.__path__) if m.name != "base"]
    raise ValueError(f"unknown recipe {config.recipe!r}; valid recipes: {', '.join(valid)}") from None
  return module.make_recipe(config)
