"""timm VisionTransformer checkpoints -> pathjax ViT params.

Covers the timm layouts of the pathology encoders users hold: UNI (ViT-L/16, layer scale),
UNI2-h (register tokens, SwiGLU, `no_embed_class=True`), Virchow / Virchow2, H-optimus,
Prov-GigaPath tile. What the weights determine is read from them: width, depth, patch size,
MLP width and kind (GELU fc1/fc2, timm `SwiGLUPacked`/`GluMlp` packed fc1, timm `SwiGLU`
fc1_g/fc1_x, DINOv2 `w12`/`w3`), register tokens, class token, layer scale, biases,
pre-norm, final norm / fc_norm, head, and the position-embedding layout (whether prefix
tokens carry positions, and the checkpoint's grid). What they do not determine (heads,
LayerNorm eps, the activation of a non-gated MLP, pooling of a model without fc_norm) comes
from a variant name ("L/16", or a preset such as "uni2-h") or explicit fields.

timm name                         pathjax ViT param
patch_embed.proj.weight [D,C,p,p] patch_embed/kernel [p,p,C,D]
cls_token / reg_token / pos_embed cls_token / reg_token / pos_embed
blocks.{i}.norm1|norm2            encoder/blocks/norm1|norm2 (stacked on axis 0 with scan)
blocks.{i}.attn.qkv [3D,D]        encoder/blocks/attn/query|key|value/kernel [D,heads,hd]
blocks.{i}.attn.proj [D,D]        encoder/blocks/attn/out/kernel [heads,hd,D]
blocks.{i}.ls1|ls2.gamma          encoder/blocks/ls1|ls2/gamma
blocks.{i}.mlp.fc1|fc2            encoder/blocks/mlp/fc1|fc2 (or fc1_gate + fc1_up + fc2)
norm_pre / norm / fc_norm / head  norm_pre / norm / fc_norm / head
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from pathjax.convert.safetensors_io import PrefixView, TensorReader, WeightsError, shape_of
from pathjax.models import vit as vit_lib

# Prefixes stripped before mapping: open_clip / CONCH timm towers keep the trunk under
# "visual.trunk."; wrappers add "module." / "model.".
TRUNK_PREFIXES = ("visual.trunk.", "trunk.", "module.", "model.", "backbone.", "encoder.")

# Pathology presets: the fields the weights do not carry. width/patch are checked against
# the checkpoint so a wrong preset fails loudly.
PRESETS: dict[str, dict[str, Any]] = {
    "uni": dict(width=1024, num_heads=16, patch_size=16),           # UNI (ViT-L/16)
    "uni2-h": dict(width=1536, num_heads=24, patch_size=14),        # UNI2-h
    "virchow": dict(width=1280, num_heads=16, patch_size=14),       # Virchow (ViT-H/14)
    "virchow2": dict(width=1280, num_heads=16, patch_size=14),      # Virchow2 (ViT-H/14, 4 regs)
    "h-optimus-0": dict(width=1536, num_heads=24, patch_size=14),   # H-optimus-0 (ViT-g/14)
    "h-optimus-1": dict(width=1536, num_heads=24, patch_size=14),
    "gigapath": dict(width=1536, num_heads=24, patch_size=16),      # Prov-GigaPath tile (g/14-like, patch 16)
}


def valid_variants() -> list[str]:
  sizes = [f"{s}/{p}" for s in vit_lib.SIZES for p in (14, 16)]
  return sizes + list(PRESETS)


def variant_info(variant: str) -> dict[str, Any]:
  """width / num_heads / patch_size for a ViT variant ("L/16") or a preset ("uni2-h")."""
  if variant in PRESETS:
    return dict(PRESETS[variant])
  try:
    fields = vit_lib.variant_fields(variant)
  except ValueError:
    raise ValueError(f"unknown ViT variant {variant!r}; valid variants: "
                     f"{', '.join(valid_variants())}") from None
  return dict(width=fields["width"], num_heads=fields["num_heads"],
              patch_size=fields["patch_size"])


def strip_prefixes(sd: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], list[str]]:
  """Keeps the ViT trunk's tensors under a known prefix; returns (tensors, ignored keys)."""
  ignored: list[str] = []
  changed = True
  while changed and "patch_embed.proj.weight" not in sd:
    changed = False
    for prefix in TRUNK_PREFIXES:
      if f"{prefix}patch_embed.proj.weight" in sd:
        ignored += [k for k in sd if not k.startswith(prefix)]
        sd = PrefixView(sd, prefix)  # lazy: nothing is read here
        changed = True
        break
  if "patch_embed.proj.weight" not in sd:
    raise WeightsError("not a timm VisionTransformer checkpoint: no patch_embed.proj.weight "
                       f"(under any of the prefixes {', '.join(TRUNK_PREFIXES)}); keys start "
                       f"with: {', '.join(sorted(sd)[:8])}")
  return sd, ignored


