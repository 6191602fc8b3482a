"""PathFLIP's slide-side heads (specs/pathflip.md): the context transformer over
[global; regions] and the text-conditioned region head.

Both are built from `pathjax.models.layers` (Attention, Mlp, layer_norm) and equal their
PyTorch counterparts in the public PathFLIP code at float32 tolerance (tests/test_pathflip_model.py):

- `ContextEncoder` = `torch.nn.TransformerEncoder` of post-LN `nn.TransformerEncoderLayer`s
  (d 256, 8 heads, FFN 1024, ReLU, dropout 0.1, LayerNorm eps 1e-5: torch's defaults, which
  the public code keeps). It mixes the global slide vector v and the L region embeddings
  r_1..r_L; no position embeddings (regions are a set).
- `RegionHead`: v_{b,j} = MHA(query = W_q t_j, key = W_k R_b, value = W_v R_b), torch
  `nn.MultiheadAttention` (with its own in/out projections) after three Linear layers. It
  returns the head-averaged attention weights over regions [B, T, L], the region factor of
  the localization map.

Both start from PyTorch's default initialisation of those torch modules (they are trained
from scratch): nn.Linear's U(+-1/sqrt(fan_in)) and MHA's xavier in-projections
(layers.torch_linear_init, layers.torch_mha_in_proj_init). With the std-0.02 init of
pretrained towers the region head's four stacked projections scale its attention logits by
~1e-4: the region attention started uniform over regions and stayed there (localization at
chance even on oracle patch features).

`PathFLIPHeads` bundles both with the region loss's scale and bias (the model-directory
tower next to the shared Q-Former; the recipe is pathjax/recipes/pathflip.py).

`convert_transformer_encoder` / `convert_region_head` map PyTorch state dicts (numpy
arrays) onto these parameter trees.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathjax.models import layers

Array = jax.Array
_ACT = ("act_batch", "act_len", "act_embed")


def _attention(m: nn.Module) -> layers.Attention:
  """The torch nn.MultiheadAttention sublayer of a ContextLayer or RegionHead, from its fields."""
  return layers.Attention(num_heads=m.num_heads, dropout_rate=m.dropout_rate,
                          deterministic=m.deterministic, kernel_init=layers.torch_mha_in_proj_init,
                          out_kernel_init=layers.torch_linear_init, dtype=m.dtype,
                          param_dtype=m.param_dtype, name="attention")


class ContextLayer(nn.Module):
  """One post-LN transformer encoder layer (torch nn.TransformerEncoderLayer, norm_first=False):
  x = LN(x + Drop(MHA(x))); x = LN(x + Drop(W2 Drop(act(W1 x))))."""
  num_heads: int = 8
  mlp_dim: int = 1024
  activation: str = "relu"
  norm_eps: float = 1e-5
  dropout_rate: float = 0.1
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(layers.layer_norm, eps=self.norm_eps, **kw)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    h = _attention(self)(x, kv_mask=mask)
    x = norm(name="attention_norm")(x + drop(h))
    h = layers.Mlp(self.mlp_dim, self.activation, dropout_rate=self.dropout_rate,
                   deterministic=self.deterministic, kernel_init=layers.torch_linear_init,
                   name="mlp", **kw)(x)
    x = norm(name="mlp_norm")(x + drop(h))
    return layers.constrain(x, _ACT)


class ContextEncoder(nn.Module):
  """`depth` ContextLayers over tokens [B, 1 + L, D] ([global; regions]); `mask` [B, 1 + L]
  marks real tokens (torch's src_key_padding_mask inverted), None = all real."""
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 1024
  activation: str = "relu"
  norm_eps: float = 1e-5
  dropout_rate: float = 0.1
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    x = layers.constrain(x.astype(self.dtype), _ACT)
    for i in range(self.depth):
      x = ContextLayer(self.num_heads, self.mlp_dim, self.activation, self.norm_eps,
                       self.dropout_rate, self.deterministic, self.dtype, self.param_dtype,
                       name=f"layers_{i}")(x, mask)
    return x


class RegionHead(nn.Module):
  """Text-conditioned region embeddings and their attention over regions.

  texts [B, T, D] (the subcaption embeddings each slide is scored against; broadcast a
  shared [T, D] set with jnp.broadcast_to), regions [B, L, D] (contextualised region
  tokens), region_mask [B, L] (True = real region) -> (embeddings [B, T, D], weights
  [B, T, L], the attention probabilities averaged over heads, as torch's
  average_attn_weights=True).
  """
  width: int = 256
  num_heads: int = 8
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, texts: Array, regions: Array,
               region_mask: Array | None = None) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = functools.partial(layers.dense, self.width, ("embed", "mlp"),
                             kernel_init=layers.torch_linear_init, **kw)
    q = proj(name="w_q")(texts)
    k = proj(name="w_k")(regions)
    v = proj(name="w_v")(regions)
    out, weights = _attention(self)(q, k, kv_mask=region_mask, value_input=v, return_weights=True)
    return layers.constrain(out, _ACT), jnp.mean(weights.astype(jnp.float32), axis=1)


