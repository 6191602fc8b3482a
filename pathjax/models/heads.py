"""Small heads: projections to a shared space, SimSiam projector and predictor, and the
collapse monitors that watch every embedding a loss aligns."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pathjax.models import layers

NORMS = ("batch", "layer")


class MlpHead(nn.Module):
  """Linear layers with a norm + ReLU between them (and optionally a norm after the last).

  SimSiam's projector is 3 layers with BatchNorm after every layer (the last without ReLU);
  its predictor is a 2-layer bottleneck with BatchNorm in the hidden layer only. `norm =
  'batch'` (default) normalises with the statistics of the current batch in every forward
  pass (the heads are used only in training; no running averages are kept): the mean over
  the batch axis of a batch-sharded array is the global-batch statistic under jit, so the
  result does not depend on the device count. `mask` [N] leaves padded rows out of the
  statistics. `norm = 'layer'` is the earlier LayerNorm head, kept as an ablation: on the
  demo it collapsed (the monitors below catch it).
  """
  features: tuple[int, ...]
  final_norm: bool = False
  norm: str = "batch"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _norm(self, x, mask, name):
    if self.norm == "layer":
      return layers.layer_norm(name=name, eps=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    if self.norm != "batch":
      raise ValueError(f"unknown head norm {self.norm!r}; valid: {', '.join(NORMS)}")
    # Statistics in float32 (flax computes them in at least float32); the batch_stats
    # collection it writes is discarded by the caller (apply with mutable=["batch_stats"]).
    return nn.BatchNorm(
        use_running_average=False, momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
        param_dtype=self.param_dtype, axis_name=None, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )(x, mask=None if mask is None else mask[:, None])

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [N, D], mask [N] bool (rows that enter the batch statistics) -> [N, features[-1]]."""
    for i, f in enumerate(self.features):
      x = layers.dense(f, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"fc{i}")(x)
      last = i == len(self.features) - 1
      if not last or self.final_norm:
        x = self._norm(x, mask, f"norm{i}")
      if not last:
        x = jax.nn.relu(x)
    return x


def _masked(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(x normalised along the last axis with masked rows zeroed, mask as float [...])."""
  x = x.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  m = jnp.ones(x.shape[:-1], jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)
  return x * m[..., None], m


def spread(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Collapse monitor: mean over dimensions of the std across samples of x / |x|, times sqrt(d).

  x [..., D] (all leading axes are samples), mask [...] selects real rows. About 1 for
  embeddings spread over the sphere, 0 when every sample maps to the same direction
  (SimSiam, arXiv 2011.10566, section 4.1 watches the same quantity).
  """
  x, m = _masked(x, mask)
  d = x.shape[-1]
  x, m = x.reshape(-1, d), m.reshape(-1)
  n = jnp.maximum(m.sum(), 1.0)
  mean = x.sum(0) / n
  # Two passes: E[x^2] - E[x]^2 cancels catastrophically near collapse, where it matters.
  var = (jnp.square(x - mean) * m[:, None]).sum(0) / n
  return jax.lax.stop_gradient(jnp.mean(jnp.sqrt(var)) * jnp.sqrt(d))


def unrelated_cosine(a: jax.Array, b: jax.Array, a_mask: jax.Array | None = None,
                     b_mask: jax.Array | None = None) -> jax.Array:
  """Collapse monitor: mean cosine between rows of a and b that belong to *different* groups.

  a [G, P, D], b [G, K, D]: G groups (bags); pairs inside a group (a patch and its own
  caption or keywords, a parent and its child) are related and left out. About 0 for
  healthy embeddings, 1 when everything maps to one direction. Computed from per-group
  sums (O(G (P + K) D), no [N, N] matrix).
  """
  a, ma = _masked(a, a_mask)
  b, mb = _masked(b, b_mask)
  sa, sb = a.sum(1), b.sum(1)                                  # [G, D]
  total = jnp.dot(sa.sum(0), sb.sum(0)) - jnp.sum(sa * sb)
  na, nb = ma.sum(1), mb.sum(1)
  pairs = na.sum() * nb.sum() - jnp.sum(na * nb)
  return jax.lax.stop_gradient(total / jnp.maximum(pairs, 1.0))
