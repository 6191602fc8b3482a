"""Small heads: projections to a shared space, SimSiam projector and predictor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pathjax.models import layers


class MlpHead(nn.Module):
  """Linear layers with LayerNorm + ReLU between them (and optionally after the last).

  SimSiam's projector is 3 layers with a norm after the last; its predictor is a 2-layer
  bottleneck without one. LayerNorm replaces BatchNorm so the heads need no cross-device
  batch statistics and behave the same at any per-device batch.
  """
  features: tuple[int, ...]
  final_norm: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = layers.dense(f, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"fc{i}")(x)
      last = i == len(self.features) - 1
      if not last or self.final_norm:
        x = layers.layer_norm(name=f"norm{i}", eps=1e-6, dtype=self.dtype,
                              param_dtype=self.param_dtype)(x)
      if not last:
        x = jax.nn.relu(x)
    return x