class PathFLIPHeads(nn.Module):
  """What PathFLIP adds on top of the shared Q-Former: the context encoder over
  [global; regions] (width = the Q-Former's embed_dim), the region head, and the region
  loss's learnable scale s and bias beta (scalars, used raw: z = s * cos + beta).

  A model directory stores it as a tower of kind "pathflip_heads" next to the Q-Former."""
  width: int = 256
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 1024
  activation: str = "relu"
  norm_eps: float = 1e-5
  dropout_rate: float = 0.1
  region_heads: int = 8
  scale_init: float = 2.6592600369262695   # log(1 / 0.07), the paper-era init
  bias_init: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.context = ContextEncoder(self.depth, self.num_heads, self.mlp_dim, self.activation,
                                  self.norm_eps, self.dropout_rate, self.deterministic, **kw)
    self.region_head = RegionHead(self.width, self.region_heads, 0.0, self.deterministic, **kw)
    scalar = lambda v: nn.with_logical_partitioning(nn.initializers.constant(v), ())
    self.region_scale = self.param("region_scale", scalar(self.scale_init), (), self.param_dtype)
    self.region_bias = self.param("region_bias", scalar(self.bias_init), (), self.param_dtype)

  def scale_and_bias(self) -> tuple[Array, Array]:
    return self.region_scale.astype(jnp.float32), self.region_bias.astype(jnp.float32)

  def __call__(self, tokens: Array, texts: Array, mask: Array | None = None):
    """tokens [B, 1 + L, W] ([global; regions]), texts [B, T, W] -> (contextualised tokens,
    text-conditioned embeddings [B, T, W], region weights [B, T, L])."""
    x = self.context(tokens, mask)
    v, w = self.region_head(texts, x[:, 1:], None if mask is None else mask[:, 1:])
    return x, v, w


def config_dict(model: PathFLIPHeads) -> dict[str, Any]:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in ("parent", "name", "dtype", "param_dtype")}


def example_inputs(model: PathFLIPHeads):
  """Zero inputs of the right shapes for `model.init` (a model directory's shape check)."""
  return (jnp.zeros((1, 3, model.width), jnp.float32), jnp.zeros((1, 2, model.width), jnp.float32))


# ------------------------------------------------------------------------------------------
# PyTorch state dicts -> parameter trees
# ------------------------------------------------------------------------------------------


def _mha(state: Mapping[str, np.ndarray], prefix: str, num_heads: int) -> dict[str, Any]:
  """torch nn.MultiheadAttention (packed in_proj) -> layers.Attention params."""
  w, b = np.asarray(state[f"{prefix}in_proj_weight"]), np.asarray(state[f"{prefix}in_proj_bias"])
  e = w.shape[1]
  hd = w.shape[0] // 3 // num_heads
  out = {}
  for i, name in enumerate(("query", "key", "value")):
    rows = slice(i * e, (i + 1) * e)
    out[name] = {"kernel": w[rows].T.reshape(e, num_heads, hd),
                 "bias": b[rows].reshape(num_heads, hd)}
  out["out"] = {"kernel": np.asarray(state[f"{prefix}out_proj.weight"]).T.reshape(num_heads, hd, -1),
                "bias": np.asarray(state[f"{prefix}out_proj.bias"])}
  return out


def _linear(state, prefix):
  return {"kernel": np.asarray(state[f"{prefix}weight"]).T, "bias": np.asarray(state[f"{prefix}bias"])}


def _norm(state, prefix):
  return {"scale": np.asarray(state[f"{prefix}weight"]), "bias": np.asarray(state[f"{prefix}bias"])}


def convert_transformer_encoder(state: Mapping[str, np.ndarray], *, depth: int, num_heads: int,
                                prefix: str = "") -> dict[str, Any]:
  """torch nn.TransformerEncoder state (`{prefix}layers.{i}.self_attn...`) -> ContextEncoder params."""
  out = {}
  for i in range(depth):
    p = f"{prefix}layers.{i}."
    out[f"layers_{i}"] = {
        "attention": _mha(state, f"{p}self_attn.", num_heads),
        "attention_norm": _norm(state, f"{p}norm1."),
        "mlp": {"fc1": _linear(state, f"{p}linear1."), "fc2": _linear(state, f"{p}linear2.")},
        "mlp_norm": _norm(state, f"{p}norm2."),
    }
  return out


def convert_region_head(state: Mapping[str, np.ndarray], *, num_heads: int,
                        names: tuple[str, str, str, str] = ("W_q.", "W_k.", "W_v.", "mha.")
                        ) -> dict[str, Any]:
  """torch Linear W_q, W_k, W_v + nn.MultiheadAttention state -> RegionHead params. `names`
  are the four modules' state-dict prefixes."""
  wq, wk, wv, mha = names
  return {"w_q": _linear(state, wq), "w_k": _linear(state, wk), "w_v": _linear(state, wv),
          "attention": _mha(state, mha, num_heads)}
