"""BLIP-2 Q-Former over whole-slide patch features (PathAlign, specs/qformer.md).

A post-LN BERT whose first `num_queries` positions are learned query tokens. Queries and
text share the self-attention (masked per pass); only query rows cross-attend to the slide's
patch features (every `cross_attention_frequency` layers) and query rows have their own FFN.
The frozen patch features pass through `ln_vision`, an optional projection, and 2D sin-cos
encodings of their integer grid coordinates before the cross-attention K/V.

The cross-attention K/V of a slide's (up to 10,240) patches dominate the cost, so they are
computed ONCE per step by `encode_patches` and passed to every pass. A stage-1 recipe:

    m = QFormer(...)
    apply = lambda method, *a, **kw: m.apply({"params": params}, *a, method=method,
                                             rngs={"dropout": rng}, **kw)
    feats, coords, pmask = qformer.sample_patches(rng, batch["features"], batch["coords"],
                                                  batch["patch_mask"], max_patches=10_240)
    kv = apply(QFormer.encode_patches, feats, coords, pmask)           # once per step
    ids, tmask = batch["text_ids"], batch["text_mask"]                 # [CLS] text [SEP] pad
    # ITC
    img = apply(QFormer.image_embeds, apply(QFormer.query_pass, kv))   # [B, Q, E], unit norm
    txt = apply(QFormer.text_embeds, apply(QFormer.text_pass, ids, tmask))  # [B, E]
    temp = apply(QFormer.temperature)
    same = losses_blip.same_text_mask(ids, tmask)                       # identical reports
    sim = losses_blip.itc_similarity(img, txt)                          # [B, B], max over queries
    l_itc, m1 = losses_blip.itc_loss(sim, temp, positive_mask=same)
    # ITM: the same K/V; the negative images' K/V gathered with take_kv
    neg = losses_blip.itm_negatives(sim / temp, rng, positive_mask=same)
    itm = lambda kv_, i, t: apply(QFormer.itm_logits, apply(QFormer.multimodal_pass, kv_, i, t))
    l_itm, m2 = losses_blip.itm_loss(
        itm(kv, ids, tmask),                                            # positives
        itm(take_kv(kv, neg.image_for_text), ids, tmask),               # negative image
        itm(kv, ids[neg.text_for_image], tmask[neg.text_for_image]),    # negative text
        negatives=neg)
    # ITG: [DEC] replaces [CLS]; queries see queries, text sees queries + earlier text
    dec = ids.at[:, 0].set(dec_id)
    logits = apply(QFormer.lm_logits, apply(QFormer.multimodal_pass, kv, dec, tmask, causal=True))
    l_itg, m3 = losses_blip.itg_loss(logits, dec, tmask)
    loss = l_itc + l_itm + l_itg

Under pjit the batch is one global array, so "candidates gathered over all devices" is the
plain formula. Note `take_kv` with indices from anywhere in the global batch makes XLA gather
other devices' K/V (2 * cross-attention layers * N * width values per slide); gathering the
raw features [N, D] and calling `encode_patches` on them moves 2 * cross layers * width / D
times fewer bytes (24x for BERT-base over ViT-S features) at the price of one more K/V
computation: a recipe choice. Give each pass its own dropout rng (`jax.random.fold_in`).

Parameter tree (BERT names in brackets; `pathjax.convert.bert` maps them):

    query_tokens [Q, W]                     learned queries, N(0, 0.02), no position embedding
    temp []                                 temperature (0.07), clipped to [temp_min, temp_max]
    embeddings/word_embeddings/embedding    [bert.embeddings.word_embeddings] (+ [DEC] row)
    embeddings/position_embeddings [P, W]   [bert.embeddings.position_embeddings]
    embeddings/norm                         [bert.embeddings.LayerNorm]
    ln_vision                               LayerNorm over the patch features
    patch_proj (if vision_width)            Linear(D -> vision_width)
    layers_{i}/attention/{query,key,value,out}   [encoder.layer.i.attention.self.*, .output.dense]
    layers_{i}/attention_norm               [encoder.layer.i.attention.output.LayerNorm]
    layers_{i}/crossattention/{query,out}   (layers with i % cross_attention_frequency == 0)
    layers_{i}/crossattention_norm
    cross_kv_{i}/{key,value}                the cross-attention K/V of layer i
    layers_{i}/mlp/{fc1,fc2}, mlp_norm      [intermediate.dense, output.dense, output.LayerNorm]
    layers_{i}/mlp_query/..., mlp_query_norm  query FFN (initialised as a copy of the text FFN)
    vision_proj, text_proj [W, E], itm_head [W, 2]
    lm_head/transform, lm_head/norm, lm_head/bias   [cls.predictions.*]; decoder tied to the
                                            word embeddings (BertLMHeadModel)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pathjax.losses import l2_normalize
from pathjax.models import layers

Array = jax.Array
PatchKV = dict  # {"kv": ((k, v) per cross-attention layer, [B, N, heads, head_dim]), "mask": [B, N]}

_ACT = ("act_batch", "act_len", "act_embed")
_QKV = ("act_batch", "act_len", "act_heads", "act_kv")


# ------------------------------------------------------------------------------------------
# Patch sampling and positions
# ------------------------------------------------------------------------------------------


def sample_patches(rng: Array, features: Array, coords: Array, mask: Array | None, *,
                   max_patches: int) -> tuple[Array, Array, Array]:
  """At most `max_patches` real patches per slide, uniformly without replacement.

  features [B, N, D], coords [B, N, 2] integer grid (x, y), mask [B, N] (True = a real
  patch; None = all real). Returns (features, coords, mask) with M = min(N, max_patches)
  patches: a slide with more than M real patches gets a uniform random M-subset (top-M of
  i.i.d. uniform keys, one independent draw per slide); one with fewer keeps all of them and
  the rest of its M slots are masked out. Jittable; the order of the chosen patches carries
  no meaning (cross-attention is permutation invariant, positions travel in `coords`).
  """
  b, n = features.shape[:2]
  mask = jnp.ones((b, n), bool) if mask is None else jnp.asarray(mask).astype(bool)
  if max_patches < 1:
    raise ValueError(f"max_patches must be >= 1, got {max_patches}")
  if n <= max_patches:
    return features, coords, mask
  keys = jax.random.uniform(rng, (b, n))
  keys = jnp.where(mask, keys, -1.0)                       # real patches always rank first
  _, idx = jax.lax.top_k(keys, max_patches)                # [B, M]
  take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
  return take(features), take(coords), jnp.take_along_axis(mask, idx, axis=1)


def sincos_2d(coords: Array, dim: int, temperature: float = 10_000.0) -> Array:
  """2D sin-cos encodings of grid coordinates [..., 2] (x, y) -> [..., dim] float32.

  First half encodes x, second half y (MAE's layout); each half is
  [sin(p * w_k), cos(p * w_k)] with w_k = temperature ** (-k / (dim / 4)), k < dim / 4.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos encodings need a width divisible by 4, got {dim}")
  quarter = dim // 4
  omega = 1.0 / temperature ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
  c = jnp.asarray(coords).astype(jnp.float32)
  parts = []
  for axis in (0, 1):
    angle = c[..., axis, None] * omega
    parts += [jnp.sin(angle), jnp.cos(angle)]
  return jnp.concatenate(parts, axis=-1)


def take_kv(kv: PatchKV, index: Array) -> PatchKV:
  """The K/V (and key mask) of slides `index` [M]: pairs a text with another slide (ITM)."""
  return jax.tree.map(lambda a: jnp.take(a, index, axis=0), kv)


# ------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------


def self_attention_mask(num_queries: int, text_mask: Array | None, *, causal: bool,
                        batch: int | None = None) -> Array | None:
  """Boolean [B, 1, L, L] mask over [queries; text] (True = attend), L = Q + T.

  Bidirectional (ITM, and text-only passes): every row sees all queries and the real text
  tokens. Causal (UniLM, ITG): query rows see queries only; text row i sees all queries and
  text tokens j <= i that are real (LAVIS' `get_extended_attention_mask(has_query=True)`).
  Query-only passes need no mask (None).
  """
  if text_mask is None:
    return None
  text_mask = jnp.asarray(text_mask).astype(bool)
  b, t = text_mask.shape
  keys = jnp.concatenate([jnp.ones((b, num_queries), bool), text_mask], axis=1)   # [B, L]
  if not causal:
    return keys[:, None, None, :]
  length = num_queries + t
  row = jnp.arange(length)[:, None]
  col = jnp.arange(length)[None, :]
  allowed = jnp.where(row < num_queries, col < num_queries,
                      (col < num_queries) | (col <= row))                          # [L, L]
  return allowed[None, None] & keys[:, None, None, :]


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------


class CrossKV(nn.Module):
  """Keys and values of one cross-attention layer over the patch features."""
  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Array) -> tuple[Array, Array]:
    proj = functools.partial(layers.dense, (self.num_heads, self.head_dim),
                             ("embed", "heads", "kv"), dtype=self.dtype,
                             param_dtype=self.param_dtype)
    k = layers.constrain(proj(name="key")(feats), _QKV)
    v = layers.constrain(proj(name="value")(feats), _QKV)
    return k, v


