"""Transformer building blocks shared by every pathjax model.

Every parameter carries logical axis names and every large activation is constrained to
logical axes, so the same modules run data parallel, FSDP or tensor parallel depending only
on the config's axis rules. Parameter names follow the published checkpoints' structure
closely enough that converters are one rename table per family.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

# timm and BERT initialise with a truncated normal of std 0.02; so do we (weights are usually loaded).
default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str):
  """The jax.checkpoint policy named `name` ("none" means no rematerialisation)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; valid: none, {', '.join(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


class _KernelPartitioned(nn.LogicallyPartitioned):
  """LogicallyPartitioned that skips the constraint on DenseGeneral's flat init kernel.

  nn.DenseGeneral initialises a multi-axis kernel flat ([prod(in), prod(out)]) and unboxes
  it before reshaping; under a mesh (jax.set_mesh) flax then constrains the rank-2 value
  with the rank-3 names and raises. The flat value needs no constraint.
  """

  def unbox(self, apply_constraint=True):
    if apply_constraint and jnp.ndim(self.value) != len(self.names):
      return self.value
    return super().unbox(apply_constraint)


def _partitioned(init, names: tuple[str | None, ...]):
  def wrapped(*args, **kwargs):
    return _KernelPartitioned(init(*args, **kwargs), names, mesh=None)
  return wrapped


def dense(features: int | tuple[int, ...], axes: tuple[str | None, ...], *, name: str,
          dtype: Dtype, param_dtype: Dtype, use_bias: bool = True, in_axes: int | tuple[int, ...] = -1,
          kernel_init=default_kernel_init) -> nn.DenseGeneral:
  """DenseGeneral whose kernel axes are `axes` (input axes then output axes)."""
  out_rank = len(features) if isinstance(features, tuple) else 1
  return nn.DenseGeneral(
      features, axis=in_axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(kernel_init, axes),
      bias_init=_partitioned(nn.initializers.zeros, axes[-out_rank:]),
      name=name)


def layer_norm(*, name: str, eps: float, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def gelu_erf(x: Array) -> Array:
  """Exact (erf) GELU, torch nn.GELU's default. Written with a multiply by 1/sqrt(2):
  jax.nn.gelu(approximate=False) divides, which made a ViT-B MLP's fwd+bwd 15% slower on
  XLA's CPU backend (an A/B of the two in one process; `pathjax bench encoders` prints the
  whole model's rate); the results agree to float32 rounding."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_erf,                                           # torch nn.GELU default (erf)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),      # OpenAI CLIP
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class Attention(nn.Module):
  """Multi-head attention: self-attention, or cross-attention when `kv` is given.

  `mask` is boolean, broadcastable to [batch, heads, q_len, kv_len], True = attend.
  """
  num_heads: int
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  causal: bool = False
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None) -> Array:
    kv = x if kv is None else kv
    head_dim = self.head_dim or x.shape[-1] // self.num_heads
    proj = functools.partial(dense, (self.num_heads, head_dim), ("embed", "heads", "kv"),
                             dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    q = proj(name="query")(x)
    k = proj(name="key")(kv)
    v = proj(name="value")(kv)
    qkv_axes = ("act_batch", "act_len", "act_heads", "act_kv")
    q, k, v = (constrain(t, qkv_axes) for t in (q, k, v))
    dropout = self.dropout_rate > 0.0 and not self.deterministic
    if dropout or jax.default_backend() == "cpu":
      out = self._attend(q, k, v, mask, dropout)
    else:
      # On GPU jax picks cuDNN flash attention where shapes and dtypes allow; XLA elsewhere.
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
    out = constrain(out, qkv_axes)
    return dense(self.out_features or x.shape[-1], ("heads", "kv", "embed"), in_axes=(-2, -1),
                 dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias,
                 name="out")(out)

  def _attend(self, q, k, v, mask, dropout: bool):
    """Softmax attention in [batch, heads, len, head_dim] layout.

    Heads-major operands make the two batched matmuls plain [b*h] batches: XLA's CPU
    backend ran jax.nn.dot_product_attention's [batch, len, heads] layout 1.4x slower
    (fwd+bwd at ViT-B/16 shapes, an A/B in one process; the whole ViT-B/16 gained about 8%
    in `pathjax bench encoders`).
    """
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))                # [b, h, len, d]
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    if self.causal:
      causal = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
      mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    if dropout:
      probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v).swapaxes(1, 2)   # [b, len, h, d]


class Mlp(nn.Module):
  """Transformer MLP: fc1 -> activation -> fc2, or SwiGLU with separate gate/up kernels."""
  hidden_dim: int
  activation: str = "gelu"
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fc = functools.partial(dense, self.hidden_dim, ("embed", "mlp"),
                           dtype=self.dtype, param_dtype=self.param_dtype)
    if self.activation == "swiglu":
      # Separate gate and up kernels (not one packed kernel) so tensor parallelism over "mlp"
      # keeps each gate next to its up column.
      h = jax.nn.silu(fc(name="fc1_gate")(x)) * fc(name="fc1_up")(x)
    else:
      if self.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {self.activation!r}; valid: swiglu, "
                         f"{', '.join(ACTIVATIONS)}")
      h = ACTIVATIONS[self.activation](fc(name="fc1")(x))
    h = constrain(h, ("act_batch", "act_len", "act_mlp"))
    return dense(self.out_features or x.shape[-1], ("mlp", "embed"), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc2")(h)


class LayerScale(nn.Module):
  init_value: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("gamma", nn.with_logical_partitioning(
        nn.initializers.constant(self.init_value), ("norm",)), (x.shape[-1],), self.param_dtype)
    return x * gamma.astype(x.dtype)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block (ViT, CLIP text, fusion encoder)."""
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_scale_init: float | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  causal: bool = False
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    norm = functools.partial(layer_norm, eps=self.norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    y = Attention(num_heads=self.num_heads, use_bias=self.qkv_bias, causal=self.causal,
                  dropout_rate=self.dropout_rate, deterministic=self.deterministic,
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  name="attn")(norm(name="norm1")(x), mask=mask)
    if self.layer_scale_init is not None:
      y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls1")(y)
    x = x + drop(y)
    y = Mlp(self.mlp_dim, self.activation, dtype=self.dtype, param_dtype=self.param_dtype,
            name="mlp")(norm(name="norm2")(x))
    if self.layer_scale_init is not None:
      y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls2")(y)
    x = x + drop(y)
    return constrain(x, ("act_batch", "act_len", "act_embed"))


class _ScanBlock(EncoderBlock):
  """EncoderBlock with nn.scan's (carry, output) signature."""

  def __call__(self, x, mask=None):
    return super().__call__(x, mask), None


class Encoder(nn.Module):
  """A stack of `depth` EncoderBlocks, scanned over layers and rematerialised per config.

  With `scan`, parameters are stacked on a leading "layers" axis (one compiled block, fast
  compiles at depth 24-40); without it each layer is `blocks_{i}`. Converters handle both.
  """
  depth: int
  block: dict[str, Any]  # EncoderBlock fields
  scan: bool = True
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    block_cls = _ScanBlock if self.scan else EncoderBlock
    if self.remat != "none":
      block_cls = nn.remat(block_cls, policy=remat_policy(self.remat), prevent_cse=not self.scan)
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(**self.block, name="blocks")(x, mask)
      return x
    for i in range(self.depth):
      x = block_cls(**self.block, name=f"blocks_{i}")(x, mask)
    return x
