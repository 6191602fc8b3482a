"""Decoder-only LLM with the Llama / Qwen2 / Qwen3 layouts (PathAlign's frozen report
writer, PathFLIP's instruction LLM).

Pre-RMSNorm blocks: RoPE (theta and HF rope scaling: default, linear, llama3), grouped-query
attention (layers.Attention, with its kernel choice and KV cache), SwiGLU MLP
(layers.Mlp "swiglu", no biases), Qwen2 q/k/v biases, Qwen3 per-head q/k RMSNorm, tied or
untied output embedding. `config_from_hf` reads a Hugging Face config.json; the converter
(pathjax/convert/hf_llm.py) maps the weights.

Parameter tree (scan=True stacks every layer on a leading "layers" axis under `layers/`;
scan=False names them `layers_{i}/`). HF name -> pathjax path:

    model.embed_tokens.weight              embed/embedding                 [vocab, embed]
    model.layers.i.input_layernorm         layers/attn_norm/scale          [embed]
    model.layers.i.self_attn.q_proj        layers/attn/query/kernel        [embed, heads, head_dim]  (+ bias [heads, head_dim])
    model.layers.i.self_attn.k_proj        layers/attn/key/kernel          [embed, kv_heads, head_dim]
    model.layers.i.self_attn.v_proj        layers/attn/value/kernel        [embed, kv_heads, head_dim]
    model.layers.i.self_attn.o_proj        layers/attn/out/kernel          [heads, head_dim, embed]
    model.layers.i.self_attn.q_norm/k_norm layers/attn/query_norm/scale, layers/attn/key_norm/scale  [head_dim] (Qwen3)
    model.layers.i.post_attention_layernorm layers/mlp_norm/scale          [embed]
    model.layers.i.mlp.gate_proj           layers/mlp/fc1_gate/kernel      [embed, mlp]
    model.layers.i.mlp.up_proj             layers/mlp/fc1_up/kernel        [embed, mlp]
    model.layers.i.mlp.down_proj           layers/mlp/fc2/kernel           [mlp, embed]
    model.norm                             final_norm/scale                [embed]
    lm_head.weight                         lm_head/kernel                  [embed, vocab]  (untied only)

LoRA targets as regexes over these paths (the HF names q, k, v, o, gate, up, down):
`LORA_TARGETS` below, e.g. `.*/attn/(query|key|value|out)/kernel` and
`.*/mlp/(fc1_gate|fc1_up|fc2)/kernel`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathjax.models import layers

Array = jax.Array

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Published layouts (from their config.json) for synthetic batches and AOT compiles without
# a model directory (configs' llm_overrides); a real run takes every field from its directory.
LAYOUTS: dict[str, dict] = {
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, intermediate_size=11008, norm_eps=1e-5, rope_theta=10000.0,
                      scan=True, remat="full"),
    "qwen3_1.7b": dict(vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16,
                       num_kv_heads=8, head_dim=128, intermediate_size=6144, norm_eps=1e-6,
                       rope_theta=1_000_000.0, qk_norm=True, tie_embeddings=True, scan=True,
                       remat="full"),
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, scan=True),
}
ROPE_TYPES = ("default", "linear", "llama3")
# HF short names (q, k, v, o, gate, up, down) -> regex over the parameter paths.
LORA_TARGETS: dict[str, str] = {
    "q": r".*/attn/query/kernel", "k": r".*/attn/key/kernel", "v": r".*/attn/value/kernel",
    "o": r".*/attn/out/kernel", "gate": r".*/mlp/fc1_gate/kernel", "up": r".*/mlp/fc1_up/kernel",
    "down": r".*/mlp/fc2/kernel",
}


class LLMConfigError(ValueError):
  """A config.json this decoder cannot represent (the message names what is supported)."""


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] as transformers computes them (float32)."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv = inv.astype(np.float32)
  rope_type = (scaling or {}).get("rope_type", "default")
  if rope_type == "default":
    return inv
  if rope_type == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise LLMConfigError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """(cos, sin) [batch, len, head_dim] for int positions [batch, len]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def positions_from_mask(attention_mask: Array) -> Array:
  """Position ids from a (left-padded) attention mask, as transformers' generate: the
  count of real tokens before each one; padding gets 1 (its output is never used)."""
  mask = attention_mask.astype(jnp.int32)
  pos = jnp.cumsum(mask, axis=-1) - 1
  return jnp.where(mask == 0, 1, pos)