class CrossAttention(nn.Module):
  """Query rows attend to precomputed patch K/V ([B, N, heads, head_dim], from CrossKV).

  The softmax attention itself is `jax.nn.dot_product_attention` (XLA; cuDNN where jax
  picks it), the function `layers.Attention` uses off CPU. `layers.Attention` projects its
  own K/V from `kv` on every call, which would redo the dominant cost per pass. No dropout
  on the attention probabilities here (hidden-state dropout still applies).
  """
  width: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, k: Array, v: Array, mask: Array) -> Array:
    head_dim = self.width // self.num_heads
    q = layers.dense((self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="query")(x)
    q = layers.constrain(q, _QKV)
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
    if self.is_mutable_collection("intermediates"):
      # Attention maps on request (apply(..., mutable=["intermediates"])): the query->patch
      # weights [B, heads, Q, N] PathFLIP's localization paints; not computed otherwise.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
      logits = jnp.where(mask, logits / jnp.sqrt(jnp.float32(head_dim)), -jnp.inf)
      self.sow("intermediates", "attention_weights", jax.nn.softmax(logits, axis=-1))
    out = layers.constrain(out, _QKV)
    return layers.dense(self.width, ("heads", "kv", "embed"), in_axes=(-2, -1), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out")(out)


class QFormerLayer(nn.Module):
  """One post-LN BERT layer with optional query cross-attention and a query FFN."""
  width: int
  num_heads: int
  mlp_dim: int
  has_cross: bool
  activation: str = "gelu"
  norm_eps: float = 1e-12
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, num_queries: int,
               kv: tuple[Array, Array] | None = None, kv_mask: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(layers.layer_norm, eps=self.norm_eps, **kw)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)

    def ffn(y, name):
      h = layers.Mlp(self.mlp_dim, self.activation, name=name, **kw)(y)
      return norm(name=f"{name}_norm")(y + drop(h))

    h = layers.Attention(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
                         deterministic=self.deterministic, name="attention", **kw)(x, mask=mask)
    x = norm(name="attention_norm")(x + drop(h))
    if num_queries == 0:
      return layers.constrain(ffn(x, "mlp"), _ACT)
    q, t = x[:, :num_queries], x[:, num_queries:]
    if self.has_cross:
      if kv is None:
        raise ValueError("query rows need the patch K/V (QFormer.encode_patches)")
      h = CrossAttention(self.width, self.num_heads, name="crossattention", **kw)(q, *kv, kv_mask)
      q = norm(name="crossattention_norm")(q + drop(h))
    q = ffn(q, "mlp_query")
    if t.shape[1]:
      q = jnp.concatenate([q, ffn(t, "mlp")], axis=1)
    return layers.constrain(q, _ACT)


class Embeddings(nn.Module):
  """BERT word + absolute position embeddings (no token types), then LayerNorm + dropout
  over [queries; text]."""
  vocab_size: int
  width: int
  max_position: int
  norm_eps: float = 1e-12
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.word_embeddings = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    self.position_embeddings = self.param(
        "position_embeddings", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            ("pos", "embed")),
        (self.max_position, self.width), self.param_dtype)
    self.norm = layers.layer_norm(name=None, eps=self.norm_eps, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, queries: Array | None, ids: Array | None) -> Array:
    parts = []
    if queries is not None:
      parts.append(queries.astype(self.dtype))
    if ids is not None:
      t = ids.shape[1]
      if t > self.max_position:
        raise ValueError(f"{t} text tokens exceed the {self.max_position} position embeddings")
      parts.append(self.word_embeddings(ids) + self.position_embeddings[:t].astype(self.dtype))
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    x = self.dropout(self.norm(x), deterministic=self.deterministic)
    return layers.constrain(x, _ACT)

  def attend(self, x: Array) -> Array:
    return self.word_embeddings.attend(x)


