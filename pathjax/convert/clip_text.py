"""CLIP text towers (transformers or open_clip naming) -> pathjax TextTransformer params.

transformers (`CLIPTextModel`, `CLIPTextModelWithProjection`, or a full `CLIPModel`, as
PLIP / QuiltNet / CONCH-style checkpoints ship; `vision_model.*`, `visual_projection`,
`logit_scale` are ignored):

  text_model.embeddings.token_embedding.weight [V,W]     token_embedding/embedding
  text_model.embeddings.position_embedding.weight [T,W]  position_embedding
  text_model.encoder.layers.{i}.self_attn.{q,k,v}_proj   encoder/blocks/attn/query|key|value
  text_model.encoder.layers.{i}.self_attn.out_proj       encoder/blocks/attn/out
  text_model.encoder.layers.{i}.layer_norm1|2            encoder/blocks/norm1|norm2
  text_model.encoder.layers.{i}.mlp.fc1|fc2              encoder/blocks/mlp/fc1|fc2
  text_model.final_layer_norm                            final_norm
  text_projection.weight [E,W] (no bias, y = W x)        projection/kernel [W,E]

open_clip (`CLIP` / `CustomTextCLIP` text, or the "text." tower of a CustomTextCLIP):

  token_embedding.weight, positional_embedding [T,W], transformer.resblocks.{i}.ln_1|ln_2,
  attn.in_proj_weight|bias [3W,W], attn.out_proj, mlp.c_fc, mlp.c_proj, ln_final,
  text_projection [W,E] (used as x @ P)

Activation and pooling come from the transformers config.json when present (hidden_act;
eos_token_id == 2 means argmax(ids) pooling, as transformers does), or from an open_clip
model config (`quick_gelu`, `text_cfg.heads`), or from explicit fields.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from pathjax.convert.safetensors_io import PrefixView, TensorReader, WeightsError, shape_of
from pathjax.models import text as text_lib

HF_PREFIX = "text_model."
OPEN_CLIP_PREFIXES = ("", "text.", "module.", "model.")
IGNORED_HF = (r"vision_model\..*", r"visual_projection\..*", r"logit_scale",
              r"text_model\.embeddings\.position_ids")
IGNORED_OPEN_CLIP = (r"visual\..*", r"logit_scale", r"logit_bias", r"attn_mask")


def detect_format(sd: Mapping[str, Any]) -> str:
  if any(k.startswith(HF_PREFIX) for k in sd):
    return "hf"
  if any(re.search(r"(^|\.)transformer\.resblocks\.\d+\.", k) for k in sd):
    return "open_clip"
  raise WeightsError("not a CLIP text checkpoint: no text_model.* (transformers) or "
                     "transformer.resblocks.* (open_clip) tensors")


def fields_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """TextTransformer fields from a transformers CLIPTextConfig / CLIPConfig dict."""
  cfg = config.get("text_config", config)
  out: dict[str, Any] = {}
  if "num_attention_heads" in cfg:
    out["num_heads"] = int(cfg["num_attention_heads"])
  act = cfg.get("hidden_act", "quick_gelu")  # CLIPTextConfig's default
  out["activation"] = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)
  if "layer_norm_eps" in cfg:
    out["norm_eps"] = float(cfg["layer_norm_eps"])
  eos = int(cfg.get("eos_token_id", 49407))  # CLIPTextConfig's default
  # transformers' CLIPTextTransformer: eos_token_id == 2 is the legacy argmax(ids) rule.
  out["eos_id"] = -1 if eos == 2 else eos
  return out


def fields_from_open_clip_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """TextTransformer fields from an open_clip model config (model_configs/*.json)."""
  text_cfg = config.get("text_cfg", {})
  out: dict[str, Any] = {"eos_id": -1}  # open_clip pools at argmax(ids)
  if "heads" in text_cfg:
    out["num_heads"] = int(text_cfg["heads"])
  if "quick_gelu" in config:
    out["activation"] = "quick_gelu" if config["quick_gelu"] else "gelu"
  if text_cfg.get("pool_type", "argmax") not in ("argmax", "last"):
    raise WeightsError(f"open_clip text pool_type {text_cfg['pool_type']!r} is not supported")
  return out


def fields_from_config_file(path: str) -> dict[str, Any]:
  with open(path) as f:
    config = json.load(f)
  if "text_cfg" in config:
    return fields_from_open_clip_config(config)
  return fields_from_hf_config(config)


def _need(x, key):
  if x is None:
    raise WeightsError(f"missing key {key}")
  return x


def convert_clip_text(sd: Mapping[str, np.ndarray], *, fmt: str | None = None, scan: bool = True,
                      overrides: Mapping[str, Any] | None = None,
                      source: str = "<state dict>") -> tuple[dict[str, Any], dict[str, Any]]:
  """Converts a CLIP text state dict; returns (TextTransformer fields, params of numpy).

  `overrides` must supply num_heads unless a config did; activation and eos_id default to
  the transformers CLIPTextConfig defaults (quick_gelu, first eos) for "hf" and must be
  given for "open_clip" (which records neither in its weights).
  """
  fmt = fmt or detect_format(sd)
  overrides = dict(overrides or {})
  if fmt == "hf":
    return _convert_hf(sd, scan, overrides, source)
  if fmt == "open_clip":
    return _convert_open_clip(sd, scan, overrides, source)
  raise ValueError(f"unknown text format {fmt!r}; valid: hf, open_clip")


def _attn_from_qkv(q, k, v, o, width, heads):
  hd = width // heads
  attn = {}
  for name, (w, b) in zip(("query", "key", "value"), (q, k, v)):
    attn[name] = {"kernel": w.T.reshape(width, heads, hd), "bias": b.reshape(heads, hd)}
  attn["out"] = {"kernel": o[0].T.reshape(heads, hd, width), "bias": o[1]}
  return attn


def _finish_fields(fields, overrides, width):
  fields = {**fields, **overrides}
  if "num_heads" not in fields:
    raise ValueError("the number of attention heads is not in the weights: pass a text config "
                     "(config.json) or num_heads (--text-heads)")
  if width % int(fields["num_heads"]):
    raise WeightsError(f"text width {width} is not divisible by {fields['num_heads']} heads")
  valid = set(text_lib.config_dict(text_lib.TextTransformer()))
  unknown = set(fields) - valid
  if unknown:
    raise ValueError(f"unknown text fields {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
  return fields


def _stack(blocks, scan):
  if not scan:
    return {f"blocks_{i}": b for i, b in enumerate(blocks)}
  from pathjax.tree_utils import flatten, unflatten
  flats = [flatten(b) for b in blocks]
  return {"blocks": unflatten({k: np.stack([f[k] for f in flats]) for k in flats[0]})}


def _depth(sd, pattern):
  layers = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
  if not layers:
    raise WeightsError("the checkpoint has no text transformer layers")
  return max(layers) + 1


def _convert_hf(sd, scan, overrides, source):
  r = TensorReader(sd, source, what="the pathjax text model")
  tok = _need(r.get("text_model.embeddings.token_embedding.weight"),
              "text_model.embeddings.token_embedding.weight")
  pos = _need(r.get("text_model.embeddings.position_embedding.weight"),
              "text_model.embeddings.position_embedding.weight")
  vocab, width = tok.shape
  depth = _depth(sd, r"text_model\.encoder\.layers\.(\d+)\.")
  fields = {"activation": "quick_gelu", "eos_id": 49407, "norm_eps": 1e-5}
  fields.update(vocab_size=int(vocab), width=int(width), depth=depth,
                context_length=int(pos.shape[0]), proj_bias=False)
  heads = overrides.get("num_heads")
  if heads is None:
    raise ValueError("the number of attention heads is not in the weights: pass a text config "
                     "(config.json) or num_heads (--text-heads)")
  blocks = []
  for i in range(depth):
    pre = f"text_model.encoder.layers.{i}."
    lin = lambda n: (r.get(pre + n + ".weight"), r.get(pre + n + ".bias"))
    q, k, v, o = (lin(f"self_attn.{n}_proj") for n in ("q", "k", "v", "out"))
    if any(x is None for pair in (q, k, v, o) for x in pair):
      continue
    fc1, fc2 = lin("mlp.fc1"), lin("mlp.fc2")
    n1, n2 = lin("layer_norm1"), lin("layer_norm2")
    if any(x is None for pair in (fc1, fc2, n1, n2) for x in pair):
      continue
    blocks.append({
        "norm1": {"scale": n1[0], "bias": n1[1]},
        "attn": _attn_from_qkv(q, k, v, o, width, int(heads)),
        "norm2": {"scale": n2[0], "bias": n2[1]},
        "mlp": {"fc1": {"kernel": fc1[0].T, "bias": fc1[1]},
                "fc2": {"kernel": fc2[0].T, "bias": fc2[1]}},
    })
  fields["mlp_dim"] = int(shape_of(sd, "text_model.encoder.layers.0.mlp.fc1.weight")[0]) \
      if "text_model.encoder.layers.0.mlp.fc1.weight" in sd else 4 * int(width)
  fn = (r.get("text_model.final_layer_norm.weight"), r.get("text_model.final_layer_norm.bias"))
  params = {"token_embedding": {"embedding": tok}, "position_embedding": pos,
            "encoder": _stack(blocks, scan) if len(blocks) == depth else {},
            "final_norm": {"scale": fn[0], "bias": fn[1]}}
  if r.has("text_projection.weight"):
    proj = r.get("text_projection.weight")
    params["projection"] = {"kernel": proj.T}
    fields["embed_dim"] = int(proj.shape[0])
  else:
    fields["embed_dim"] = 0
  r.finish(IGNORED_HF)
  return _finish_fields(fields, {**overrides, "scan": scan}, int(width)), params


def _strip_open_clip(sd):
  for prefix in OPEN_CLIP_PREFIXES:
    if f"{prefix}token_embedding.weight" in sd:
      return PrefixView(sd, prefix) if prefix else sd
  raise WeightsError("not an open_clip text checkpoint: no token_embedding.weight")


def _convert_open_clip(sd, scan, overrides, source):
  sd = _strip_open_clip(sd)
  r = TensorReader(sd, source, what="the pathjax text model")
  tok = r.get("token_embedding.weight")
  pos = _need(r.get("positional_embedding"), "positional_embedding")
  vocab, width = tok.shape
  depth = _depth(sd, r"transformer\.resblocks\.(\d+)\.")
  if "num_heads" not in overrides:
    raise ValueError("open_clip weights do not record the number of heads: pass the open_clip "
                     "model config (--text-config) or --text-heads")
  if "activation" not in overrides:
    raise ValueError("open_clip weights do not record the activation: pass --text-activation "
                     "quick_gelu (OpenAI-initialised models, e.g. QuiltNet) or gelu, or the "
                     "open_clip model config (--text-config)")
  heads = int(overrides["num_heads"])
  blocks = []
  for i in range(depth):
    pre = f"transformer.resblocks.{i}."
    g = lambda n: r.get(pre + n)
    in_w, in_b = g("attn.in_proj_weight"), g("attn.in_proj_bias")
    out = (g("attn.out_proj.weight"), g("attn.out_proj.bias"))
    ln1 = (g("ln_1.weight"), g("ln_1.bias"))
    ln2 = (g("ln_2.weight"), g("ln_2.bias"))
    fc1 = (g("mlp.c_fc.weight"), g("mlp.c_fc.bias"))
    fc2 = (g("mlp.c_proj.weight"), g("mlp.c_proj.bias"))
    if any(x is None for x in (in_w, in_b) + out + ln1 + ln2 + fc1 + fc2):
      continue
    if r.has(pre + "ls_1.gamma") or r.has(pre + "ln_attn.weight"):
      pass  # reported as unexpected keys by finish()
    q, k, v = ((in_w[j * width:(j + 1) * width], in_b[j * width:(j + 1) * width]) for j in range(3))
    blocks.append({
        "norm1": {"scale": ln1[0], "bias": ln1[1]},
        "attn": _attn_from_qkv(q, k, v, out, width, heads),
        "norm2": {"scale": ln2[0], "bias": ln2[1]},
        "mlp": {"fc1": {"kernel": fc1[0].T, "bias": fc1[1]},
                "fc2": {"kernel": fc2[0].T, "bias": fc2[1]}},
    })
  fields = {"eos_id": -1, "norm_eps": 1e-5, "vocab_size": int(vocab), "width": int(width),
            "depth": depth, "context_length": int(pos.shape[0]), "proj_bias": False,
            "mlp_dim": int(shape_of(sd, "transformer.resblocks.0.mlp.c_fc.weight")[0])
            if "transformer.resblocks.0.mlp.c_fc.weight" in sd else 4 * int(width)}
  fl = (r.get("ln_final.weight"), r.get("ln_final.bias"))
  params = {"token_embedding": {"embedding": tok}, "position_embedding": pos,
            "encoder": _stack(blocks, scan) if len(blocks) == depth else {},
            "final_norm": {"scale": fl[0], "bias": fl[1]}}
  if r.has("text_projection"):
    proj = r.get("text_projection")
    if proj.ndim == 2:
      params["projection"] = {"kernel": proj}
      fields["embed_dim"] = int(proj.shape[1])
  elif r.has("text_projection.weight"):  # open_clip with proj_type="linear"
    proj = r.get("text_projection.weight")
    params["projection"] = {"kernel": proj.T}
    fields["embed_dim"] = int(proj.shape[0])
    if r.has("text_projection.bias"):
      params["projection"]["bias"] = r.get("text_projection.bias")
      fields["proj_bias"] = True
  else:
    fields["embed_dim"] = 0
  r.finish(IGNORED_OPEN_CLIP)
  return _finish_fields(fields, {**overrides, "scan": scan}, int(width)), params
