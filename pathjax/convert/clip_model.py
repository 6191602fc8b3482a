"""Full CLIP models (vision + text + projections) -> pathjax ViT and TextTransformer params.

PLIP, QuiltNet and CONCH-style CLIPs ship as a transformers `CLIPModel` (`vision_model.*`,
`text_model.*`, `visual_projection`, `text_projection`, `logit_scale`) or an open_clip
`CLIP` (`visual.*`, text at the top level). The text side is pathjax.convert.clip_text; this
module maps the vision side onto pathjax's ViT with CLIP's layout: conv patch embedding
without bias, class token, learned positions on every token, a LayerNorm before the blocks
(`pre_layrnorm` / `ln_pre`, ViT.pre_norm), pre-LN blocks, a LayerNorm on the class token
(`post_layernorm` / `ln_post`; ViT's final norm then class-token pooling is the same thing),
and the projection [W, E] stored as the tower's projection (y = pooled @ P).

transformers                                          pathjax ViT
  vision_model.embeddings.class_embedding [W]         cls_token [1, 1, W]
  vision_model.embeddings.patch_embedding.weight      patch_embed/kernel [p, p, 3, W]
  vision_model.embeddings.position_embedding.weight   pos_embed [1, 1 + g*g, W]
  vision_model.pre_layrnorm                           norm_pre
  vision_model.encoder.layers.{i}.*                   encoder/blocks (as the text tower)
  vision_model.post_layernorm                         norm
  visual_projection.weight [E, W]                     projection [W, E]
open_clip: visual.class_embedding, visual.conv1.weight, visual.positional_embedding,
  visual.ln_pre, visual.transformer.resblocks.{i}.*, visual.ln_post, visual.proj [W, E].

Heads are not in the weights: they come from the config (transformers config.json
`vision_config.num_attention_heads`, open_clip `vision_cfg.head_width`), else width / 64
(every OpenAI CLIP: B/16, B/32, L/14 and their text towers). Activation: transformers'
`hidden_act` (default quick_gelu); open_clip's `quick_gelu` flag of the model config, which
must then be given (the weights do not record it).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from pathjax.convert import clip_text
from pathjax.convert.safetensors_io import WeightsError, _listing

HEAD_WIDTH = 64   # OpenAI CLIP's attention head width (vision and text)
_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh"}


def detect_format(sd: Mapping[str, Any]) -> str:
  if any(k.startswith("vision_model.") for k in sd):
    return "hf"
  if any(k.startswith("visual.") for k in sd):
    return "open_clip"
  raise WeightsError("not a full CLIP checkpoint: no vision_model.* (transformers) or visual.* "
                     "(open_clip) tensors")


def fields_from_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(vision fields, text fields) from a transformers CLIPConfig or an open_clip model config."""
  if "vision_cfg" in config or "text_cfg" in config:
    vcfg = config.get("vision_cfg", {})
    vision: dict[str, Any] = {}
    if "width" in vcfg and "head_width" in vcfg:
      vision["num_heads"] = int(vcfg["width"]) // int(vcfg["head_width"])
    if "quick_gelu" in config:
      vision["mlp_activation"] = "quick_gelu" if config["quick_gelu"] else "gelu"
    return vision, clip_text.fields_from_open_clip_config(config)
  vcfg = config.get("vision_config", {})
  vision = {"mlp_activation": _ACT.get(vcfg.get("hidden_act", "quick_gelu"),
                                       vcfg.get("hidden_act", "quick_gelu"))}
  if "num_attention_heads" in vcfg:
    vision["num_heads"] = int(vcfg["num_attention_heads"])
  if "layer_norm_eps" in vcfg:
    vision["norm_eps"] = float(vcfg["layer_norm_eps"])
  return vision, clip_text.fields_from_hf_config(config)