class LMHead(nn.Module):
  """BERT's prediction head: dense -> activation -> LayerNorm -> tied decoder + bias."""
  width: int
  vocab_size: int
  activation: str = "gelu"
  norm_eps: float = 1e-12
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, decoder) -> Array:
    x = layers.dense(self.width, ("embed", "mlp"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="transform")(x)
    x = layers.ACTIVATIONS[self.activation](x)
    x = layers.layer_norm(name="norm", eps=self.norm_eps, dtype=self.dtype,
                          param_dtype=self.param_dtype)(x)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (self.vocab_size,), self.param_dtype)
    logits = decoder(x) + bias.astype(x.dtype)
    return layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))


class QFormer(nn.Module):
  """BLIP-2 Q-Former (see the module docstring for the passes and the parameter tree).

  Passes (call with `module.apply(variables, ..., method=QFormer.<pass>)`):
    encode_patches(features [B,N,D], coords [B,N,2] | None, mask [B,N] | None) -> PatchKV
    query_pass(kv) -> [B, Q, W]                          queries only (ITC image side)
    text_pass(ids [B,T], mask [B,T], causal=False) -> [B, T, W]   text only (ITC text side)
    multimodal_pass(kv, ids, mask, causal=False) -> [B, Q+T, W]   ITM (bidirectional) or
                                                          ITG (causal=True: UniLM mask)
  Heads: image_embeds, text_embeds (unit-norm projections), itm_logits, lm_logits,
  temperature.
  """
  vocab_size: int = 30523              # bert-base-uncased + [DEC]
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position: int = 512
  num_queries: int = 32
  encoder_width: int = 384             # patch feature dim D (ViT-S)
  vision_width: int = 0                # > 0: Linear(D -> vision_width) before positions and K/V
  cross_attention_frequency: int = 2
  embed_dim: int = 256                 # vision_proj / text_proj
  activation: str = "gelu"
  norm_eps: float = 1e-12
  vision_norm_eps: float = 1e-5        # ln_vision (torch LayerNorm default, as LAVIS)
  pos_encoding: bool = True            # 2D sin-cos of the grid coordinates
  pos_temperature: float = 10_000.0
  temp_init: float = 0.07
  temp_min: float = 0.001              # BLIP/ALBEF clamp the temperature to [0.001, 0.5]
  temp_max: float = 0.5
  dropout_rate: float = 0.0            # BERT: 0.1 hidden and attention
  attention_dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
    if self.cross_attention_frequency < 1:
      raise ValueError("cross_attention_frequency must be >= 1")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.query_tokens = self.param(
        "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                     (None, "embed")),
        (self.num_queries, self.width), self.param_dtype)
    self.temp = self.param("temp", nn.with_logical_partitioning(
        nn.initializers.constant(self.temp_init), ()), (), self.param_dtype)
    self.embeddings = Embeddings(self.vocab_size, self.width, self.max_position, self.norm_eps,
                                 self.dropout_rate, self.deterministic, **kw)
    self.ln_vision = layers.layer_norm(name=None, eps=self.vision_norm_eps, **kw)
    if self.vision_width:
      self.patch_proj = layers.dense(self.vision_width, (None, "embed"), name=None, **kw)
    self.layers = [
        QFormerLayer(self.width, self.num_heads, self.mlp_dim, self._has_cross(i),
                     self.activation, self.norm_eps, self.dropout_rate,
                     self.attention_dropout_rate, self.deterministic, **kw)
        for i in range(self.depth)]
    self.cross_kv = {str(i): CrossKV(self.num_heads, self.width // self.num_heads, **kw)
                     for i in self.cross_layers}
    self.vision_proj = layers.dense(self.embed_dim, ("embed", "mlp"), name=None, **kw)
    self.text_proj = layers.dense(self.embed_dim, ("embed", "mlp"), name=None, **kw)
    self.itm_head = layers.dense(2, ("embed", "classes"), name=None, **kw)
    self.lm_head = LMHead(self.width, self.vocab_size, self.activation, self.norm_eps, **kw)

  def _has_cross(self, i: int) -> bool:
    return i % self.cross_attention_frequency == 0

  @property
  def cross_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.depth) if self._has_cross(i))

  @property
  def kv_width(self) -> int:
    return self.vision_width or self.encoder_width

  # ------------------------------------------------------------------------------ passes
  def encode_patches(self, features: Array, coords: Array | None = None,
                     mask: Array | None = None) -> PatchKV:
    """ln_vision -> (patch_proj) -> + sin-cos(coords) -> per-layer cross-attention K/V."""
    if features.shape[-1] != self.encoder_width:
      raise ValueError(f"patch features have width {features.shape[-1]}; the Q-Former expects "
                       f"encoder_width={self.encoder_width}")
    b, n = features.shape[:2]
    x = self.ln_vision(features.astype(jnp.float32)).astype(self.dtype)
    if self.vision_width:
      x = self.patch_proj(x)
    if self.pos_encoding:
      if coords is None:
        raise ValueError("pos_encoding needs the patches' grid coordinates")
      x = x + sincos_2d(coords, self.kv_width, self.pos_temperature).astype(x.dtype)
    x = layers.constrain(x, _ACT)
    mask = jnp.ones((b, n), bool) if mask is None else jnp.asarray(mask).astype(bool)
    kv = tuple(self.cross_kv[str(i)](x) for i in self.cross_layers)
    return {"kv": kv, "mask": mask}

  def _queries(self, batch: int) -> Array:
    return jnp.broadcast_to(self.query_tokens[None], (batch,) + self.query_tokens.shape)

  def _encode(self, x: Array, mask: Array | None, num_queries: int, kv: PatchKV | None) -> Array:
    kv_mask = None
    if kv is not None:
      m = kv["mask"]
      m = m | ~jnp.any(m, axis=-1, keepdims=True)   # a slide without patches: no NaNs
      kv_mask = m[:, None, None, :]
    j = 0
    for i, layer in enumerate(self.layers):
      layer_kv = None
      if self._has_cross(i) and kv is not None:
        layer_kv = kv["kv"][j]
        j += 1
      x = layer(x, mask, num_queries, layer_kv, kv_mask)
    return x

  def query_pass(self, kv: PatchKV) -> Array:
    """Query outputs [B, Q, W]: queries attend to each other and cross-attend to the patches."""
    b = kv["mask"].shape[0]
    x = self.embeddings(self._queries(b), None)
    return self._encode(x, None, self.num_queries, kv)

  def text_pass(self, ids: Array, mask: Array | None = None, causal: bool = False) -> Array:
    """Text-only outputs [B, T, W] (BERT: bidirectional, or causal as a decoder)."""
    x = self.embeddings(None, ids)
    if mask is None:
      mask = jnp.ones(ids.shape, bool)
    return self._encode(x, self_attention_mask(0, mask, causal=causal), 0, None)

  def multimodal_pass(self, kv: PatchKV, ids: Array, mask: Array | None = None,
                      causal: bool = False) -> Array:
    """[queries; text] outputs [B, Q+T, W]: bidirectional (ITM) or UniLM (causal, ITG)."""
    b = ids.shape[0]
    x = self.embeddings(self._queries(b), ids)
    if mask is None:
      mask = jnp.ones(ids.shape, bool)
    return self._encode(x, self_attention_mask(self.num_queries, mask, causal=causal),
                        self.num_queries, kv)

  # ------------------------------------------------------------------------------- heads
  def image_embeds(self, query_out: Array) -> Array:
    """Unit-norm vision_proj of every query output [B, Q, E] (float32)."""
    return l2_normalize(self.vision_proj(query_out))

  def text_embeds(self, text_out: Array) -> Array:
    """Unit-norm text_proj of the [CLS] output [B, E] (float32)."""
    return l2_normalize(self.text_proj(text_out[:, 0]))

  def itm_logits(self, multimodal_out: Array) -> Array:
    """ITM logits [B, 2]: itm_head averaged over the query positions."""
    return jnp.mean(self.itm_head(multimodal_out[:, :self.num_queries]).astype(jnp.float32),
                    axis=1)

  def lm_logits(self, out: Array, has_queries: bool = True) -> Array:
    """Vocabulary logits [B, T, V] of the text rows (of a causal multimodal pass, or of a
    text pass with has_queries=False)."""
    text = out[:, self.num_queries:] if has_queries else out
    return self.lm_head(text, self.embeddings.attend)

  def temperature(self) -> Array:
    """The ITC temperature (a scalar; logits = cosine / temperature), clipped as BLIP does."""
    return jnp.clip(self.temp.astype(jnp.float32), self.temp_min, self.temp_max)

  def __call__(self, features: Array, coords: Array | None, patch_mask: Array | None,
               ids: Array, text_mask: Array | None = None) -> dict[str, Array]:
    """Every pass and head once (initialisation, tests)."""
    kv = self.encode_patches(features, coords, patch_mask)
    query_out = self.query_pass(kv)
    text_out = self.text_pass(ids, text_mask)
    itm_out = self.multimodal_pass(kv, ids, text_mask)
    itg_out = self.multimodal_pass(kv, ids, text_mask, causal=True)
    return {"image_embeds": self.image_embeds(query_out),
            "text_embeds": self.text_embeds(text_out),
            "itm_logits": self.itm_logits(itm_out),
            "lm_logits": self.lm_logits(itg_out),
            "temperature": self.temperature()}


def config_dict(model: QFormer) -> dict[str, Any]:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in ("parent", "name", "dtype", "param_dtype")}


def example_inputs(model: QFormer, batch: int = 1, patches: int = 4, text_len: int = 4):
  """Zero inputs of the right shapes for `model.init` (shapes only matter)."""
  return (jnp.zeros((batch, patches, model.encoder_width), jnp.float32),
          jnp.zeros((batch, patches, 2), jnp.int32), jnp.ones((batch, patches), bool),
          jnp.zeros((batch, text_len), jnp.int32), jnp.ones((batch, text_len), bool))
