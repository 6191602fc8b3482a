"""Decoding and augmentation of patches in the input workers (uint8 in, uint8 out).

Everything here runs on the host in Grain worker processes and emits uint8 HWC arrays;
normalisation happens on the device (`normalize_on_device`), which keeps host work and
host-to-device bytes small.

Augmentations (each a config switch, `augment_config()` has the defaults):

* `dihedral`: random flips (`flip`) and 90-degree rotations (`rotate90`); pathology has no
  canonical orientation. PIL transposes, no resampling.
* colour jitter (`brightness`, `contrast`, `saturation`, `hue`): composed into one 3x4 affine
  RGB matrix (hue is a rotation in YIQ space, saturation a blend towards luma) applied by
  PIL's C colour-matrix conversion in a single pass.
* `hed_sigma` (off by default, costs about a millisecond per 224 px patch): light stain
  jitter in optical density space: OD' = OD @ (M^-1 diag(a) M) + b @ M, with a ~ 1 + N(0, s),
  b ~ N(0, s/2) per haematoxylin/eosin/DAB channel (the Ruifrok-Johnston HED basis).
* `crop_scale` (off by default, (1, 1)): random resized crop of a fraction of the area in
  that range, resized back to the output size. It changes the apparent magnification, so
  MR-PLIP keeps it off by default.

`consistent=True` applies the same random parameters to every patch of an example (so a
parent and its child keep their spatial correspondence); `False` draws them per patch.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL transpose ops for the 8 elements of the dihedral group (None = identity).
_T = Image.Transpose
_DIHEDRAL = (None, _T.FLIP_LEFT_RIGHT, _T.FLIP_TOP_BOTTOM, _T.ROTATE_180,
             _T.ROTATE_90, _T.ROTATE_270, _T.TRANSPOSE, _T.TRANSVERSE)
_FLIPS_ONLY = (0, 1, 2, 3)       # identity, lr, tb, both (= rotate 180)
_ROTATIONS_ONLY = (0, 4, 3, 5)   # 0, 90, 180, 270 degrees

# RGB -> YIQ and back (NTSC); hue rotates the IQ plane.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
_LUMA = np.array([0.299, 0.587, 0.114])
# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.
_HED_FROM_RGB_INV = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _HED_FROM_RGB_INV / np.linalg.norm(_HED_FROM_RGB_INV, axis=1, keepdims=True)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED[2] /= np.linalg.norm(_RGB_FROM_HED[2])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0).astype(np.float32)


def augment_config(enabled: bool = True) -> ml_collections.ConfigDict:
  """Defaults for `config.input.augment`."""
  c = ml_collections.ConfigDict()
  c.enabled = enabled
  c.flip = True
  c.rotate90 = True
  c.brightness = 0.1   # factor in [1 - b, 1 + b]
  c.contrast = 0.1
  c.saturation = 0.1
  c.hue = 0.02         # fraction of a full turn, in [-h, h]
  c.hed_sigma = 0.0    # 0 = off; 0.03-0.05 is a light stain jitter
  c.crop_scale = (1.0, 1.0)  # random resized crop area range; (1, 1) = off
  c.consistent = False  # same parameters for every patch of an example
  return c


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """A plain, picklable copy of `config.input.augment` (ConfigDict lookups are slow)."""
  enabled: bool = True
  flip: bool = True
  rotate90: bool = True
  brightness: float = 0.1
  contrast: float = 0.1
  saturation: float = 0.1
  hue: float = 0.02
  hed_sigma: float = 0.0
  crop_scale: tuple[float, float] = (1.0, 1.0)
  consistent: bool = False

  @classmethod
  def from_config(cls, cfg) -> "AugmentSpec":
    if cfg is None:
      return cls(enabled=False)
    if isinstance(cfg, cls):
      return cfg
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    kwargs = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
    kwargs["crop_scale"] = tuple(float(v) for v in kwargs["crop_scale"])
    return cls(**kwargs)


def decode_jpeg(data: bytes, size: int | None = None) -> Image.Image:
  """Decodes JPEG bytes to an RGB PIL image, resized to `size` x `size` if given."""
  im = Image.open(io.BytesIO(data))
  if size is not None and im.size != (size, size) and min(im.size) >= 2 * size:
    im.draft("RGB", (size, size))  # DCT-domain downscale: much faster for big patches
  if im.mode != "RGB":
    im = im.convert("RGB")
  if size is not None and im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BILINEAR)
  return im


def decode_to_array(data: bytes, size: int | None = None) -> np.ndarray:
  return np.asarray(decode_jpeg(data, size))


def sample_params(rng: np.random.Generator, cfg) -> dict[str, Any]:
  """Random augmentation parameters for one patch (or one example when consistent)."""
  params: dict[str, Any] = {}
  if cfg.flip and cfg.rotate90:
    params["dihedral"] = int(rng.integers(8))
  elif cfg.flip:
    params["dihedral"] = _FLIPS_ONLY[int(rng.integers(4))]
  elif cfg.rotate90:
    params["dihedral"] = _ROTATIONS_ONLY[int(rng.integers(4))]
  else:
    params["dihedral"] = 0
  params["brightness"] = float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
  params["contrast"] = float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
  params["saturation"] = float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation))
  params["hue"] = float(rng.uniform(-cfg.hue, cfg.hue))
  if cfg.hed_sigma > 0:
    params["hed_scale"] = (1.0 + rng.normal(0, cfg.hed_sigma, 3)).astype(np.float32)
    params["hed_shift"] = rng.normal(0, cfg.hed_sigma / 2, 3).astype(np.float32)
  lo, hi = cfg.crop_scale
  if lo < 1.0:
    area = float(rng.uniform(lo, hi))
    log_ratio = rng.uniform(math.log(3 / 4), math.log(4 / 3))
    ratio = math.exp(log_ratio)
    w = min(1.0, math.sqrt(area * ratio))
    h = min(1.0, math.sqrt(area / ratio))
    params["crop"] = (float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h)), w, h)
  return params


def color_matrix(brightness: float, contrast: float, saturation: float, hue: float,
                 mean_luma: float) -> tuple[float, ...]:
  """The 12-tuple affine RGB matrix of brightness, contrast, saturation and hue jitter."""
  eye = np.eye(3)
  a = brightness * eye
  t = np.zeros(3)
  # contrast: blend towards the (brightness-scaled) mean grey level
  a = contrast * a
  t = t + (1 - contrast) * brightness * mean_luma
  # saturation: blend towards luma
  s = saturation * eye + (1 - saturation) * np.outer(np.ones(3), _LUMA)
  a, t = s @ a, s @ t
  if hue:
    theta = 2 * math.pi * hue
    c, sn = math.cos(theta), math.sin(theta)
    rot = np.array([[1, 0, 0], [0, c, -sn], [0, sn, c]])
    h = _YIQ_INV @ rot @ _YIQ
    a, t = h @ a, h @ t
  return tuple(np.concatenate([a, t[:, None]], axis=1).reshape(-1).tolist())


def hed_jitter(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """Stain jitter on a uint8 RGB array (linear in optical density)."""
  od = _OD_LUT[x.reshape(-1, 3)]  # [H*W, 3] float32
  mix = (_HED_FROM_RGB * scale[None, :]) @ _RGB_FROM_HED
  od = od @ mix.astype(np.float32)
  od += (shift @ _RGB_FROM_HED).astype(np.float32)
  np.negative(od, out=od)
  np.exp(od, out=od)
  od *= 255.0
  od += 0.5
  np.clip(od, 0, 255, out=od)
  return od.astype(np.uint8).reshape(x.shape)


def augment_image(im: Image.Image, params: dict[str, Any], size: int) -> np.ndarray:
  """Applies the parameters from `sample_params` to a decoded RGB image; returns uint8 HWC."""
  crop = params.get("crop")
  if crop is not None:
    x0, y0, w, h = crop
    sx, sy = im.size
    box = (x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy)
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
  elif im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BILINEAR)
  b, c, s, hue = params["brightness"], params["contrast"], params["saturation"], params["hue"]
  if (b, c, s, hue) != (1.0, 1.0, 1.0, 0.0):
    mean_luma = 128.0
    if c != 1.0:
      small = np.asarray(im)[::8, ::8].reshape(-1, 3)  # the mean of a 1/64 subsample
      mean_luma = float(small.mean(axis=0) @ _LUMA)
    im = im.convert("RGB", color_matrix(b, c, s, hue, mean_luma))
  op = _DIHEDRAL[params["dihedral"]]
  if op is not None:
    im = im.transpose(op)
  x = np.asarray(im)
  if "hed_scale" in params:
    x = hed_jitter(x, params["hed_scale"], params["hed_shift"])
  return x


def normalize_on_device(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=None):
  """uint8 [..., 3] -> float (x / 255 - mean) / std, on the device (jnp)."""
  import jax.numpy as jnp
  dtype = dtype or jnp.float32
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  inv_std = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
  return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)
