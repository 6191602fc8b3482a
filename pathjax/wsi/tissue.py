"""Thumbnail tissue mask and per-patch tissue fractions.

Tissue is where the thumbnail is both coloured (HSV saturation above an Otsu threshold,
clipped to [MIN_SATURATION, MAX_SATURATION_THRESHOLD]: the floor keeps an empty slide
empty, the cap keeps pale tissue such as fat and mucin when strongly stained tissue
drives Otsu up, as CLAM's fixed low threshold does) and not near-white, cleaned with a
morphological opening and closing and hole filling. Black padding and scanner borders have
no saturation and are not tissue.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# Saturation (0..1) below which nothing counts as tissue, whatever Otsu says: white glass
# and its JPEG noise stay below it, faint eosin stays above it.
MIN_SATURATION = 0.05
# Otsu's threshold is capped here: any stain this saturated is tissue.
MAX_SATURATION_THRESHOLD = 0.08
# Grey level (0..255) at or above which a pixel is background glass.
MAX_GREY = 235


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold of a 1-D array of values in [0, 1]."""
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    return 0.0
  hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
  hist = hist.astype(np.float64)
  centers = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(hist)
  w1 = w0[-1] - w0
  m0 = np.cumsum(hist * centers)
  mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
  mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
  between = w0 * w1 * (mu0 - mu1) ** 2
  return float(centers[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.float32)
  mx, mn = rgb.max(-1), rgb.min(-1)
  return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


def tissue_mask(rgb: np.ndarray, *, min_saturation: float = MIN_SATURATION,
                max_saturation_threshold: float = MAX_SATURATION_THRESHOLD, max_grey: float = MAX_GREY, cleanup_px: int = 2) -> np.ndarray:
  """Boolean tissue mask of an RGB thumbnail (H, W, 3) uint8."""
  rgb = np.asarray(rgb)[..., :3]
  sat = saturation(rgb)
  grey = rgb.astype(np.float32).mean(-1)
  candidate = grey < max_grey
  thr = otsu_threshold(sat[candidate]) if candidate.any() else 1.0
  mask = candidate & (sat >= float(np.clip(thr, min_saturation, max_saturation_threshold)))
  if cleanup_px > 0 and mask.any():
    structure = np.ones((2 * cleanup_px + 1,) * 2, bool)
    mask = ndimage.binary_opening(mask, structure=structure)
    mask = ndimage.binary_closing(mask, structure=structure)
    mask = ndimage.binary_fill_holes(mask)
  return mask


@dataclasses.dataclass
class TissueMap:
  """A tissue mask with its downsample relative to level 0; fractions of level-0 squares."""

  mask: np.ndarray    # (h, w) bool
  downsample: float   # level-0 pixels per mask pixel

  def __post_init__(self):
    m = self.mask.astype(np.float64)
    self._integral = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

  def fraction(self, x: float, y: float, extent: float) -> float:
    """Tissue fraction of the level-0 square [x, x+extent) x [y, y+extent).

    Mask pixels are weighted by how much of them the square covers, so small patches
    (fewer mask pixels than a few per side) still get a sensible fraction.
    """
    h, w = self.mask.shape
    ds = self.downsample
    x0, y0, x1, y1 = x / ds, y / ds, (x + extent) / ds, (y + extent) / ds
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
      return 0.0
    area = (x1 - x0) * (y1 - y0)
    return float(np.clip(self._area(max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)) / area, 0, 1))

  def _area(self, x0, y0, x1, y1) -> float:
    # Integral of the mask over a fractional rectangle, via bilinear interpolation of the
    # summed-area table (exact for piecewise-constant pixels along each axis separately).
    def s(xx, yy):
      xi, yi = int(np.floor(xx)), int(np.floor(yy))
      fx, fy = xx - xi, yy - yi
      I = self._integral
      H, W = I.shape
      xi1, yi1 = min(xi + 1, W - 1), min(yi + 1, H - 1)
      return ((1 - fx) * (1 - fy) * I[yi, xi] + fx * (1 - fy) * I[yi, xi1]
              + (1 - fx) * fy * I[yi1, xi] + fx * fy * I[yi1, xi1])
    return s(x1, y1) - s(x0, y1) - s(x1, y0) + s(x0, y0)


def mask_downsample_for(leaf_extent: float, pixels_per_leaf: int = 4) -> float:
  """The coarsest mask downsample that still gives a leaf patch `pixels_per_leaf` per side."""
  return max(1.0, leaf_extent / pixels_per_leaf)


def slide_tissue_map(slide, leaf_extent: float, *, pixels_per_leaf: int = 4) -> TissueMap:
  """Reads a slide overview at about `leaf_extent / pixels_per_leaf` downsample and masks it."""
  target = mask_downsample_for(leaf_extent, pixels_per_leaf)
  arr, ds = slide.overview(target)
  if ds < target / 1.5:
    # The chosen level is much finer than needed: shrink before masking (faster, same mask).
    from PIL import Image
    factor = int(target // ds)
    if factor >= 2:
      arr = np.asarray(Image.fromarray(arr).reduce(factor))
      ds = slide.dimensions[0] / arr.shape[1]
  return TissueMap(tissue_mask(arr), ds)