class DecoderBlock(nn.Module):
  """Pre-RMSNorm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  attention: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, kv_mask, rope, cache, cache_index):
    norm = lambda name: layers.rms_norm(name=name, eps=self.norm_eps, dtype=self.dtype,
                                        param_dtype=self.param_dtype)
    attn = layers.Attention(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        use_bias=self.qkv_bias, out_bias=self.out_bias, qk_norm=self.qk_norm,
        norm_eps=self.norm_eps, causal=True, impl=self.attention, dtype=self.dtype,
        param_dtype=self.param_dtype, name="attn")
    y = attn(norm("attn_norm")(x), kv_mask=kv_mask, rope=rope, cache=cache,
             cache_index=cache_index)
    if cache is not None:
      y, cache = y
    x = x + y
    y = layers.Mlp(self.mlp_dim, "swiglu", use_bias=self.mlp_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")(norm("mlp_norm")(x))
    x = layers.constrain(x + y, ("act_batch", "act_len", "act_embed"))
    return x, cache


class _ScanBlock(DecoderBlock):
  """DecoderBlock with nn.scan's (carry, xs) -> (carry, ys) signature; the cache is
  scanned (one slice per layer), everything else broadcast."""

  def __call__(self, x, cache, kv_mask, rope, cache_index):
    return super().__call__(x, kv_mask, rope, cache, cache_index)


class LLM(nn.Module):
  """Causal LM over token ids [B, T] (or `inputs_embeds` [B, T, embed]).

  attention_mask [B, T] (1 = token, 0 = padding; left padding for batches of prompts)
  gives the key padding and, unless `positions` is given, the positions. With `cache` (from
  init_cache) and `cache_index`, the tokens are written at that slot and the call returns
  (logits, cache); `attention_mask` then covers every cache slot [B, max_len].
  Logits are float32 [B, T, vocab] ([B, 1, vocab] with `last_only`); `return_hidden`
  returns the final-normed hidden states instead.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0                      # 0: hidden_size // num_heads
  intermediate_size: int = 11008
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None       # HF rope parameters: {"rope_type": ..., "factor": ...}
  qkv_bias: bool = False                 # Qwen2
  out_bias: bool = False                 # Llama attention_bias covers q, k, v and o
  mlp_bias: bool = False
  qk_norm: bool = False                  # Qwen3
  tie_embeddings: bool = False
  attention: str = "auto"                # layers.Attention.impl
  scan: bool = True
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def setup_check(self):
    if self.num_heads % self.num_kv_heads:
      raise LLMConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                           f"{self.num_kv_heads}")

  @nn.compact
  def __call__(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
               attention_mask: Array | None = None, positions: Array | None = None,
               cache: dict[str, Array] | None = None, cache_index: Array | int | None = None,
               return_hidden: bool = False, last_only: bool = False):
    self.setup_check()
    embed = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embed",
                     embedding_init=nn.with_logical_partitioning(
                         layers.default_kernel_init, ("vocab", "embed")))
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))
    b, t = x.shape[:2]
    if attention_mask is None:
      if cache is not None:
        raise ValueError("decoding with a cache needs attention_mask over the cache slots")
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      if cache is not None:
        raise ValueError("decoding with a cache needs the positions of the new tokens")
      positions = positions_from_mask(attention_mask)
    inv_freq = rope_inv_freq(self.dim_per_head, self.rope_theta, self.rope_scaling)
    rope = rope_tables(positions, inv_freq)

    block = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                 head_dim=self.dim_per_head, mlp_dim=self.intermediate_size,
                 norm_eps=self.norm_eps, qkv_bias=self.qkv_bias, out_bias=self.out_bias,
                 mlp_bias=self.mlp_bias, qk_norm=self.qk_norm, attention=self.attention,
                 dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = _ScanBlock if self.scan else DecoderBlock
    if self.remat != "none":
      block_cls = nn.remat(block_cls, policy=layers.remat_policy(self.remat),
                           prevent_cse=not self.scan)
    layer_cache = None if cache is None else (cache["k"], cache["v"])
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},  # LoRA dropout per layer
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, layer_cache = stack(**block, name="layers")(x, layer_cache, attention_mask, rope,
                                                     cache_index)
    else:
      new = []
      for i in range(self.num_layers):
        c = None if layer_cache is None else (layer_cache[0][i], layer_cache[1][i])
        x, c = block_cls(**block, name=f"layers_{i}")(x, attention_mask, rope, c, cache_index)
        new.append(c)
      if layer_cache is not None:
        layer_cache = (jnp.stack([c[0] for c in new]), jnp.stack([c[1] for c in new]))
    if last_only:  # generation needs the next-token logits only
      x = x[:, -1:]
    x = layers.rms_norm(name="final_norm", eps=self.norm_eps, dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)
    if return_hidden:
      out = x
    elif self.tie_embeddings:
      out = embed.attend(x)
    else:
      out = layers.dense(self.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="lm_head")(x)
    if not return_hidden:
      out = layers.constrain(out.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))
    if cache is None:
      return out
    return out, {"k": layer_cache[0], "v": layer_cache[1]}


