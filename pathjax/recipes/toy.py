"""The smallest recipe: a two-layer MLP regressing a fixed random "teacher" on synthetic data.

It exists to test the trainer and to show the Recipe interface (pathjax/recipes/base.py) in
one screen: parameters carry logical axis names, the loss returns (scalar, metrics), and the
training data is a real Grain dataset (shuffled, repeated, split by process, batched), so its
iterator has get_state/set_state and checkpoints resume the data order exactly.
Config: configs/toy.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathjax.input import in_memory
from pathjax.models.layers import constrain, dense, layer_norm


class ToyMLP(nn.Module):
  hidden: int
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = constrain(x.astype(self.dtype), ("act_batch", "act_embed"))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden, ("embed", "mlp"), name="encoder", **kw)(x)
    h = nn.gelu(constrain(h, ("act_batch", "act_mlp")))
    h = layer_norm(name="norm", eps=1e-6, **kw)(h)
    features = dense(self.hidden, ("mlp", "embed"), name="proj", **kw)(h)
    return dense(self.out_dim, ("embed", "classes"), name="head", **kw)(features), features


def synthetic_data(config) -> dict[str, np.ndarray]:
  """x ~ N(0, 1); y = tanh(x W1) W2 + noise, with W1, W2 fixed by config.data.seed."""
  d = config.data
  rng = np.random.default_rng(d.seed)
  x = rng.standard_normal((d.num_examples, config.model.in_dim)).astype(np.float32)
  w1 = rng.standard_normal((config.model.in_dim, 16)).astype(np.float32) / np.sqrt(config.model.in_dim)
  w2 = rng.standard_normal((16, config.model.out_dim)).astype(np.float32) / 4.0
  y = np.tanh(x @ w1) @ w2 + d.noise * rng.standard_normal((d.num_examples, config.model.out_dim))
  return {"x": x, "y": y.astype(np.float32)}


@dataclasses.dataclass
class ToyRecipe:
  config: Any

  @property
  def model(self) -> ToyMLP:
    return ToyMLP(hidden=self.config.model.hidden, out_dim=self.config.model.out_dim,
                  dtype=jnp.dtype(self.config.precision.compute_dtype),
                  param_dtype=jnp.dtype(self.config.precision.param_dtype))

  def init(self, rng, batch):
    return self.model.init(rng, jnp.zeros(batch["x"].shape, batch["x"].dtype))["params"]

  def loss(self, params, batch, rng, train=True):
    del rng, train  # no dropout in this model
    pred, _ = self.model.apply({"params": params}, batch["x"])
    err = pred.astype(jnp.float32) - batch["y"]
    mse = jnp.mean(jnp.square(err))
    return mse, {"mse": mse, "mae": jnp.mean(jnp.abs(err))}

  def example_batch(self, global_batch_size):
    m = self.config.model
    return {"x": jax.ShapeDtypeStruct((global_batch_size, m.in_dim), jnp.float32),
            "y": jax.ShapeDtypeStruct((global_batch_size, m.out_dim), jnp.float32)}

  def train_iterator(self, process_index, process_count):
    return in_memory.batches(synthetic_data(self.config), seed=self.config.seed,
                             batch_size=self.config.batch_size,
                             process_index=process_index, process_count=process_count)

  def predict_fns(self, params):
    return {"features": lambda x: self.model.apply({"params": params}, x)[1]}

  def export(self, params):
    del params
    return {}  # no image/text tower to put in a model directory


def make_recipe(config, mesh=None) -> ToyRecipe:
  del mesh  # nothing sharded explicitly
  return ToyRecipe(config)