def read_config(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  try:
    with open(path) as f:
      return fields_from_config(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read the CLIP config {path}: {e}") from e


class _Reader:
  def __init__(self, sd, source):
    self.sd, self.source, self.used, self.missing = sd, source, set(), []

  def get(self, key):
    if key not in self.sd:
      self.missing.append(key)
      return None
    self.used.add(key)
    return np.asarray(self.sd[key], np.float32)

  def pair(self, name):
    """(weight, bias) of a Linear or LayerNorm."""
    return self.get(name + ".weight"), self.get(name + ".bias")

  def finish(self, prefix_re: str):
    unexpected = sorted(k for k in self.sd if re.match(prefix_re, k) and k not in self.used
                        and not k.endswith("position_ids"))
    if self.missing or unexpected:
      parts = [f"checkpoint {self.source} does not match the pathjax CLIP vision tower:"]
      if self.missing:
        parts.append(f"missing keys ({len(self.missing)}): {_listing(self.missing)}")
      if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
      raise WeightsError("\n  ".join(parts))


def _block(norm1, attn, norm2, fc1, fc2):
  return {"norm1": {"scale": norm1[0], "bias": norm1[1]}, "attn": attn,
          "norm2": {"scale": norm2[0], "bias": norm2[1]},
          "mlp": {"fc1": {"kernel": fc1[0].T, "bias": fc1[1]},
                  "fc2": {"kernel": fc2[0].T, "bias": fc2[1]}}}


def _complete(*xs) -> bool:
  return all(x is not None for pair in xs for x in (pair if isinstance(pair, tuple) else (pair,)))


# The vision tower's tensors outside its blocks, per format (prefix-relative except
# "projection", which transformers keeps at the top level).
_VISION_NAMES = {
    "hf": dict(prefix="vision_model.", cls="embeddings.class_embedding",
               conv="embeddings.patch_embedding.weight",
               pos="embeddings.position_embedding.weight", pre="pre_layrnorm",
               post="post_layernorm", blocks="encoder.layers",
               projection="visual_projection.weight"),
    "open_clip": dict(prefix="visual.", cls="class_embedding", conv="conv1.weight",
                      pos="positional_embedding", pre="ln_pre", post="ln_post",
                      blocks="transformer.resblocks", projection="visual.proj"),
}


def convert_clip_vision(sd: Mapping[str, np.ndarray], *, fmt: str | None = None,
                        scan: bool = True, overrides: Mapping[str, Any] | None = None,
                        source: str = "<state dict>"
                        ) -> tuple[dict[str, Any], dict[str, Any], np.ndarray | None]:
  """(ViT fields, ViT params of numpy, projection [W, E] or None) of a CLIP vision tower."""
  fmt = fmt or detect_format(sd)
  overrides = dict(overrides or {})
  if fmt not in _VISION_NAMES:
    raise ValueError(f"unknown CLIP format {fmt!r}; valid: {', '.join(_VISION_NAMES)}")
  if fmt == "open_clip" and "mlp_activation" not in overrides:
    raise ValueError("open_clip weights do not record the activation: pass the open_clip model "
                     "config (--clip-config) or --clip-activation quick_gelu (OpenAI-initialised "
                     "models: PLIP, QuiltNet) | gelu")
  names = _VISION_NAMES[fmt]
  p = names["prefix"]
  r = _Reader(sd, source)
  cls, conv, pos = (r.get(p + names[k]) for k in ("cls", "conv", "pos"))
  pre, post = r.pair(p + names["pre"]), r.pair(p + names["post"])
  layer_re = re.escape(p + names["blocks"]) + r"\.(\d+)\."
  projection = None
  if names["projection"] in sd:  # transformers stores it [E, W] (a Linear), open_clip [W, E]
    projection = r.get(names["projection"])
    projection = projection.T if fmt == "hf" else projection
  if conv is None or pos is None or cls is None:
    r.finish(re.escape(p))
  width, _, patch, _ = conv.shape
  grid = int(round(np.sqrt(pos.shape[0] - 1)))
  if grid * grid + 1 != pos.shape[0]:
    raise WeightsError(f"{source}: {pos.shape[0]} position embeddings are not 1 + a square grid")
  depth = clip_text._depth(sd, layer_re)
  heads = int(overrides.pop("num_heads", 0) or width // HEAD_WIDTH)
  if width % heads:
    raise WeightsError(f"vision width {width} is not divisible by {heads} heads")
  blocks = []
  for i in range(depth):
    q = f"{p}{names['blocks']}.{i}."
    if fmt == "hf":
      qkv = [r.pair(f"{q}self_attn.{n}_proj") for n in ("q", "k", "v")]
      out = r.pair(q + "self_attn.out_proj")
      n1, n2, fc1, fc2 = (r.pair(q + n)
                          for n in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"))
    else:
      in_w, in_b = r.get(q + "attn.in_proj_weight"), r.get(q + "attn.in_proj_bias")
      out = r.pair(q + "attn.out_proj")
      n1, n2, fc1, fc2 = (r.pair(q + n) for n in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"))
      if in_w is None or in_b is None:
        continue
      qkv = [(in_w[j * width:(j + 1) * width], in_b[j * width:(j + 1) * width]) for j in range(3)]
    if not _complete(*qkv, out, n1, n2, fc1, fc2):
      continue
    attn = clip_text._attn_from_qkv(*qkv, out, width, heads)
    blocks.append(_block(n1, attn, n2, fc1, fc2))
  r.finish(f"({re.escape(p)}|{re.escape(names['projection'])})")
  mlp_dim = blocks[0]["mlp"]["fc1"]["kernel"].shape[1]
  fields = dict(width=int(width), depth=depth, num_heads=heads, mlp_dim=int(mlp_dim),
                patch_size=int(patch), image_size=int(grid * patch), class_token=True,
                reg_tokens=0, pos_embed="learn", pos_embed_on_prefix=True,
                layer_scale_init=None, mlp_activation="quick_gelu", pre_norm=True,
                final_norm=True, pool="cls", norm_eps=1e-5, qkv_bias=True, patch_bias=False,
                num_classes=0, scan=scan)
  fields.update(overrides)
  params = {"patch_embed": {"kernel": conv.transpose(2, 3, 1, 0)},
            "cls_token": cls.reshape(1, 1, width), "pos_embed": pos[None],
            "norm_pre": {"scale": pre[0], "bias": pre[1]},
            "encoder": clip_text._stack(blocks, scan),
            "norm": {"scale": post[0], "bias": post[1]}}
  return fields, params, projection


def text_state_dict(sd: Mapping[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
  """The text part of a full CLIP state dict, as pathjax.convert.clip_text reads it."""
  if fmt == "hf":
    return {k: v for k, v in sd.items() if k.startswith("text_model.") or k.startswith("text_projection")}
  return {k: v for k, v in sd.items() if not k.startswith("visual.")}


def convert_clip(sd: Mapping[str, np.ndarray], *, fmt: str | None = None, scan: bool = True,
                 vision_fields: Mapping[str, Any] | None = None,
                 text_fields: Mapping[str, Any] | None = None, source: str = "<state dict>"
                 ) -> dict[str, Any]:
  """Both towers of a full CLIP: {"vision": (fields, params, projection), "text": (fields,
  params), "logit_scale": float or None, "format": "hf" | "open_clip"}."""
  fmt = fmt or detect_format(sd)
  vision = convert_clip_vision(sd, fmt=fmt, scan=scan, overrides=vision_fields, source=source)
  tsd = text_state_dict(sd, fmt)
  text_fields = dict(text_fields or {})
  if "num_heads" not in text_fields:
    tok = tsd.get("text_model.embeddings.token_embedding.weight", tsd.get("token_embedding.weight"))
    if tok is None:
      raise WeightsError(f"{source}: no text tower (text_model.* or token_embedding.weight)")
    text_fields["num_heads"] = int(np.shape(tok)[1]) // HEAD_WIDTH
  if fmt == "open_clip" and "activation" not in text_fields:
    text_fields["activation"] = vision[0]["mlp_activation"]
  text = clip_text.convert_clip_text(tsd, fmt=fmt, scan=scan, overrides=text_fields, source=source)
  scale = sd.get("logit_scale")
  return {"vision": vision, "text": text, "format": fmt,
          "logit_scale": None if scale is None else float(np.asarray(scale, np.float32).reshape(()))}