def init_cache(model: LLM, batch: int, max_len: int, dtype=None) -> dict[str, Array]:
  """An empty KV cache {"k", "v"}: [layers, batch, kv_heads, max_len, head_dim] each."""
  shape = (model.num_layers, batch, model.num_kv_heads, max_len, model.dim_per_head)
  dtype = dtype or model.dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_AXES = ("layers",) + layers.CACHE_AXES


def config_dict(model: LLM) -> dict[str, Any]:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in ("parent", "name", "dtype", "param_dtype")}


def _rope_params(cfg: Mapping[str, Any]) -> tuple[float, dict | None]:
  """(theta, scaling) from either a top-level rope_theta/rope_scaling or the nested
  rope_parameters of transformers 5."""
  params = dict(cfg.get("rope_parameters") or {})
  scaling = dict(cfg.get("rope_scaling") or {})
  theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  if "type" in merged and "rope_type" not in merged:
    merged["rope_type"] = merged.pop("type")
  merged.pop("type", None)
  rope_type = merged.get("rope_type", "default")
  if rope_type not in ROPE_TYPES:
    raise LLMConfigError(f"unsupported rope type {rope_type!r} in the config; supported: "
                         f"{', '.join(ROPE_TYPES)}")
  if merged.get("partial_rotary_factor", 1.0) != 1.0:
    raise LLMConfigError("partial_rotary_factor != 1 is not supported")
  if rope_type == "default":
    return float(theta), None
  if rope_type == "llama3":
    merged.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
  keep = {"rope_type", "factor", "low_freq_factor", "high_freq_factor",
          "original_max_position_embeddings"}
  return float(theta), {k: v for k, v in merged.items() if k in keep}


def config_from_hf(cfg: Mapping[str, Any], *, source: str = "config.json") -> dict[str, Any]:
  """LLM fields from a Hugging Face config.json dict; refuses what the decoder cannot run."""
  archs = cfg.get("architectures") or []
  arch = archs[0] if archs else None
  if arch not in SUPPORTED_ARCHITECTURES:
    raise LLMConfigError(f"{source}: unsupported architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  if cfg.get("hidden_act", "silu") != "silu":
    raise LLMConfigError(f"{source}: hidden_act {cfg['hidden_act']!r}; the decoder's MLP is SwiGLU (silu)")
  if cfg.get("use_sliding_window"):
    raise LLMConfigError(f"{source}: sliding-window attention is not supported")
  heads = int(cfg["num_attention_heads"])
  hidden = int(cfg["hidden_size"])
  theta, scaling = _rope_params(cfg)
  fields = dict(
      vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
      num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or hidden // heads),
      intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
  if arch == "LlamaForCausalLM":
    bias = bool(cfg.get("attention_bias", False))
    fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
  elif arch == "Qwen2ForCausalLM":
    fields.update(qkv_bias=True, out_bias=False)
  else:  # Qwen3
    bias = bool(cfg.get("attention_bias", False))
    fields.update(qkv_bias=bias, out_bias=bias, qk_norm=True)
  if fields["head_dim"] == hidden // heads:
    fields["head_dim"] = 0
  return fields


def load_llm(path: str, *, dtype=jnp.float32):
  """Loads a model directory written by `pathjax convert --llm`: (module, params, meta).

  meta["tokenizer_dir"] is the tokenizer directory (or None) and meta["generation"] the
  stop/pad/bos ids recorded by the converter."""
  import os

  from pathjax.models import model_dir
  model = model_dir.load_model_dir(path, dtype=dtype, towers=["llm"])
  meta = dict(model.meta)
  if model.towers["llm"].kind != "llm":
    raise model_dir.ModelDirError(f"{path}: the llm tower has kind {model.towers['llm'].kind!r}, "
                                  "not 'llm'")
  tok = meta.get("tokenizer")
  meta["tokenizer_dir"] = os.path.join(model.path, tok) if tok else None
  meta.setdefault("generation", {})
  tower = model.towers["llm"]
  return tower.module, tower.params, meta
