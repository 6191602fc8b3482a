"""Decoding and augmentation of patches (uint8 in, uint8 out on the host; floats on device).

The host (Grain workers) decodes JPEGs and emits uint8 HWC arrays; normalisation happens on
the device (`normalize_on_device`), which keeps host work and host-to-device bytes small.

With `on_device=True` (the default) the host only draws each patch's augmentation
parameters and ships them with the batch (`color_transform` [3, 4], `dihedral` int);
`normalize_on_device` applies them, fused with the normalisation, where a 3x4 affine map
and a flip per pixel cost nothing next to a ViT. That cuts the host CPU per image by
about 40% (`pathjax bench input` prints both paths), which is what decides how many cores
feed an accelerator. With `on_device=False` the host applies everything (PIL, uint8) and the batch
carries finished pixels. Crop and stain jitter always run on the host (resampling,
nonlinear); both paths apply crop, stain jitter, colour jitter, flips in that order.

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

import imagecodecs
import ml_collections
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL transpose ops for the 8 elements of the dihedral group (None = identity).
_T = Image.Transpose
_DIHEDRAL = (None, _T.FLIP_LEFT_RIGHT, _T.FLIP_TOP_BOTTOM, _T.ROTATE_180,
             _T.ROTATE_90, _T.ROTATE_270, _T.TRANSPOSE, _T.TRANSVERSE)
# The same 8 as (transpose first, then flip left-right, then flip top-bottom) on [H, W].
DIHEDRAL_STEPS = np.array([(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1),
                           (1, 0, 1), (1, 1, 0), (1, 0, 0), (1, 1, 1)], bool)
IDENTITY_COLOR = np.eye(3, 4, dtype=np.float32)
_FLIPS_ONLY = (0, 1, 2, 3)       # identity, lr, tb, both (= rotate 180)
_ROTATIONS_ONLY = (0, 4, 3, 5)   # 0, 90, 180, 270 degrees

# RGB -> YIQ and back (NTSC); hue rotates the IQ plane.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
_LUMA = np.array([0.299, 0.587, 0.114])
_LUMA_SUM = float(_LUMA.sum())
# Hue rotation by theta in RGB: YIQ^-1 R(theta) YIQ = _HUE_0 + cos(theta) _HUE_COS + sin(theta) _HUE_SIN.
_HUE_0 = _YIQ_INV @ np.diag([1.0, 0.0, 0.0]) @ _YIQ
_HUE_COS = _YIQ_INV @ np.diag([0.0, 1.0, 1.0]) @ _YIQ
_HUE_SIN = _YIQ_INV @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) @ _YIQ
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
  c.on_device = True    # colour jitter and flips/rotations applied by normalize_on_device
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
  on_device: bool = True

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


def _decode_rgb(data: bytes) -> np.ndarray | None:
  """libjpeg-turbo through imagecodecs (a dependency already, for tiffslide's JPEG tiles):
  pixel-identical to PIL's decoder and ~1.6x faster on 224 px patches, since it skips PIL's
  Python-level header parsing. None for what it does not return as RGB (grey, CMYK), and
  for data without the end-of-image marker: libjpeg-turbo pads a truncated JPEG silently,
  where PIL raises."""
  if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
    return None
  try:
    arr = imagecodecs.jpeg8_decode(data)
  except Exception:  # noqa: BLE001 - PIL decodes it again and names the problem
    return None
  return arr if arr.ndim == 3 and arr.shape[2] == 3 else None


def decode_to_array(data: bytes, size: int | None = None) -> np.ndarray:
  """Decodes JPEG bytes to uint8 RGB HWC, resized to `size` x `size` if given."""
  arr = _decode_rgb(data)
  if arr is None:
    return np.asarray(_decode_with_pil(data, size))
  if size is None or arr.shape[:2] == (size, size):
    return arr
  return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))


def _decode_with_pil(data: bytes, size: int | None) -> Image.Image:
  """PIL's decoder: grey and CMYK JPEGs, and the error message for a broken one."""
  im = Image.open(io.BytesIO(data))
  if size is not None and im.size != (size, size) and min(im.size) >= 2 * size:
    im.draft("RGB", (size, size))  # DCT-domain downscale: much faster for big patches
  if im.mode != "RGB":
    im = im.convert("RGB")
  if size is not None and im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BILINEAR)
  return im


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
  """The 12-tuple affine RGB matrix of brightness, contrast, saturation and hue jitter.

  Composed in order: brightness (scale), contrast (blend towards the brightness-scaled
  mean grey level), saturation (blend towards luma: S = s I + (1 - s) 1 luma^T), hue
  (rotation of the YIQ chroma plane: H = H0 + cos Hc + sin Hs). Written in closed form,
  H S = s H + (1 - s) (H 1) luma^T, because composing 3x3 products per patch was a tenth
  of the pipeline's CPU time.
  """
  theta = 2 * math.pi * hue
  h = _HUE_0 + math.cos(theta) * _HUE_COS + math.sin(theta) * _HUE_SIN
  rows = h.sum(axis=1)
  a = (brightness * contrast) * (saturation * h + (1 - saturation) * np.outer(rows, _LUMA))
  grey = (1 - contrast) * brightness * mean_luma * (saturation + (1 - saturation) * _LUMA_SUM)
  return tuple(np.concatenate([a, (grey * rows)[:, None]], axis=1).ravel().tolist())


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


