"""CLIP text tower (QuiltNet, PLIP, CONCH-style text encoders).

Token + learned position embeddings, causal pre-LN transformer, final LayerNorm, pooling at
the end-of-text token, linear projection. Converters load transformers `CLIPTextModel`
(`text_model.*`) and open_clip (`transformer.resblocks.*`) checkpoints into it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pathjax.models import layers

# name -> (width, depth, heads); mlp = 4 * width.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 2, 2),
    "small": (256, 6, 4),
    "base": (512, 12, 8),    # OpenAI CLIP ViT-B text tower, QuiltNet, PLIP
    "large": (768, 12, 12),  # CLIP ViT-L/14 text tower
}


def variant_fields(variant: str) -> dict[str, Any]:
  if variant not in SIZES:
    raise ValueError(f"unknown text variant {variant!r}; valid variants: {', '.join(SIZES)}")
  width, depth, heads = SIZES[variant]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width)


class TextTransformer(nn.Module):
  """Causal text transformer over int token ids [B, T]. Returns a dict of features.

  Output: "pooled" [B, embed_dim] (projected features at the end-of-text token, or the
  width-dim features when embed_dim is 0), "eot" [B, width] (the end-of-text features
  before the projection), "tokens" [B, T, width] (after the final norm).
  Pooling: `eos_id >= 0` pools at the first occurrence of that id (transformers' rule for
  tokenizers whose eos is not the largest id); `eos_id < 0` pools at argmax(ids) (OpenAI
  CLIP and open_clip, where end-of-text has the largest id).
  """
  vocab_size: int = 49408
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  context_length: int = 77
  embed_dim: int = 512            # projection size; 0 = no projection
  activation: str = "quick_gelu"  # OpenAI CLIP; "gelu" for open_clip models trained with it
  eos_id: int = -1
  norm_eps: float = 1e-5
  proj_bias: bool = False
  dropout_rate: float = 0.0
  deterministic: bool = True
  scan: bool = True
  remat: str = "none"
  attention: str = "auto"  # layers.Attention.impl: auto | einsum | xla | cudnn | splash
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> "TextTransformer":
    return cls(**{**variant_fields(variant), **overrides})

  @nn.compact
  def __call__(self, ids: jax.Array) -> dict[str, jax.Array]:
    b, t = ids.shape
    if t > self.context_length:
      raise ValueError(f"{t} tokens exceed the context length {self.context_length}")
    tok = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                   embedding_init=nn.with_logical_partitioning(
                       nn.initializers.normal(0.02), ("vocab", "embed")),
                   name="token_embedding")(ids)
    pos = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("pos", "embed")), (self.context_length, self.width),
        self.param_dtype)
    x = tok + pos[:t].astype(self.dtype)
    x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))
    block = dict(attention=self.attention, num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                 norm_eps=self.norm_eps, causal=True, dropout_rate=self.dropout_rate,
                 deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Encoder(self.depth, block, scan=self.scan, remat=self.remat, name="encoder")(x)
    x = layers.layer_norm(name="final_norm", eps=self.norm_eps, dtype=self.dtype,
                          param_dtype=self.param_dtype)(x)
    if self.eos_id >= 0:
      eot = jnp.argmax(ids == self.eos_id, axis=-1)
    else:
      eot = jnp.argmax(ids, axis=-1)
    pooled = eot_features = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    if self.embed_dim:
      pooled = layers.dense(self.embed_dim, ("embed", "mlp"), use_bias=self.proj_bias,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name="projection")(pooled)
    return {"pooled": pooled, "eot": eot_features, "tokens": x}


def config_dict(model: TextTransformer) -> dict[str, Any]:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in ("parent", "name", "dtype", "param_dtype")}