def _norm(r: TensorReader, name: str) -> dict[str, np.ndarray]:
  return {"scale": r.get(f"{name}.weight"), "bias": r.get(f"{name}.bias")}


def _linear(r: TensorReader, name: str, bias: bool | None = None) -> dict[str, np.ndarray]:
  w = r.get(f"{name}.weight")
  out = {"kernel": None if w is None else w.T}
  if bias is None:
    bias = r.has(f"{name}.bias")
  if bias:
    out["bias"] = r.get(f"{name}.bias")
  return out


def _square(n: int) -> int | None:
  s = math.isqrt(n)
  return s if s * s == n else None


def infer_layout(sd: Mapping[str, np.ndarray], *, pos_embed_on_prefix: bool | None = None,
                 checkpoint_image_size: int | None = None) -> dict[str, Any]:
  """The ViT fields the weights determine (see the module docstring)."""
  w = shape_of(sd, "patch_embed.proj.weight")
  if len(w) != 4 or w[2] != w[3]:
    raise WeightsError(f"patch_embed.proj.weight has shape {w}; expected [D, C, p, p]")
  width, patch = int(w[0]), int(w[2])
  blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
  if not blocks:
    raise WeightsError("the checkpoint has no blocks.{i}.* tensors")
  depth = max(blocks) + 1
  class_token = "cls_token" in sd
  reg_tokens = int(shape_of(sd, "reg_token")[1]) if "reg_token" in sd else 0
  num_prefix = int(class_token) + reg_tokens

  if "blocks.0.mlp.fc2.weight" in sd:
    mlp_dim = int(shape_of(sd, "blocks.0.mlp.fc2.weight")[1])
    fc1_out = int(shape_of(sd, "blocks.0.mlp.fc1.weight")[0]) if "blocks.0.mlp.fc1.weight" in sd else None
    mlp_kind = "glu_packed" if fc1_out == 2 * mlp_dim else (
        "swiglu_split" if "blocks.0.mlp.fc1_g.weight" in sd else "fc")
  elif "blocks.0.mlp.w3.weight" in sd:
    mlp_dim = int(shape_of(sd, "blocks.0.mlp.w3.weight")[1])
    mlp_kind = "w12"
  else:
    raise WeightsError("cannot find the MLP of block 0 (mlp.fc1/fc2, mlp.fc1_g/fc1_x/fc2 or "
                       "mlp.w12/w3)")

  fields: dict[str, Any] = dict(
      width=width, depth=depth, patch_size=patch, mlp_dim=mlp_dim, class_token=class_token,
      reg_tokens=reg_tokens, layer_scale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
      pre_norm="norm_pre.weight" in sd, final_norm="norm.weight" in sd,
      qkv_bias="blocks.0.attn.qkv.bias" in sd, patch_bias="patch_embed.proj.bias" in sd,
      num_classes=int(shape_of(sd, "head.weight")[0]) if "head.weight" in sd else 0)
  if mlp_kind != "fc":
    fields["mlp_activation"] = "swiglu"
  if "fc_norm.weight" in sd:
    fields["pool"] = "avg_fc_norm"

  if "pos_embed" not in sd:
    fields.update(pos_embed="none", image_size=checkpoint_image_size or 224)
    return {**fields, "_mlp_kind": mlp_kind, "_grid": None}
  n = int(shape_of(sd, "pos_embed")[1])
  candidates = []  # (on_prefix, grid)
  for on_prefix in ((True, False) if num_prefix else (True,)):
    tokens = n - num_prefix if on_prefix else n
    grid = _square(tokens) if tokens > 0 else None
    if grid is not None:
      candidates.append((on_prefix, grid))
  if pos_embed_on_prefix is not None and num_prefix:
    candidates = [c for c in candidates if c[0] == pos_embed_on_prefix]
  if checkpoint_image_size is not None:
    if checkpoint_image_size % patch:
      raise WeightsError(f"checkpoint image size {checkpoint_image_size} is not a multiple of the "
                         f"patch size {patch}")
    candidates = [c for c in candidates if c[1] == checkpoint_image_size // patch]
  if not candidates:
    raise WeightsError(
        f"pos_embed has {n} positions, which fits no square grid with {num_prefix} prefix "
        f"tokens (class token {class_token}, {reg_tokens} registers) given the options; check "
        "--pos-embed-on-prefix / --checkpoint-image-size")
  if len(candidates) > 1:
    raise WeightsError(
        f"pos_embed with {n} positions and {num_prefix} prefix tokens is ambiguous (grids "
        f"{candidates[0][1]} with prefix positions, {candidates[1][1]} without); pass "
        "--checkpoint-image-size or --pos-embed-on-prefix/--no-pos-embed-on-prefix")
  on_prefix, grid = candidates[0]
  fields.update(pos_embed="learn", pos_embed_on_prefix=on_prefix or num_prefix == 0,
                image_size=grid * patch)
  return {**fields, "_mlp_kind": mlp_kind, "_grid": grid}


def convert_timm_vit(sd: Mapping[str, np.ndarray], *, variant: str | None = None,
                     image_size: int | None = None, scan: bool = True,
                     overrides: Mapping[str, Any] | None = None,
                     pos_embed_on_prefix: bool | None = None,
                     checkpoint_image_size: int | None = None,
                     source: str = "<state dict>") -> tuple[dict[str, Any], dict[str, Any]]:
  """Converts a timm ViT state dict (any mapping; a `SafetensorsReader` is read lazily, one
  tensor at a time); returns (ViT fields, params tree of numpy in the stored dtype).

  `variant` ("L/16", "uni2-h", ...) or `overrides["num_heads"]` supplies the heads;
  `overrides` sets any other ViT field the weights do not determine (norm_eps, pool,
  mlp_activation of a non-gated MLP, ...). `image_size` resizes the position embedding to
  that size with timm's bicubic (antialiased) resampling.
  """
  overrides = dict(overrides or {})
  sd, ignored = strip_prefixes(sd)
  layout = infer_layout(sd, pos_embed_on_prefix=pos_embed_on_prefix,
                        checkpoint_image_size=checkpoint_image_size)
  mlp_kind, grid = layout.pop("_mlp_kind"), layout.pop("_grid")
  width, patch = layout["width"], layout["patch_size"]

  if "num_heads" not in overrides:
    if variant is None:
      raise ValueError("the number of attention heads is not in the weights: pass a variant "
                       f"({', '.join(valid_variants())}) or num_heads")
    info = variant_info(variant)
    if info["width"] != width:
      raise WeightsError(f"the checkpoint has width {width} but variant {variant!r} has width "
                         f"{info['width']}; pick the matching variant or pass num_heads")
    overrides["num_heads"] = info["num_heads"]
  elif variant is not None:
    info = variant_info(variant)  # validates the name
  if variant is not None and info["patch_size"] != patch:
    raise WeightsError(f"the checkpoint has patch size {patch} but variant {variant!r} has "
                       f"{info['patch_size']}")
  heads = int(overrides["num_heads"])
  if width % heads:
    raise WeightsError(f"width {width} is not divisible by {heads} heads")
  hd = width // heads

  fields = {**layout, **overrides, "scan": scan}
  if mlp_kind != "fc" and fields.get("mlp_activation", "swiglu") != "swiglu":
    raise WeightsError(f"the checkpoint has a gated (SwiGLU) MLP; mlp_activation "
                       f"{fields['mlp_activation']!r} does not fit it")
  unknown = set(fields) - set(vit_lib.config_dict(vit_lib.ViT()))
  if unknown:
    raise ValueError(f"unknown ViT fields {sorted(unknown)}; valid: "
                     f"{', '.join(vit_lib.config_dict(vit_lib.ViT()))}")

  r = TensorReader(sd, source, what="the pathjax model")
  params: dict[str, Any] = {}
  kernel = r.get("patch_embed.proj.weight")
  params["patch_embed"] = {"kernel": kernel.transpose(2, 3, 1, 0)}
  if layout["patch_bias"]:
    params["patch_embed"]["bias"] = r.get("patch_embed.proj.bias")
  if layout["class_token"]:
    params["cls_token"] = r.get("cls_token")
  if layout["reg_tokens"]:
    params["reg_token"] = r.get("reg_token")
  if layout["pos_embed"] == "learn":
    params["pos_embed"] = _resize_pos_embed(
        r.get("pos_embed"), grid, patch, image_size or layout["image_size"],
        int(layout["class_token"]) + layout["reg_tokens"] if layout["pos_embed_on_prefix"] else 0)
    fields["image_size"] = image_size or layout["image_size"]
  if layout["pre_norm"]:
    params["norm_pre"] = _norm(r, "norm_pre")

  blocks = [_block(r, f"blocks.{i}.", width, heads, hd, mlp_kind, layout)
            for i in range(layout["depth"])]
  if layout["final_norm"]:
    params["norm"] = _norm(r, "norm")
  if "fc_norm.weight" in sd:
    params["fc_norm"] = _norm(r, "fc_norm")
  if layout["num_classes"]:
    params["head"] = _linear(r, "head")
  r.finish(note=" (features pathjax's ViT does not implement)")  # listed before stacking

  from pathjax.convert.safetensors_io import check_tree
  from pathjax.tree_utils import flatten, unflatten
  for i, b in enumerate(blocks[1:], 1):  # per-layer shapes must agree before stacking
    check_tree(blocks[0], b, what=f"blocks.{i}", source=source)
  if scan:
    flats = [flatten(b) for b in blocks]
    params["encoder"] = {"blocks": unflatten({k: np.stack([f[k] for f in flats]) for k in flats[0]})}
  else:
    params["encoder"] = {f"blocks_{i}": b for i, b in enumerate(blocks)}
  if fields.get("pool") == "avg_fc_norm" and layout["final_norm"]:
    raise WeightsError("the checkpoint has both norm and fc_norm; pathjax's avg_fc_norm pool "
                       "(timm's fc_norm) skips the final norm")
  return fields, params


def _block(r: TensorReader, pre: str, width: int, heads: int, hd: int, mlp_kind: str,
           layout: Mapping[str, Any]) -> dict[str, Any]:
  qkv_w = r.get(pre + "attn.qkv.weight")
  if qkv_w is None:
    qkv_w = np.zeros((3 * width, width), np.float32)
  if qkv_w.shape != (3 * width, width):
    raise WeightsError(f"shape mismatch for parameter {pre}attn.qkv.weight: checkpoint has "
                       f"{qkv_w.shape}, the model expects {(3 * width, width)}")
  attn: dict[str, Any] = {}
  qkv_b = r.get(pre + "attn.qkv.bias") if layout["qkv_bias"] else None
  for j, name in enumerate(("query", "key", "value")):
    attn[name] = {"kernel": qkv_w[j * width:(j + 1) * width].T.reshape(width, heads, hd)}
    if qkv_b is not None:
      attn[name]["bias"] = qkv_b[j * width:(j + 1) * width].reshape(heads, hd)
  proj_w = r.get(pre + "attn.proj.weight")
  if proj_w is not None and proj_w.shape != (width, width):
    raise WeightsError(f"shape mismatch for parameter {pre}attn.proj.weight: checkpoint has "
                       f"{proj_w.shape}, the model expects {(width, width)}")
  attn["out"] = {"kernel": None if proj_w is None else proj_w.T.reshape(heads, hd, width)}
  if layout["qkv_bias"] or r.has(pre + "attn.proj.bias"):
    attn["out"]["bias"] = r.get(pre + "attn.proj.bias")
  block: dict[str, Any] = {"norm1": _norm(r, pre + "norm1"), "attn": attn,
                           "norm2": _norm(r, pre + "norm2")}
  if layout["layer_scale_init"] is not None:
    block["ls1"] = {"gamma": r.get(pre + "ls1.gamma")}
    block["ls2"] = {"gamma": r.get(pre + "ls2.gamma")}
  m = pre + "mlp."
  if mlp_kind == "fc":
    mlp = {"fc1": _linear(r, m + "fc1"), "fc2": _linear(r, m + "fc2")}
  elif mlp_kind == "swiglu_split":  # timm SwiGLU: act(fc1_g(x)) * fc1_x(x)
    mlp = {"fc1_gate": _linear(r, m + "fc1_g"), "fc1_up": _linear(r, m + "fc1_x"),
           "fc2": _linear(r, m + "fc2")}
  else:  # packed: timm SwiGLUPacked (GluMlp, gate_last=False) or DINOv2 w12: act(x1) * x2
    fc1, fc2 = (m + "fc1", m + "fc2") if mlp_kind == "glu_packed" else (m + "w12", m + "w3")
    packed = _linear(r, fc1)
    if packed["kernel"] is None:
      return {**block, "mlp": {}}
    half = packed["kernel"].shape[1] // 2
    mlp = {"fc1_gate": {k: v[..., :half] for k, v in packed.items()},
           "fc1_up": {k: v[..., half:] for k, v in packed.items()},
           "fc2": _linear(r, fc2)}
  block["mlp"] = mlp
  return block


def _resize_pos_embed(pos: np.ndarray, grid: int, patch: int, image_size: int,
                      num_prefix: int) -> np.ndarray:
  if image_size % patch:
    raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
  new_grid = image_size // patch
  if new_grid == grid:
    return pos
  prefix, body = pos[:, :num_prefix], pos[:, num_prefix:].astype(np.float32)
  d = pos.shape[-1]
  body = vit_lib.resize_pos_embed_grid(body.reshape(grid, grid, d), (new_grid, new_grid))
  body = np.asarray(body).astype(pos.dtype)  # resampled in float32, stored as the checkpoint
  return np.concatenate([prefix, body.reshape(1, new_grid * new_grid, d)], axis=1)
