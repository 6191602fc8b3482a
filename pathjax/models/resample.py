"""Numpy bicubic resizing that reproduces torch's `F.interpolate(mode="bicubic")`.

timm's `resample_abs_pos_embed` resizes position-embedding grids with
`F.interpolate(..., mode="bicubic", align_corners=False, antialias=True)`. To give the same
features as timm at a new image size, converters resize with the same arithmetic here, in
numpy (no torch at run time).

Two kernels, both separable (rows, then columns), computed in float64:

* `antialias=True` (timm's default, torch's `_upsample_bicubic2d_aa`, which follows Pillow):
  for output index i, with scale = in/out, center = scale * (i + 0.5),
  support = 2 * max(scale, 1), the taps j in [trunc(center - support + 0.5),
  trunc(center + support + 0.5)) clipped to the input, weights
  cubic((j - center + 0.5) / max(scale, 1)) with the Keys kernel at A = -0.5, normalised
  to sum 1 (so the border is handled by renormalisation, not by clamping).
* `antialias=False` (plain `mode="bicubic"`): four taps around scale * (i + 0.5) - 0.5, the
  Keys kernel at A = -0.75, indices clamped to the border.
"""

from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _weights_aa(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] interpolation matrix of torch's antialiased bicubic (align_corners=False)."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C++ does
    xmax = min(int(center + support + 0.5), in_size)
    j = np.arange(xmin, xmax)
    taps = _cubic((j - center + 0.5) * invscale, -0.5)
    total = taps.sum()
    if total != 0.0:
      taps = taps / total
    w[i, xmin:xmax] = taps
  return w


def _weights_plain(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] interpolation matrix of torch's bicubic without antialiasing."""
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    real = scale * (i + 0.5) - 0.5
    base = int(np.floor(real))
    t = real - base
    coeffs = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
    for k, c in enumerate(coeffs):
      w[i, min(max(base - 1 + k, 0), in_size - 1)] += c
  return w


def interpolation_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
  """The [out_size, in_size] matrix M with resized = M @ x along one axis."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
  return _weights_aa(in_size, out_size) if antialias else _weights_plain(in_size, out_size)


def bicubic_resize_torch(grid: np.ndarray, new_size: tuple[int, int], *,
                         antialias: bool = True) -> np.ndarray:
  """Resizes `grid` [H, W, ...] to [new_h, new_w, ...] like torch bicubic (align_corners=False).

  The trailing axes (channels) are carried along. Computed in float64, returned in the
  input's dtype (float32 for checkpoints).
  """
  grid = np.asarray(grid)
  h, w = grid.shape[:2]
  new_h, new_w = (int(s) for s in new_size)
  if (h, w) == (new_h, new_w):
    return grid.copy()
  x = grid.astype(np.float64)
  mh = interpolation_matrix(h, new_h, antialias)
  mw = interpolation_matrix(w, new_w, antialias)
  x = np.tensordot(mh, x, axes=(1, 0))                     # [new_h, w, ...]
  x = np.moveaxis(np.tensordot(mw, x, axes=(1, 1)), 0, 1)  # [new_h, new_w, ...]
  out_dtype = grid.dtype if np.issubdtype(grid.dtype, np.floating) else np.float32
  return x.astype(out_dtype)
