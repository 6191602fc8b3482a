"""Parity with timm: random-weight timm ViTs -> safetensors -> `pathjax convert` -> same features.

Needs the `reference` extra (torch 2.14.1, torchvision 0.29.1, timm); skipped without it.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity references need torch (pip install -e .[reference])")
timm = pytest.importorskip("timm", reason="ViT parity references need timm (pip install -e .[reference])")

from safetensors.torch import save_file  # noqa: E402
from timm.layers import SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn  # noqa: E402

from pathjax.convert import cli as convert_cli  # noqa: E402
from pathjax.models.model_dir import load_model_dir  # noqa: E402

pytestmark = pytest.mark.reference

TOL = 1e-4

# Small widths/depths, real structures.
CASES = {
    # UNI: ViT-L/16 structure (class token, layer scale init 1e-5, GELU MLP, cls pooling).
    "uni": dict(img_size=224, patch_size=16, embed_dim=64, depth=3, num_heads=4,
                init_values=1e-5, num_classes=0),
    # UNI2-h: 8 registers, no position embedding on prefix tokens, SwiGLUPacked + SiLU, patch 14.
    "uni2h": dict(img_size=224, patch_size=14, embed_dim=96, depth=2, num_heads=4,
                  init_values=1e-5, num_classes=0, reg_tokens=8, no_embed_class=True,
                  mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.66667 * 2),
    # Virchow2 / H-optimus style: registers that do carry positions, GELU MLP.
    "reg_on_prefix": dict(img_size=224, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                          init_values=1e-5, num_classes=0, reg_tokens=4),
    # Average pooling with fc_norm, a classifier head, no layer scale.
    "avg_fc_norm_head": dict(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                             global_pool="avg", fc_norm=True, num_classes=5),
}


def _randomize(model, seed=0):
  """Non-trivial weights: random gammas (not 1e-5), norms away from 1/0, random tokens."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(torch.rand(p.shape, generator=gen) * 0.6 + 0.2)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _save(model, path):
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _images(n, size, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _timm_forward(model, images):
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return model(x).numpy(), model.forward_features(x).numpy()


def _normalised(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _compare(ours, ref):
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=1e-4)
  assert np.abs(_normalised(ours) - _normalised(ref)).max() <= TOL


def _convert(tmp_path, ckpt, name, *extra):
  out = tmp_path / name
  parser = __import__("argparse").ArgumentParser()
  convert_cli.register(parser)
  args = parser.parse_args(["--vision", str(ckpt), "--vision-format", "timm", "--out", str(out),
                            *extra])
  assert convert_cli.main(args) == 0
  return load_model_dir(str(out))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
def test_timm_vit_parity(tmp_path, case, scan):
  kw = CASES[case]
  ref = _randomize(VisionTransformer(**kw), seed=len(case))
  ckpt = tmp_path / "model.safetensors"
  _save(ref, ckpt)
  extra = ["--num-heads", str(kw["num_heads"])] + ([] if scan else ["--no-scan"])
  model = _convert(tmp_path, ckpt, "out", *extra)
  images = _images(2, kw["img_size"])
  ref_out, ref_tokens = _timm_forward(ref, images)
  _compare(model.encode_image(images), ref_out)
  if kw.get("global_pool") != "avg":  # timm's forward_features applies norm; avg_fc_norm skips it
    _compare(model.encode_image(images, output="tokens"), ref_tokens)


def test_uni_variant_name_gives_heads(tmp_path):
  """`--vision-variant` supplies the heads; a wrong-width variant is refused."""
  kw = dict(CASES["uni"], embed_dim=192, num_heads=3)
  ref = _randomize(VisionTransformer(**kw), seed=3)
  ckpt = tmp_path / "model.safetensors"
  _save(ref, ckpt)
  model = _convert(tmp_path, ckpt, "out", "--vision-variant", "Ti/16")
  images = _images(2, 224, seed=1)
  _compare(model.encode_image(images), _timm_forward(ref, images)[0])


@pytest.mark.parametrize("case", ["uni", "uni2h"])
def test_non_224_input_size(tmp_path, case):
  """Checkpoint at 224, model at 256: pos-embed resized like timm's resample_abs_pos_embed."""
  kw = CASES[case]
  src = _randomize(VisionTransformer(**kw), seed=7)
  ckpt = tmp_path / "model.safetensors"
  _save(src, ckpt)
  size = 256 if kw["patch_size"] == 16 else 266  # 16 and 19 patches per side
  # timm's own path: a model built at the new size loads the 224 checkpoint through
  # checkpoint_filter_fn, which resamples pos_embed (bicubic, antialias) for it.
  ref = VisionTransformer(**{**kw, "img_size": size}).eval()
  ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref))
  model = _convert(tmp_path, ckpt, "out", "--num-heads", str(kw["num_heads"]),
                   "--image-size", str(size))
  assert model.image_size == size
  images = _images(2, size, seed=2)
  ref_out, ref_tokens = _timm_forward(ref, images)
  _compare(model.encode_image(images), ref_out)
  _compare(model.encode_image(images, output="tokens"), ref_tokens)


def test_dynamic_size_uses_same_resampling_as_timm(tmp_path):
  """timm's dynamic_img_size resamples at run time; the converted model resized ahead of time
  agrees with it."""
  kw = dict(CASES["uni"], dynamic_img_size=True)
  ref = _randomize(VisionTransformer(**kw), seed=11)
  ckpt = tmp_path / "model.safetensors"
  _save(ref, ckpt)
  model = _convert(tmp_path, ckpt, "out", "--num-heads", "4", "--image-size", "192")
  images = _images(2, 192, seed=3)
  _compare(model.encode_image(images), _timm_forward(ref, images)[0])


def test_prefixed_open_clip_trunk(tmp_path):
  """CONCH / open_clip timm towers keep the ViT under visual.trunk.; other keys are ignored."""
  kw = CASES["uni"]
  ref = _randomize(VisionTransformer(**kw), seed=5)
  sd = {f"visual.trunk.{k}": v.contiguous() for k, v in ref.state_dict().items()}
  sd["visual.head.proj.weight"] = torch.zeros(8, 64)
  sd["text.token_embedding.weight"] = torch.zeros(10, 8)
  ckpt = tmp_path / "clip.safetensors"
  save_file(sd, str(ckpt))
  model = _convert(tmp_path, ckpt, "out", "--num-heads", "4")
  images = _images(1, 224, seed=4)
  _compare(model.encode_image(images), _timm_forward(ref, images)[0])


def test_resample_matches_torch_interpolate():
  import torch.nn.functional as F

  from pathjax.models.resample import bicubic_resize_torch
  rng = np.random.default_rng(0)
  for (h, w, nh, nw) in [(14, 14, 16, 16), (16, 16, 14, 14), (14, 14, 37, 37), (37, 37, 5, 5),
                         (7, 9, 13, 4)]:
    x = rng.standard_normal((h, w, 5))
    for aa in (True, False):
      ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(nh, nw),
                          mode="bicubic", align_corners=False, antialias=aa)[0].permute(1, 2, 0)
      np.testing.assert_allclose(bicubic_resize_torch(x, (nh, nw), antialias=aa), ref.numpy(),
                                 atol=1e-12)
