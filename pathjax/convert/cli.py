"""`pathjax convert`: published weights (safetensors) -> a pathjax model directory.

  pathjax convert --vision UNI/model.safetensors --vision-format timm --vision-variant uni \\
      --out models/uni
  pathjax convert --vision uni2h.safetensors --vision-variant uni2-h --image-size 256 \\
      --text plip/model.safetensors --text-format hf --text-config plip/config.json \\
      --tokenizer plip/ --out models/mix
  pathjax convert --bert bert-base-uncased/ --bert-encoder-width 384 --out models/qformer
  pathjax convert --llm Qwen3-0.6B/ --out models/qwen3
  pathjax convert --clip plip/model.safetensors --clip-config plip/config.json \
      --tokenizer plip/ --out models/plip          # a full CLIP: PLIP, QuiltNet, CONCH-style

Reads with numpy only (no torch, no pickle). Prints what it inferred from the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pathjax.convert.safetensors_io import WeightsError


def _kv(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    parsed = json.loads(value)
  except json.JSONDecodeError:
    parsed = value
  return key, parsed


def register(parser: argparse.ArgumentParser) -> None:
  from pathjax.convert import timm_vit
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__
  v = parser.add_argument_group("vision tower")
  v.add_argument("--vision", metavar="PATH", help="vision weights (.safetensors, a sharded "
                 ".index.json, or a directory of .safetensors)")
  v.add_argument("--vision-format", default="timm", choices=["timm"])
  v.add_argument("--vision-variant", metavar="NAME",
                 help="supplies the heads (not in the weights): " + ", ".join(timm_vit.valid_variants()))
  v.add_argument("--image-size", type=int, help="image size of the converted model (position "
                 "embeddings are resized with timm's bicubic); default: the checkpoint's")
  v.add_argument("--checkpoint-image-size", type=int,
                 help="the checkpoint's image size, when the position-embedding grid is ambiguous")
  v.add_argument("--pos-embed-on-prefix", dest="pos_embed_on_prefix", action="store_true",
                 default=None, help="prefix tokens carry positions (timm no_embed_class=False)")
  v.add_argument("--no-pos-embed-on-prefix", dest="pos_embed_on_prefix", action="store_false",
                 help="prefix tokens carry no positions (timm no_embed_class=True, UNI2-h)")
  v.add_argument("--num-heads", type=int, help="attention heads (overrides the variant)")
  v.add_argument("--norm-eps", type=float, help="LayerNorm eps (timm ViT: 1e-6, the default)")
  v.add_argument("--pool", choices=["cls", "avg", "avg_fc_norm", "none"],
                 help="pooling (default: cls, or avg_fc_norm when the weights have fc_norm)")
  v.add_argument("--mlp-activation", choices=["gelu", "gelu_tanh", "quick_gelu", "relu", "silu",
                                              "swiglu"],
                 help="activation of a non-gated MLP (gated MLPs are detected: swiglu)")
  v.add_argument("--layer-scale", type=float, metavar="INIT",
                 help="layer-scale init value recorded in the config (gammas come from the weights)")
  v.add_argument("--vision-field", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                 help="any other ViT field (JSON value), e.g. --vision-field qkv_bias=false")
  t = parser.add_argument_group("text tower")
  t.add_argument("--text", metavar="PATH", help="text weights (.safetensors): a transformers "
                 "CLIP(Text)Model or an open_clip model")
  t.add_argument("--text-format", default="auto", choices=["auto", "hf", "open_clip"])
  t.add_argument("--text-config", metavar="JSON", help="transformers config.json or open_clip "
                 "model config (heads, activation, eos pooling)")
  t.add_argument("--text-heads", type=int)
  t.add_argument("--text-activation", choices=["quick_gelu", "gelu", "gelu_tanh"])
  t.add_argument("--text-eos-id", type=int, help="pool at the first occurrence of this id "
                 "(-1: at argmax(ids), as open_clip)")
  t.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory copied into the model")
  q = parser.add_argument_group(
      "Q-Former from BERT (PathAlign; writes a model directory with one 'qformer' tower)")
  q.add_argument("--bert", metavar="DIR", help="Hugging Face BERT directory (config.json, "
                 "*.safetensors, tokenizer files); [DEC] is added to the tokenizer")
  q.add_argument("--bert-encoder-width", type=int, metavar="D",
                 help="width of the patch features the Q-Former cross-attends to (required)")
  q.add_argument("--bert-queries", type=int, metavar="N", help="learned queries (default 32)")
  q.add_argument("--bert-cross-attention-frequency", type=int, metavar="K",
                 help="cross-attention in layers i %% K == 0 (default 2)")
  q.add_argument("--bert-embed-dim", type=int, metavar="E", help="ITC projection size (default 256)")
  q.add_argument("--bert-field", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                 help="any other Q-Former field (JSON value), e.g. --bert-field vision_width=768")
  q.add_argument("--bert-seed", type=int, default=0, help="seed of the parts BERT lacks")
  # --- decoder LLM (pathjax/convert/hf_llm.py) ---
  lm = parser.add_argument_group("decoder LLM")
  lm.add_argument("--llm", metavar="DIR", help="a Hugging Face causal LM directory (config.json, "
                  "model.safetensors or a sharded index, tokenizer files): Llama, Qwen2, Qwen3; "
                  "converted alone (no --vision/--text)")
  # --- end decoder LLM ---
  c = parser.add_argument_group(
      "full CLIP model (vision + text + projections; instead of --vision/--text)")
  c.add_argument("--clip", metavar="PATH", help="a transformers CLIPModel (vision_model.*, "
                 "text_model.*) or open_clip CLIP (visual.*) checkpoint (.safetensors)")
  c.add_argument("--clip-format", default="auto", choices=["auto", "hf", "open_clip"])
  c.add_argument("--clip-config", metavar="JSON", help="transformers config.json or open_clip "
                 "model config (heads, activation, eps; default heads: width / 64)")
  c.add_argument("--clip-activation", choices=["quick_gelu", "gelu"],
                 help="activation of both towers (open_clip weights do not record it)")
  o = parser.add_argument_group("output")
  o.add_argument("--out", required=True, metavar="DIR",
                 help="new (or empty) model directory; an existing model directory is replaced "
                 "only with --overwrite, anything else is never touched")
  o.add_argument("--overwrite", action="store_true",
                 help="replace an existing pathjax model directory at --out")
  o.add_argument("--mean", type=float, nargs=3, help="normalisation mean (default ImageNet; "
                 "CLIP's with --clip)")
  o.add_argument("--std", type=float, nargs=3, help="normalisation std (default ImageNet; "
                 "CLIP's with --clip)")
  o.add_argument("--no-scan", dest="scan", action="store_false",
                 help="store per-layer params (blocks_{i}) instead of stacked (scan)")


def vision_overrides(args) -> dict[str, Any]:
  out: dict[str, Any] = dict(args.vision_field or [])
  for flag, field in (("num_heads", "num_heads"), ("norm_eps", "norm_eps"), ("pool", "pool"),
                      ("mlp_activation", "mlp_activation"), ("layer_scale", "layer_scale_init")):
    value = getattr(args, flag, None)
    if value is not None:
      out[field] = value
  return out


def text_overrides(args) -> dict[str, Any]:
  from pathjax.convert import clip_text
  out: dict[str, Any] = {}
  if args.text_config:
    out.update(clip_text.fields_from_config_file(args.text_config))
  for flag, field in (("text_heads", "num_heads"), ("text_activation", "activation"),
                      ("text_eos_id", "eos_id")):
    value = getattr(args, flag, None)
    if value is not None:
      out[field] = value
  return out


def convert(*, out: str, vision: str | None = None, vision_format: str = "timm",
            vision_variant: str | None = None, image_size: int | None = None,
            vision_fields: dict[str, Any] | None = None, pos_embed_on_prefix: bool | None = None,
            checkpoint_image_size: int | None = None, text: str | None = None,
            text_format: str = "auto", text_fields: dict[str, Any] | None = None,
            tokenizer: str | None = None, mean=None, std=None, scan: bool = True,
            overwrite: bool = False, log=print) -> str:
  """Library entry point of `pathjax convert`; returns the model directory."""
  from pathjax.convert import clip_text, timm_vit
  from pathjax.convert.safetensors_io import open_safetensors
  from pathjax.models import model_dir, text as text_lib, vit as vit_lib
  if not vision and not text:
    raise ValueError("nothing to convert: pass --vision and/or --text")
  model_dir._check_out_dir(os.path.abspath(out), overwrite)  # before minutes of reading weights
  towers: dict[str, dict[str, Any]] = {}
  preprocess: dict[str, Any] = {}
  sources = []
  if vision:
    if vision_format != "timm":
      raise ValueError(f"unknown vision format {vision_format!r}; valid: timm")
    sd = open_safetensors(vision)
    fields, params = timm_vit.convert_timm_vit(
        sd, variant=vision_variant, image_size=image_size, scan=scan,
        overrides=vision_fields, pos_embed_on_prefix=pos_embed_on_prefix,
        checkpoint_image_size=checkpoint_image_size, source=vision)
    module = vit_lib.ViT(**fields)
    towers["vision"] = dict(kind="vit", module=module, params=params, projection=None)
    preprocess = {"image_size": module.image_size,
                  "mean": list(mean or model_dir.IMAGENET_MEAN),
                  "std": list(std or model_dir.IMAGENET_STD)}
    log(f"vision: timm ViT width {module.width}, depth {module.depth}, heads {module.num_heads}, "
        f"patch {module.patch_size}, mlp {module.mlp_dim} ({module.mlp_activation}), "
        f"registers {module.reg_tokens}, layer scale {module.layer_scale_init is not None}, "
        f"pos on prefix {module.pos_embed_on_prefix}, image size {module.image_size}, "
        f"pool {module.pool}")
    sources.append(f"vision: {vision} ({vision_format}, variant {vision_variant})")
  if text:
    sd = open_safetensors(text)
    fmt = None if text_format == "auto" else text_format
    fields, params = clip_text.convert_clip_text(sd, fmt=fmt, scan=scan, overrides=text_fields,
                                                 source=text)
    module = text_lib.TextTransformer(**fields)
    towers["text"] = dict(kind="clip_text", module=module, params=params, projection=None)
    log(f"text: CLIP text width {module.width}, depth {module.depth}, heads {module.num_heads}, "
        f"context {module.context_length}, vocab {module.vocab_size}, embed {module.embed_dim}, "
        f"{module.activation}, eos_id {module.eos_id}")
    sources.append(f"text: {text} ({fmt or clip_text.detect_format(sd)})")
  path = model_dir.save_model_dir(out, towers, preprocess=preprocess or None,
                                  tokenizer_dir=tokenizer, source="; ".join(sources),
                                  overwrite=overwrite)
  log(f"wrote {path}")
  return path


def _main_bert(args) -> int:
  from pathjax.convert import bert
  if args.vision or args.text or args.tokenizer:
    print("pathjax convert: error: --bert writes a Q-Former-only model directory; convert "
          "--vision/--text/--tokenizer in a separate run", file=sys.stderr)
    return 2
  if not args.bert_encoder_width:
    print("pathjax convert: error: --bert needs --bert-encoder-width D (the patch feature "
          "width, e.g. 384 for ViT-S features)", file=sys.stderr)
    return 2
  overrides = dict(args.bert_field or [])
  for flag, field in (("bert_queries", "num_queries"),
                      ("bert_cross_attention_frequency", "cross_attention_frequency"),
                      ("bert_embed_dim", "embed_dim")):
    if getattr(args, flag) is not None:
      overrides[field] = getattr(args, flag)
  try:
    bert.convert_bert_dir(args.bert, args.out, encoder_width=args.bert_encoder_width,
                          overrides=overrides, seed=args.bert_seed, overwrite=args.overwrite)
  except (WeightsError, ValueError, FileNotFoundError) as e:
    print(f"pathjax convert: error: {e}", file=sys.stderr)
    return 2
  return 0


def convert_full_clip(*, out: str, clip: str, fmt: str = "auto", config: str | None = None,
                      activation: str | None = None, tokenizer: str | None = None, mean=None,
                      std=None, scan: bool = True, overwrite: bool = False, log=print) -> str:
  """A full CLIP checkpoint -> a model directory with a vision tower (+ projection) and a
  text tower, evaluated by `pathjax eval` like any other model directory."""
  from pathjax.convert import clip_model
  from pathjax.convert.safetensors_io import load_safetensors
  from pathjax.models import model_dir, text as text_lib, vit as vit_lib
  vision_fields, text_fields = clip_model.read_config(config) if config else ({}, {})
  if activation:
    vision_fields["mlp_activation"] = text_fields["activation"] = activation
  sd = load_safetensors(clip)
  conv = clip_model.convert_clip(sd, fmt=None if fmt == "auto" else fmt, scan=scan,
                                 vision_fields=vision_fields, text_fields=text_fields,
                                 source=clip)
  (vf, vp, projection), (tf, tp) = conv["vision"], conv["text"]
  vision, text = vit_lib.ViT(**vf), text_lib.TextTransformer(**tf)
  if projection is None or not text.embed_dim:
    raise ValueError(f"{clip}: a full CLIP needs both projections (visual_projection / "
                     f"visual.proj and text_projection) to share an embedding space")
  if projection.shape[1] != text.embed_dim:
    raise ValueError(f"{clip}: the vision projection maps to {projection.shape[1]} dims, the "
                     f"text projection to {text.embed_dim}")
  towers = {"vision": dict(kind="vit", module=vision, params=vp, projection=projection),
            "text": dict(kind="clip_text", module=text, params=tp, projection=None)}
  preprocess = {"image_size": vision.image_size, "mean": list(mean or model_dir.CLIP_MEAN),
                "std": list(std or model_dir.CLIP_STD)}
  log(f"vision: CLIP ViT ({conv['format']}) width {vision.width}, depth {vision.depth}, heads "
      f"{vision.num_heads}, patch {vision.patch_size}, image size {vision.image_size}, "
      f"{vision.mlp_activation}, projection {tuple(projection.shape)}")
  log(f"text: CLIP text width {text.width}, depth {text.depth}, heads {text.num_heads}, context "
      f"{text.context_length}, vocab {text.vocab_size}, embed {text.embed_dim}, "
      f"{text.activation}, eos_id {text.eos_id}; logit scale {conv['logit_scale']}")
  path = model_dir.save_model_dir(out, towers, preprocess=preprocess, tokenizer_dir=tokenizer,
                                  source=f"clip: {clip} ({conv['format']})", overwrite=overwrite)
  log(f"wrote {path}")
  return path


def main(args) -> int:
  if getattr(args, "bert", None):
    return _main_bert(args)
  from pathjax.convert import clip_text  # noqa: F401  (import errors surface here)
  # --- decoder LLM ---
  if getattr(args, "llm", None):
    from pathjax.convert import hf_llm
    from pathjax.models.llm import LLMConfigError
    if args.vision or args.text:
      print("pathjax convert: error: --llm converts a decoder LLM alone; run --vision/--text "
            "separately", file=sys.stderr)
      return 2
    try:
      hf_llm.convert_to_model_dir(args.llm, args.out, scan=args.scan, overwrite=args.overwrite)
    except (WeightsError, LLMConfigError, ValueError, FileNotFoundError) as e:
      print(f"pathjax convert: error: {e}", file=sys.stderr)
      return 2
    return 0
  # --- end decoder LLM ---
  try:
    if getattr(args, "clip", None):
      if args.vision or args.text:
        raise ValueError("--clip converts both towers: drop --vision/--text")
      convert_full_clip(out=args.out, clip=args.clip, fmt=args.clip_format,
                        config=args.clip_config, activation=args.clip_activation,
                        tokenizer=args.tokenizer, mean=args.mean, std=args.std, scan=args.scan,
                        overwrite=args.overwrite)
      return 0
    convert(out=args.out, vision=args.vision, vision_format=args.vision_format,
            vision_variant=args.vision_variant, image_size=args.image_size,
            vision_fields=vision_overrides(args), pos_embed_on_prefix=args.pos_embed_on_prefix,
            checkpoint_image_size=args.checkpoint_image_size, text=args.text,
            text_format=args.text_format, text_fields=text_overrides(args) if args.text else None,
            tokenizer=args.tokenizer, mean=args.mean, std=args.std, scan=args.scan,
            overwrite=args.overwrite)
  except (WeightsError, ValueError, FileNotFoundError) as e:
    print(f"pathjax convert: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # permissions, a full disk: name the path, no traceback
    print(f"pathjax convert: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
    return 2
  return 0
