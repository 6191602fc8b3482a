"""The projector from a visual encoder's token space into an LLM's embedding space (LLaVA):
a Linear layer or a 2-layer MLP with GELU (LLaVA-1.5's mlp2x_gelu)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pathjax.models import layers

KINDS = ("linear", "mlp2")


class Projector(nn.Module):
  """[..., in_dim] -> [..., out_dim]; kind "linear" (fc1 only) or "mlp2" (fc1, GELU, fc2)."""
  in_dim: int = 256
  out_dim: int = 4096
  kind: str = "mlp2"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind not in KINDS:
      raise ValueError(f"projector kind {self.kind!r}; valid: {', '.join(KINDS)}")
    if x.shape[-1] != self.in_dim:
      raise ValueError(f"visual tokens have width {x.shape[-1]}; the projector expects {self.in_dim}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # The visual width is small and unsharded; the LLM width is sharded like the LLM's.
    x = layers.dense(self.out_dim, (None, "embed" if self.kind == "linear" else "mlp"),
                     name="fc1", **kw)(x)
    if self.kind == "mlp2":
      x = layers.gelu_erf(x)
      x = layers.dense(self.out_dim, ("mlp", "embed"), name="fc2", **kw)(x)
    return x


def config_dict(module: Projector) -> dict[str, Any]:
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name", "dtype", "param_dtype")}


def example_inputs(module: Projector):
  return jnp.zeros((1, 1, module.in_dim), jnp.float32)
