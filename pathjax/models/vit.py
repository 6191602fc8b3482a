"""Vision Transformer covering the timm layouts of the pathology encoders users hold.

UNI (ViT-L/16, layer scale), UNI2-h (ViT-H/14, register tokens, SwiGLU, no position
embedding on prefix tokens), Virchow / H-optimus / Prov-GigaPath tile encoders are the same
module with different fields. `ViT.from_variant("L/16", ...)` names the sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathjax.models import layers

# name -> (width, depth, heads, mlp_dim); patch size comes after the slash ("L/16").
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1536, 40, 24, 6144),
}
PATCH_SIZES = (8, 14, 16, 32)
POOLS = ("cls", "avg", "avg_fc_norm", "none")


def variant_fields(variant: str) -> dict[str, Any]:
  """Fields for a variant name "SIZE/PATCH", e.g. "B/16", "L/16", "H/14"."""
  size, _, patch = variant.partition("/")
  valid = [f"{s}/{p}" for s in SIZES for p in (14, 16)]
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    raise ValueError(f"unknown ViT variant {variant!r}; valid variants: {', '.join(valid)} "
                     f"(patch sizes {PATCH_SIZES})")
  width, depth, heads, mlp_dim = SIZES[size]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, patch_size=int(patch))


def resize_pos_embed_grid(pos: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """Resizes a [gh, gw, D] position-embedding grid with torch-compatible bicubic.

  Matches `torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
  antialias=True)` as timm's `resample_abs_pos_embed` uses it, so converted weights give the
  same features as timm at a new image size.
  """
  from pathjax.models import resample  # numpy only; imported lazily
  return resample.bicubic_resize_torch(pos, new_grid)


class ViT(nn.Module):
  """ViT over NHWC images (already normalised). Returns a dict of features.

  Output: "pooled" [B, D] (per `pool`), "tokens" [B, N, D] (after the final norm, prefix
  tokens included), "patch_tokens" [B, gh*gw, D].
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  image_size: int = 224          # the size the position embedding is stored for
  class_token: bool = True
  reg_tokens: int = 0
  pos_embed: str = "learn"       # "learn" | "none"
  pos_embed_on_prefix: bool = True  # timm no_embed_class=False: prefix tokens get positions
  layer_scale_init: float | None = None
  mlp_activation: str = "gelu"   # "gelu" | "swiglu" | "gelu_tanh" | "quick_gelu"
  pre_norm: bool = False         # CLIP-style LayerNorm before the blocks
  final_norm: bool = True
  pool: str = "cls"              # "cls" | "avg" | "avg_fc_norm" | "none"
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  patch_bias: bool = True
  num_classes: int = 0           # > 0 adds a linear head "head" on the pooled features
  dropout_rate: float = 0.0
  deterministic: bool = True
  scan: bool = True
  remat: str = "none"
  attention: str = "auto"  # layers.Attention.impl: auto | einsum | xla | cudnn | splash
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> "ViT":
    return cls(**{**variant_fields(variant), **overrides})

  def _norm(self, name):
    return layers.layer_norm(name=name, eps=self.norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
    p = self.patch_size
    b, h, w, _ = images.shape
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    layers.default_kernel_init, (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                name="patch_embed")(images.astype(self.dtype))
    gh, gw = h // p, w // p
    x = x.reshape(b, gh * gw, self.width)

    prefix = []
    if self.class_token:
      cls_tok = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.normal(1e-6), (None, None, "embed")), (1, 1, self.width), self.param_dtype)
      prefix.append(cls_tok)
    if self.reg_tokens:
      reg = self.param("reg_token", nn.with_logical_partitioning(
          nn.initializers.normal(1e-6), (None, None, "embed")),
          (1, self.reg_tokens, self.width), self.param_dtype)
      prefix.append(reg)
    prefix = [jnp.broadcast_to(t.astype(self.dtype), (b,) + t.shape[1:]) for t in prefix]
    num_prefix = sum(t.shape[1] for t in prefix)

    if self.pos_embed == "learn":
      grid = self.image_size // p
      num_pos = grid * grid + (num_prefix if self.pos_embed_on_prefix else 0)
      pos = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, "pos", "embed")), (1, num_pos, self.width),
          self.param_dtype).astype(self.dtype)
      prefix_pos = pos[:, :num_prefix] if self.pos_embed_on_prefix else None
      patch_pos = pos[:, num_prefix:] if self.pos_embed_on_prefix else pos
      if (gh, gw) != (grid, grid):
        # Dynamic image size: interpolate the stored grid (jax bicubic; converters resize with
        # the torch-compatible kernel when the size is known in advance).
        patch_pos = jax.image.resize(patch_pos.reshape(1, grid, grid, self.width),
                                     (1, gh, gw, self.width), "bicubic").reshape(1, gh * gw, -1)
      x = x + patch_pos
      if prefix_pos is not None:
        prefix = [jnp.concatenate(prefix, axis=1) + prefix_pos] if prefix else []
    elif self.pos_embed != "none":
      raise ValueError(f"unknown pos_embed {self.pos_embed!r}; valid: learn, none")
    if prefix:
      x = jnp.concatenate(prefix + [x], axis=1)
    x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))
    if self.pre_norm:
      x = self._norm("norm_pre")(x)

    block = dict(attention=self.attention, num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.mlp_activation,
                 layer_scale_init=self.layer_scale_init, norm_eps=self.norm_eps,
                 qkv_bias=self.qkv_bias, dropout_rate=self.dropout_rate,
                 deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Encoder(self.depth, block, scan=self.scan, remat=self.remat, name="encoder")(x)

    if self.final_norm and self.pool != "avg_fc_norm":
      x = self._norm("norm")(x)
    patch_tokens = x[:, num_prefix:]
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool in ("avg", "avg_fc_norm"):
      pooled = patch_tokens.mean(axis=1)
      if self.pool == "avg_fc_norm":
        pooled = self._norm("fc_norm")(pooled)
    else:
      pooled = x
    if self.num_classes:
      pooled = layers.dense(self.num_classes, ("embed", "classes"), dtype=self.dtype,
                            param_dtype=self.param_dtype, name="head")(pooled)
    return {"pooled": pooled, "tokens": x, "patch_tokens": patch_tokens}


def config_dict(model: ViT) -> dict[str, Any]:
  """The JSON-able fields of a ViT (for model directories)."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name", "dtype", "param_dtype")}
  return fields