def _resize_for(image: np.ndarray | Image.Image, params: dict[str, Any], size: int):
  """Crop / resize step: (PIL image, its pixels as an array when still available)."""
  arr = image if isinstance(image, np.ndarray) else None
  im = Image.fromarray(image) if arr is not None else image
  crop = params.get("crop")
  if crop is not None:
    x0, y0, w, h = crop
    sx, sy = im.size
    box = (x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy)
    return im.resize((size, size), Image.Resampling.BILINEAR, box=box), None
  if im.size != (size, size):
    return im.resize((size, size), Image.Resampling.BILINEAR), None
  return im, arr


def _jitter_matrix(pixels: np.ndarray, params: dict[str, Any]) -> tuple[float, ...] | None:
  b, c, s, hue = params["brightness"], params["contrast"], params["saturation"], params["hue"]
  if (b, c, s, hue) == (1.0, 1.0, 1.0, 0.0):
    return None
  mean_luma = 128.0
  if c != 1.0:
    small = pixels[::8, ::8].reshape(-1, 3)  # the mean of a 1/64 subsample
    mean_luma = float(small.mean(axis=0) @ _LUMA)
  return color_matrix(b, c, s, hue, mean_luma)


def augment_image(image: np.ndarray | Image.Image, params: dict[str, Any], size: int) -> np.ndarray:
  """Applies the parameters from `sample_params` to a decoded RGB image (uint8 HWC array or
  PIL image) on the host; returns uint8 HWC."""
  im, arr = _resize_for(image, params, size)
  if "hed_scale" in params:  # stain jitter first, as on the device path
    arr = hed_jitter(arr if arr is not None else np.asarray(im), params["hed_scale"],
                     params["hed_shift"])
    im = Image.fromarray(arr)
  matrix = _jitter_matrix(arr if arr is not None else np.asarray(im), params)
  if matrix is not None:
    im = im.convert("RGB", matrix)
  op = _DIHEDRAL[params["dihedral"]]
  if op is not None:
    im = im.transpose(op)
  return np.asarray(im)


def augment_for_device(image: np.ndarray, params: dict[str, Any], size: int
                       ) -> tuple[np.ndarray, np.ndarray, int]:
  """The host part of on-device augmentation: crop and stain jitter applied here; returns
  (uint8 HWC pixels, float32 [3, 4] colour transform, dihedral index) for the device."""
  if "crop" in params or image.shape[:2] != (size, size):
    image = np.asarray(_resize_for(image, params, size)[0])
  if "hed_scale" in params:
    image = hed_jitter(image, params["hed_scale"], params["hed_shift"])
  matrix = _jitter_matrix(image, params)
  color = IDENTITY_COLOR if matrix is None else np.asarray(matrix, np.float32).reshape(3, 4)
  return image, color, int(params["dihedral"])


def augment_on_device(images, color, dihedral):
  """uint8 [..., H, W, 3] -> float32 in [0, 255]: the colour transforms [..., 3, 4] and the
  dihedral indices [...] of `augment_for_device`, per image (jnp; H == W for rotations).

  Flips and transposes first, on the uint8 pixels (a per-pixel colour map commutes with
  them); the colour map as three broadcast multiply-adds, which XLA fuses into one pass
  (an einsum over the 3 channels lowered to a dot and ran 5x slower on the CPU backend).
  """
  import jax.numpy as jnp
  steps = jnp.asarray(DIHEDRAL_STEPS)[dihedral]                  # [..., 3]
  on = lambda i: steps[..., i][..., None, None, None]
  x = jnp.where(on(0), jnp.swapaxes(images, -3, -2), images)
  x = jnp.where(on(1), x[..., :, ::-1, :], x)
  x = jnp.where(on(2), x[..., ::-1, :, :], x).astype(jnp.float32)
  m = color[..., None, None, :, :]                                # [..., 1, 1, 3, 4]
  x = x[..., 0:1] * m[..., 0] + x[..., 1:2] * m[..., 1] + x[..., 2:3] * m[..., 2] + m[..., 3]
  return jnp.clip(x, 0.0, 255.0)


def normalize_on_device(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=None,
                        color=None, dihedral=None):
  """uint8 [..., 3] -> float (x / 255 - mean) / std, on the device (jnp).

  With `color` [..., 3, 4] and `dihedral` [...] (a batch's `color_transform` and
  `dihedral`), applies that augmentation first (augment_on_device).
  """
  import jax.numpy as jnp
  dtype = dtype or jnp.float32
  if color is not None:
    images = augment_on_device(images, color, dihedral)
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  inv_std = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
  return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)
