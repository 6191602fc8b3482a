"""Transformer building blocks shared by every pathjax model.

Every parameter carries logical axis names and every large activation is constrained to
logical axes, so the same modules run data parallel, FSDP or tensor parallel depending only
on the config's axis rules. Parameter names follow the published checkpoints' structure
closely enough that converters are one rename table per family.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

# timm and BERT initialise with a truncated normal of std 0.02; so do we (weights are usually loaded).
default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's defaults, for modules trained from scratch that mirror torch modules (PathFLIP's
# heads): nn.Linear's kaiming_uniform(a=sqrt(5)) is U(+-1 / sqrt(fan_in)), variance
# 1 / (3 fan_in); nn.MultiheadAttention's packed in_proj [3E, E] is xavier_uniform, variance
# 2 / (E + 3E) = 1 / (2 fan_in) per projection. (Biases stay zero, as MHA's own.) Stacked
# std-0.02 projections, by contrast, leave a from-scratch attention's logits ~1e-4 of their
# torch size: the attention starts uniform and barely learns.
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
torch_mha_in_proj_init = nn.initializers.variance_scaling(0.5, "fan_in", "uniform")

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


ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")

_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pathjax_target_platform", default=None)
_ATTENTION_PICKS: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "pathjax_attention_picks", default=None)


@contextlib.contextmanager
def record_attention_picks():
  """Yields a Counter {(implementation, query length, key length): traced calls} of every
  Attention call traced inside the context: which kernel a program really uses (a
  configured kernel falls back to xla where it cannot take the shapes). A layer scanned
  over depth is traced once, so counts are call sites, not layers."""
  picks = collections.Counter()
  token = _ATTENTION_PICKS.set(picks)
  try:
    yield picks
  finally:
    _ATTENTION_PICKS.reset(token)


@contextlib.contextmanager
def target_platform(platform: str | None):
  """Traces inside this context choose attention kernels for `platform` ("cpu", "gpu",
  "tpu"), not for the host's backend: `pathjax compile` traces on a CPU host for a TPU
  topology and must get the TPU kernel. None restores the default (jax.default_backend())."""
  token = _TARGET_PLATFORM.set(None if platform is None else _platform_family(platform))
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def _platform_family(platform: str) -> str:
  platform = platform.lower()
  if platform in ("cuda", "rocm", "gpu"):
    return "gpu"
  if platform not in ("cpu", "tpu"):
    raise ValueError(f"unknown platform {platform!r}; valid: cpu, gpu (cuda, rocm), tpu")
  return platform


def current_platform() -> str:
  """The platform attention is traced for: the innermost target_platform(), else the
  default backend."""
  return _TARGET_PLATFORM.get() or _platform_family(jax.default_backend())


def resolve_attention_impl(name: str, platform: str | None = None) -> str:
  """The implementation `name` means on `platform` (default: current_platform()).

  auto: einsum on CPU (heads-major, see Attention._einsum), splash (the Pallas TPU flash
  kernel) on TPU, cudnn (flash attention) on GPU. A kernel that cannot take a given call
  (decode steps, dropout, float32 on cuDNN, lengths that are not multiples of its block,
  arbitrary masks) runs that call with "xla" instead; see Attention._pick.
  """
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; valid: "
                     f"{', '.join(ATTENTION_IMPLS)}")
  platform = current_platform() if platform is None else _platform_family(platform)
  if name != "auto":
    return name
  return {"cpu": "einsum", "tpu": "splash", "gpu": "cudnn"}[platform]


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotary embedding in Hugging Face's rotate-half layout. x [b, len, heads, d]; cos and
  sin [b, len, d] (per example: positions differ under left padding)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = (t[:, :, None, :].astype(x.dtype) for t in (cos, sin))
  return x * cos + rotated * sin


def rms_norm(*, name: str, eps: float, dtype: Dtype, param_dtype: Dtype) -> nn.RMSNorm:
  """RMSNorm (Llama/Qwen): statistics in float32, learned scale only."""
  return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


CACHE_AXES = ("cache_batch", "cache_heads", "cache_len", "cache_kv")


def init_kv_cache(batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                  dtype: Dtype = jnp.float32) -> tuple[Array, Array]:
  """An empty (key, value) cache for one Attention layer: [batch, kv_heads, max_len, head_dim]."""
  shape = (batch, num_kv_heads, max_len, head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class Attention(nn.Module):
  """Multi-head attention: self-attention, or cross-attention when `kv` is given.

  `mask` is boolean, broadcastable to [batch, heads, q_len, kv_len], True = attend;
  `kv_mask` [batch, kv_len] marks real keys (padding False), the form the Pallas kernel can
  take. `num_kv_heads` < `num_heads` is grouped-query attention. `impl` picks the kernel
  (see resolve_attention_impl). `rope` = (cos, sin) [batch, len, head_dim] rotates queries
  and keys (decoder LLMs); `qk_norm` RMS-normalises each head's queries and keys first
  (Qwen3).

  KV cache: pass `cache` = (key, value) [batch, kv_heads, max_len, head_dim] (see
  init_kv_cache) and `cache_index` (int scalar, the slot of x's first token); the new
  keys/values are written at cache_index, the queries attend over the whole cache (the
  caller's mask/kv_mask marks the slots holding real tokens; `causal` hides later slots),
  and the call returns (out, new_cache). Prefill is a call with the prompt at index 0,
  decoding a call with one token at the next index.

  `value_input` gives the values their own input (torch nn.MultiheadAttention's separate
  key and value; default: `kv`). `return_weights=True` runs the einsum path and also
  returns the attention probabilities [batch, heads, q_len, kv_len] (before dropout), for
  attention maps such as PathFLIP's localization; it cannot be combined with a cache.
  """
  num_heads: int
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  out_bias: bool | None = None  # None: as use_bias (Qwen2 has qkv bias, no out bias)
  num_kv_heads: int | None = None
  qk_norm: bool = False
  norm_eps: float = 1e-6
  causal: bool = False
  impl: str = "auto"
  dropout_rate: float = 0.0
  deterministic: bool = True
  kernel_init: Callable = default_kernel_init       # query, key, value
  out_kernel_init: Callable = default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None, *,
               kv_mask: Array | None = None, rope: tuple[Array, Array] | None = None,
               cache: tuple[Array, Array] | None = None, cache_index: Array | int | None = None,
               value_input: Array | None = None, return_weights: bool = False):
    kv = x if kv is None else kv
    value_input = kv if value_input is None else value_input
    if return_weights and cache is not None:
      raise ValueError("return_weights cannot be combined with a KV cache")
    head_dim = self.head_dim or x.shape[-1] // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv_heads}")
    proj = functools.partial(dense, axes=("embed", "heads", "kv"), dtype=self.dtype,
                             param_dtype=self.param_dtype, use_bias=self.use_bias,
                             kernel_init=self.kernel_init)
    q = proj((self.num_heads, head_dim), name="query")(x)
    k = proj((kv_heads, head_dim), name="key")(kv)
    v = proj((kv_heads, head_dim), name="value")(value_input)
    qkv_axes = ("act_batch", "act_len", "act_heads", "act_kv")
    q, k, v = (constrain(t, qkv_axes) for t in (q, k, v))
    if self.qk_norm:
      norm = functools.partial(rms_norm, eps=self.norm_eps, dtype=self.dtype,
                               param_dtype=self.param_dtype)
      q, k = norm(name="query_norm")(q), norm(name="key_norm")(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)

    q_offset = 0
    new_cache = None
    if cache is not None:
      if cache_index is None:
        raise ValueError("a KV cache needs cache_index (the slot of the first new token)")
      ck, cv = cache
      index = jnp.asarray(cache_index, jnp.int32)
      zero = jnp.zeros((), jnp.int32)
      ck = jax.lax.dynamic_update_slice(ck, k.swapaxes(1, 2).astype(ck.dtype), (zero, zero, index, zero))
      cv = jax.lax.dynamic_update_slice(cv, v.swapaxes(1, 2).astype(cv.dtype), (zero, zero, index, zero))
      ck, cv = constrain(ck, CACHE_AXES), constrain(cv, CACHE_AXES)
      new_cache = (ck, cv)
      k, v = ck.swapaxes(1, 2).astype(q.dtype), cv.swapaxes(1, 2).astype(q.dtype)
      q_offset = index

    dropout = self.dropout_rate > 0.0 and not self.deterministic
    impl = "einsum" if return_weights else self._pick(q, k, mask, kv_mask, dropout, cache is not None)
    picks = _ATTENTION_PICKS.get()
    if picks is not None:
      picks[(impl, int(q.shape[1]), int(k.shape[1]))] += 1
    weights = None
    if impl == "splash":
      out = self._splash(q, k, v, kv_mask)
    else:
      mask = self._full_mask(mask, kv_mask, q.shape[1], k.shape[1], q_offset)
      if impl == "einsum":
        out, weights = self._einsum(q, k, v, mask, dropout)
      else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    out = constrain(out, qkv_axes)
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    out = dense(self.out_features or x.shape[-1], ("heads", "kv", "embed"), in_axes=(-2, -1),
                dtype=self.dtype, param_dtype=self.param_dtype, use_bias=out_bias,
                kernel_init=self.out_kernel_init, name="out")(out)
    if return_weights:
      return out, weights
    return out if cache is None else (out, new_cache)

  def _pick(self, q, k, mask, kv_mask, dropout: bool, cached: bool) -> str:
    """The implementation for this call: the configured one, or xla where a kernel cannot
    take the call (static facts only: shapes, dtypes, which masks are given)."""
    impl = resolve_attention_impl(self.impl)
    if dropout:
      return "einsum"  # the only path with attention-probability dropout
    if impl == "splash":
      blocks = 128
      fits = (not cached and mask is None and q.shape[1] % blocks == 0
              and k.shape[1] % blocks == 0 and (not self.causal or q.shape[1] == k.shape[1]))
      return "splash" if fits else "xla"
    if impl == "cudnn":
      fits = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
      return "cudnn" if fits else "xla"
    return impl

  def _full_mask(self, mask, kv_mask, q_len: int, kv_len: int, q_offset) -> Array | None:
    """mask & key padding & causality (query i sits at slot q_offset + i), as one boolean
    mask broadcastable to [batch, heads, q_len, kv_len]."""
    if kv_mask is not None:
      pad = kv_mask[:, None, None, :].astype(bool)
      mask = pad if mask is None else jnp.logical_and(mask, pad)
    if self.causal:
      q_pos = jnp.arange(q_len)[:, None] + q_offset
      causal = q_pos >= jnp.arange(kv_len)[None, :]
      mask = causal if mask is None else jnp.logical_and(mask, causal)
    return mask

  def _einsum(self, q, k, v, mask, dropout: bool):
    """Softmax attention in [batch, heads, len, head_dim] layout.

    Heads-major operands make the two batched matmuls plain [b*h] batches: XLA's CPU
    backend ran jax.nn.dot_product_attention's [batch, len, heads] layout 1.4x slower
    (fwd+bwd at ViT-B/16 shapes, an A/B in one process; the whole ViT-B/16 gained about 8%
    in `pathjax bench encoders`). Grouped-query heads are a [kv_heads, group] split of the
    query heads, so keys and values are never repeated.
    """
    b, q_len, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q * jnp.asarray(d ** -0.5, q.dtype)
    q = q.reshape(b, q_len, kv_heads, group, d).transpose(0, 2, 3, 1, 4)  # [b, K, G, q, d]
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)                            # [b, K, kv, d]
    scores = jnp.einsum("bkgqd,bkjd->bkgqj", q, k)
    if mask is not None:
      mask = jnp.asarray(mask, bool)
      mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
      if mask.shape[1] == 1:
        mask = mask[:, :, None]
      else:
        mask = mask.reshape(mask.shape[0], kv_heads, group, *mask.shape[2:])
      scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    weights = probs.reshape(b, heads, q_len, -1)                        # [b, h, q, kv]
    if dropout:
      probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
    out = jnp.einsum("bkgqj,bkjd->bkgqd", probs, v)
    return out.reshape(b, heads, q_len, d).swapaxes(1, 2), weights      # [b, len, h, d]

  def _splash(self, q, k, v, kv_mask):
    """The Pallas TPU splash (flash) kernel, one example at a time under vmap; key padding
    becomes segment ids (padding keys are segment 0, real keys and all queries segment 1).
    Under a mesh (jax.set_mesh) it runs per shard through shard_map, split as the logical
    rules split the activations. Runs in Pallas' interpreter off TPU (tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    b, q_len, heads, d = q.shape
    group = heads // k.shape[2]
    if group > 1:
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    q = q * jnp.asarray(d ** -0.5, q.dtype)
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))                   # [b, h, len, d]
    if kv_mask is None:
      kv_mask = jnp.ones((b, k.shape[2]), bool)
    q_seg = jnp.ones((b, q_len), jnp.int32)
    kv_seg = kv_mask.astype(jnp.int32)
    interpret = current_platform() != "tpu"  # Pallas interpreter when not tracing for a TPU

    def attend(q, k, v, q_seg, kv_seg):
      local_heads = q.shape[1]
      one = (splash.CausalMask((q.shape[2], k.shape[2])) if self.causal
             else splash.FullMask((q.shape[2], k.shape[2])))
      kernel = splash.make_splash_mha(splash.MultiHeadMask([one] * local_heads),
                                      head_shards=1, q_seq_shards=1, interpret=interpret)
      return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_seg, kv_seg))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      out = attend(q, k, v, q_seg, kv_seg)
    else:
      spec = nn.logical_to_mesh_axes(("act_batch", "act_heads", None, None))
      seg_spec = jax.sharding.PartitionSpec(spec[0], None)
      out = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                          out_specs=spec, check_vma=False)(q, k, v, q_seg, kv_seg)
    return out.swapaxes(1, 2)                                          # [b, len, h, d]


class Mlp(nn.Module):
  """Transformer MLP: fc1 -> activation -> fc2, or SwiGLU with separate gate/up kernels.
  `dropout_rate` drops the hidden activations (torch nn.TransformerEncoderLayer's inner
  dropout) unless `deterministic`."""
  hidden_dim: int
  activation: str = "gelu"
  out_features: int | None = None
  use_bias: bool = True
  dropout_rate: float = 0.0
  deterministic: bool = True
  kernel_init: Callable = default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fc = functools.partial(dense, self.hidden_dim, ("embed", "mlp"), use_bias=self.use_bias,
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=self.kernel_init)
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
    if self.dropout_rate > 0.0:
      h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    return dense(self.out_features or x.shape[-1], ("mlp", "embed"), dtype=self.dtype,
                 param_dtype=self.param_dtype, use_bias=self.use_bias,
                 kernel_init=self.kernel_init, name="fc2")(h)


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
  attention: str = "auto"  # Attention.impl
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
                  impl=self.attention, dropout_rate=self.dropout_rate, deterministic=self.deterministic,
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
