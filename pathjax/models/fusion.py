"""Multimodal fusion encoder: query tokens attend jointly with context tokens.

MR-PLIP's E_mm fuses a patch's visual feature with its top keyword embeddings; PathFLIP's
text-conditioned region embeddings and ITM heads are the same computation with other
inputs. Both sides are projected to the fusion width (Linear + LayerNorm, as the mPLUG-style
public code does for visual features), concatenated, and passed through pre-LN blocks with
key masking; the outputs at the query positions are returned.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pathjax.models import layers


class FusionEncoder(nn.Module):
  width: int = 768
  depth: int = 6
  num_heads: int = 12
  mlp_dim: int = 3072
  norm_eps: float = 1e-6
  scan: bool = True
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _project(self, x, name):
    x = layers.dense(self.width, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name=f"{name}_proj")(x)
    return layers.layer_norm(name=f"{name}_norm", eps=self.norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)(x)

  @nn.compact
  def __call__(self, queries: jax.Array, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """queries [N, Q, Dq], context [N, S, Dc], context_mask [N, S] bool -> [N, Q, width]."""
    n, q = queries.shape[:2]
    x = jnp.concatenate([self._project(queries, "query"), self._project(context, "context")], 1)
    mask = None
    if context_mask is not None:
      keys = jnp.concatenate([jnp.ones((n, q), bool), context_mask.astype(bool)], axis=1)
      mask = keys[:, None, None, :]
    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, norm_eps=self.norm_eps,
                 dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Encoder(self.depth, block, scan=self.scan, remat=self.remat, name="encoder")(x, mask)
    x = layers.layer_norm(name="final_norm", eps=self.norm_eps, dtype=self.dtype,
                          param_dtype=self.param_dtype)(x)
    return x[:, :q]
