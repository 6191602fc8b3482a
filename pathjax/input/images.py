"""Image modes to 8-bit RGB, for every reader of user images (embed, evaluation data).

PIL's `convert("RGB")` clips 16-bit greyscale ("I;16*") to 0..255 instead of scaling it,
so a 16-bit PNG comes out almost all white; these are scaled by 1/257 here (65535 -> 255).
32-bit integer and float images have no agreed range and are refused with the mode named.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S")


def uint16_to_uint8(arr: np.ndarray) -> np.ndarray:
  """Scales the full 16-bit range onto 8 bits (rounding)."""
  return ((np.asarray(arr, np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb8(img: Image.Image, name: str = "image") -> Image.Image:
  """`img` as 8-bit RGB; 16-bit greyscale is scaled, not clipped. ValueError for 32-bit modes."""
  if img.mode == "RGB":
    return img
  if img.mode in _SIXTEEN_BIT:
    arr = np.asarray(img)
    if arr.dtype.kind == "i":
      arr = np.clip(arr, 0, None)
    return Image.fromarray(uint16_to_uint8(arr), "L").convert("RGB")
  if img.mode in ("I", "F"):
    raise ValueError(f"{name}: {'32-bit integer' if img.mode == 'I' else 'floating-point'} "
                     f"pixels (PIL mode {img.mode}) have no defined 8-bit range; convert it to "
                     "8- or 16-bit RGB or greyscale first")
  return img.convert("RGB")


def array_to_rgb8(arr: np.ndarray, name: str = "image") -> Image.Image:
  """An HxW or HxWxC array as 8-bit RGB: uint16 is scaled, uint8 kept, others refused."""
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.dtype == np.uint16:
    arr = uint16_to_uint8(arr)
  elif arr.dtype == np.bool_:
    arr = arr.astype(np.uint8) * 255
  elif arr.dtype != np.uint8:
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255:
      arr = arr.astype(np.uint8)
    else:
      raise ValueError(f"{name}: pixels of dtype {arr.dtype} are not 8- or 16-bit; store uint8 "
                       "or uint16 images")
  return Image.fromarray(arr).convert("RGB")
