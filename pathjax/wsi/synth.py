"""Synthetic SVS-like slides with labelled tissue, ground truth and template captions.

`write_synthetic_slides(out_dir, n)` writes `n` Aperio-style pyramidal JPEG-tiled TIFFs
(`synth-000.svs`, ...) at 40x (MPP 0.25, AppMag 40 by default) and one captions file
`captions.jsonl` in the captions format (pathjax.input.captions): one line per patch of the
multi-resolution grid that overlaps tissue, with its ground-truth tissue class in `label`.

Tissue is drawn procedurally in regions of six classes (TISSUE_CLASSES). Each class has an
architecture, visible at low magnification (gland rings for tumor, fibre streaks for stroma,
follicles for lymphocytes, packed fat cells for adipose, mottled debris for necrosis, pale
lakes with wisps for mucus), and cells, visible at high magnification (large pleomorphic
nuclei, spindle nuclei, dense small round nuclei, rare flat nuclei, nuclear fragments,
sparse floating cells). Captions use architecture words at 5x/10x and cellular words at
20x/40x and always name the class as a zero-shot prompt would ("... of tumor").

Level 0 is drawn at full resolution with numpy and PIL, so a 4096 x 4096 slide takes about
a second or two.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pathjax.wsi import grid as grid_lib

TISSUE_CLASSES = ("tumor", "stroma", "lymphocytes", "adipose", "necrosis", "mucus")
BACKGROUND = "background"
# Class names as a zero-shot prompt names them ("an H&E image of {name}").
CLASS_PROMPT_NAMES = {
    "tumor": "tumor", "stroma": "stroma", "lymphocytes": "lymphocytes",
    "adipose": "adipose tissue", "necrosis": "necrosis", "mucus": "mucus",
}
LABEL_SCALE = 16  # level-0 pixels per pixel of the class map
WHITE = (246, 245, 247)

# Base (region) colours per class.
_BASE = {
    "tumor": (205, 150, 195), "stroma": (235, 165, 195), "lymphocytes": (175, 125, 195),
    "adipose": (238, 214, 230), "necrosis": (228, 190, 205), "mucus": (200, 195, 228),
}

_LOW_TEMPLATES = {
    "tumor": ["low-power view of tumor with irregular crowded glands and cribriform architecture",
              "tumor forming back-to-back malignant glands with lumens",
              "architecture of tumor: infiltrating glands of varying size"],
    "stroma": ["low-power view of stroma with wavy collagen fibres in parallel bundles",
               "fibrous stroma arranged in streaming bands",
               "architecture of stroma: pink fibrous tissue with sparse cells"],
    "lymphocytes": ["low-power view of lymphocytes forming a dense lymphoid follicle",
                    "sheets of lymphocytes in a lymphoid aggregate",
                    "architecture of lymphocytes: dark blue cellular nodules"],
    "adipose": ["low-power view of adipose tissue with large empty fat cells",
                "adipose tissue made of packed lobules of fat cells",
                "architecture of adipose tissue: honeycomb of thin septa"],
    "necrosis": ["low-power view of necrosis with pale eosinophilic debris",
                 "necrosis forming a geographic area of dead tissue",
                 "architecture of necrosis: mottled amorphous debris without structure"],
    "mucus": ["low-power view of mucus forming pale extracellular mucin pools",
              "mucus lakes with wispy strands",
              "architecture of mucus: pale blue-grey mucin with few cells"],
}
_HIGH_TEMPLATES = {
    "tumor": ["high-power view of tumor cells with large pleomorphic nuclei",
              "tumor epithelium with crowded hyperchromatic nuclei and mitoses",
              "cells of tumor: enlarged atypical nuclei lining a gland lumen"],
    "stroma": ["high-power view of stroma with spindle cells and elongated nuclei",
               "stroma with fibroblasts between collagen fibres",
               "cells of stroma: thin wavy spindle nuclei"],
    "lymphocytes": ["high-power view of lymphocytes with small round dark nuclei",
                    "densely packed lymphocytes with scant cytoplasm",
                    "cells of lymphocytes: uniform small round nuclei"],
    "adipose": ["high-power view of adipose tissue with thin cell membranes",
                "adipose tissue with flattened peripheral nuclei of fat cells",
                "cells of adipose tissue: clear vacuoles bounded by thin membranes"],
    "necrosis": ["high-power view of necrosis with karyorrhectic nuclear debris",
                 "necrosis with nuclear fragments and ghost cells",
                 "cells of necrosis: scattered apoptotic bodies and nuclear dust"],
    "mucus": ["high-power view of mucus with a few floating cells",
              "mucus with sparse detached cells in pale mucin",
              "cells of mucus: isolated floating cells in extracellular mucin"],
}


class SyntheticSet(NamedTuple):
  """What `write_synthetic_slides` wrote: slide paths (sorted), captions and reports files."""

  slide_paths: list[str]
  captions_path: str
  reports_path: str | None = None
  truth_path: str | None = None  # per-slide class maps and fractions (`read_truth`)


@dataclasses.dataclass
class SynthSlide:
  path: str
  slide_id: str
  width: int
  height: int
  mpp: float | None
  app_mag: float | None
  class_map: np.ndarray  # (ceil(h/LABEL_SCALE), ceil(w/LABEL_SCALE)) int8, -1 = background


# ---------------------------------------------------------------------------------------
# Drawing


def _smooth_noise(rng, shape, sigma):
  field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
  return field / (field.std() + 1e-6)


def _class_map(rng, lw, lh, classes, tissue_fraction, region_px):
  """(lh, lw) int8 class indices into `classes`, -1 for background."""
  if tissue_fraction <= 0:
    return np.full((lh, lw), -1, np.int8)
  yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
  r = np.sqrt(((xx - lw / 2) / (lw / 2)) ** 2 + ((yy - lh / 2) / (lh / 2)) ** 2)
  blob = -1.6 * r + 0.45 * _smooth_noise(rng, (lh, lw), max(2.0, min(lw, lh) / 8))
  thr = np.quantile(blob, 1 - tissue_fraction)
  tissue = blob > thr
  sigma = max(1.5, region_px / LABEL_SCALE / 2.5)
  fields = np.stack([_smooth_noise(rng, (lh, lw), sigma) for _ in classes])
  fields += rng.normal(0, 0.3, size=(len(classes), 1, 1)).astype(np.float32)
  cmap = np.argmax(fields, axis=0).astype(np.int8)
  cmap[~tissue] = -1
  return cmap


def _points(rng, w, h, spacing, jitter=0.45):
  """Jittered-grid points over a w x h image (x, y arrays)."""
  gx = np.arange(spacing / 2, w, spacing)
  gy = np.arange(spacing / 2, h, spacing)
  X, Y = np.meshgrid(gx, gy)
  X = X + rng.uniform(-jitter, jitter, X.shape) * spacing
  Y = Y + rng.uniform(-jitter, jitter, Y.shape) * spacing
  return X.ravel(), Y.ravel()


def _in_class(cmap, xs, ys, k):
  lh, lw = cmap.shape
  ix = np.clip((xs // LABEL_SCALE).astype(int), 0, lw - 1)
  iy = np.clip((ys // LABEL_SCALE).astype(int), 0, lh - 1)
  sel = cmap[iy, ix] == k
  return xs[sel], ys[sel]


def _jit(rng, colour, amount=12):
  return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _draw_class(draw, rng, name, xs_fn, scale):
  """Draws class `name`'s architecture and cells; xs_fn(spacing) -> points inside the class.

  `scale` multiplies sizes (level-0 pixels per 0.25 um pixel), so slides at other MPPs
  keep physical sizes.
  """
  s = scale
  if name == "tumor":
    # Glands: irregular epithelial rings with a pale lumen; large nuclei along the ring.
    for x, y in zip(*xs_fn(380 * s)):
      r = rng.uniform(90, 180) * s
      ang = np.linspace(0, 2 * np.pi, 14, endpoint=False)
      rad = r * rng.uniform(0.75, 1.2, ang.size)
      outer = [(x + a * np.cos(t), y + b * np.sin(t)) for t, a, b in zip(ang, rad, rad * rng.uniform(0.8, 1.1))]
      draw.polygon(outer, fill=_jit(rng, (165, 90, 160)))
      inner = [(x + 0.55 * (px - x), y + 0.55 * (py - y)) for px, py in outer]
      draw.polygon(inner, fill=_jit(rng, (242, 228, 238), 6))
      for t in np.linspace(0, 2 * np.pi, int(r / (14 * s)), endpoint=False):
        rr = r * 0.72
        nx, ny = x + rr * np.cos(t), y + rr * np.sin(t)
        a, b = rng.uniform(11, 20) * s, rng.uniform(9, 16) * s
        draw.ellipse([nx - a, ny - b, nx + a, ny + b], fill=_jit(rng, (75, 30, 115), 20))
    for x, y in zip(*xs_fn(60 * s)):
      a, b = rng.uniform(10, 19) * s, rng.uniform(8, 15) * s
      draw.ellipse([x - a, y - b, x + a, y + b], fill=_jit(rng, (85, 35, 120), 20))
  elif name == "stroma":
    theta = rng.uniform(0, np.pi)
    for x, y in zip(*xs_fn(45 * s)):
      t = theta + rng.normal(0, 0.25)
      L = rng.uniform(120, 320) * s
      dx, dy = L * np.cos(t) / 2, L * np.sin(t) / 2
      draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=_jit(rng, (212, 120, 165)),
                width=max(1, int(rng.uniform(4, 9) * s)))
    for x, y in zip(*xs_fn(120 * s)):
      t = theta + rng.normal(0, 0.2)
      L, W = rng.uniform(16, 26) * s, rng.uniform(3, 5) * s
      pts = [(x + L * np.cos(t), y + L * np.sin(t)), (x - W * np.sin(t), y + W * np.cos(t)),
             (x - L * np.cos(t), y - L * np.sin(t)), (x + W * np.sin(t), y - W * np.cos(t))]
      draw.polygon(pts, fill=_jit(rng, (105, 45, 130), 15))
  elif name == "lymphocytes":
    for x, y in zip(*xs_fn(700 * s)):
      r = rng.uniform(200, 380) * s
      draw.ellipse([x - r, y - r, x + r, y + r], fill=_jit(rng, (140, 95, 175), 8))
    for x, y in zip(*xs_fn(21 * s)):
      r = rng.uniform(6, 9) * s
      draw.ellipse([x - r, y - r, x + r, y + r], fill=_jit(rng, (48, 20, 95), 15))
  elif name == "adipose":
    for x, y in zip(*xs_fn(240 * s)):
      r = rng.uniform(105, 135) * s
      draw.ellipse([x - r, y - r, x + r, y + r], outline=_jit(rng, (215, 140, 185)),
                   width=max(1, int(5 * s)))
      if rng.uniform() < 0.25:
        t = rng.uniform(0, 2 * np.pi)
        nx, ny = x + r * np.cos(t), y + r * np.sin(t)
        a, b = 12 * s, 4 * s
        draw.ellipse([nx - a, ny - b, nx + a, ny + b], fill=_jit(rng, (90, 40, 120)))
  elif name == "necrosis":
    for x, y in zip(*xs_fn(160 * s)):
      r = rng.uniform(40, 120) * s
      draw.ellipse([x - r, y - r, x + r, y + r], fill=_jit(rng, (236, 175, 200), 10))
    for x, y in zip(*xs_fn(70 * s)):
      r = rng.uniform(12, 18) * s
      draw.ellipse([x - r, y - r, x + r, y + r], outline=_jit(rng, (205, 160, 190), 8),
                   width=max(1, int(2 * s)))
    for x, y in zip(*xs_fn(24 * s)):
      r = rng.uniform(2, 5) * s
      draw.ellipse([x - r, y - r, x + r * rng.uniform(0.6, 1.6), y + r], fill=_jit(rng, (70, 30, 100), 25))
  elif name == "mucus":
    for x, y in zip(*xs_fn(90 * s)):
      t = rng.uniform(0, np.pi)
      L = rng.uniform(60, 200) * s
      dx, dy = L * np.cos(t) / 2, L * np.sin(t) / 2
      draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=_jit(rng, (226, 222, 238), 6),
                width=max(1, int(rng.uniform(3, 8) * s)))
    for x, y in zip(*xs_fn(260 * s)):
      r = rng.uniform(9, 14) * s
      draw.ellipse([x - r, y - r, x + r, y + r], fill=_jit(rng, (110, 70, 150), 15))
  else:
    raise ValueError(f"unknown tissue class {name!r}")


def render_tissue(width: int, height: int, *, seed: int = 0, classes: Sequence[str] = TISSUE_CLASSES,
                  tissue_fraction: float = 0.7, region_px: int = 1800,
                  mpp: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
  """Draws a slide's level 0. Returns (rgb (h, w, 3) uint8, class map at 1/LABEL_SCALE)."""
  rng = np.random.default_rng(seed)
  lw, lh = -(-width // LABEL_SCALE), -(-height // LABEL_SCALE)
  cmap = _class_map(rng, lw, lh, classes, tissue_fraction, region_px * 0.25 / mpp)
  # Region colours with low-frequency mottling, upsampled to level 0.
  low = np.empty((lh, lw, 3), np.float32)
  low[:] = WHITE
  mottle = _smooth_noise(rng, (lh, lw), 3.0)[..., None]
  for k, name in enumerate(classes):
    sel = cmap == k
    low[sel] = np.asarray(_BASE[name], np.float32) + 8 * mottle[sel]
  img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize(
      (lw * LABEL_SCALE, lh * LABEL_SCALE), Image.Resampling.NEAREST)
  draw = ImageDraw.Draw(img)
  scale = 0.25 / mpp
  for k, name in enumerate(classes):
    if not (cmap == k).any():
      continue
    pts = lambda spacing, k=k: _in_class(cmap, *_points(rng, lw * LABEL_SCALE, lh * LABEL_SCALE, spacing), k)
    _draw_class(draw, rng, name, pts, scale)
  # Anything drawn across into the background is erased back to glass.
  bg = np.asarray(Image.fromarray(((cmap < 0) * 255).astype(np.uint8)).resize(
      img.size, Image.Resampling.NEAREST)) > 0
  arr = np.asarray(img).copy()
  arr[bg] = WHITE
  return arr[:height, :width], cmap


# ---------------------------------------------------------------------------------------
# Writing


def aperio_description(width, height, *, mpp=None, app_mag=None, tile=256, quality=80,
                       slide_id="synthetic", level_size=None) -> str:
  head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
  if level_size is not None:
    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {level_size[0]}x{level_size[1]} - "
  fields = []
  if app_mag is not None:
    fields.append(f"AppMag = {app_mag:g}")
  fields.append("ScanScope ID = PATHJAX-SYNTH")
  fields.append(f"Filename = {slide_id}")
  if mpp is not None:
    fields.append(f"MPP = {mpp:.4f}")
  return head + "|" + "|".join(fields)


def write_pyramid_tiff(path: str, rgb: np.ndarray, *, mpp: float | None = 0.25,
                       app_mag: float | None = 40, vendor: str = "aperio", tile: int = 256,
                       quality: int = 80, downsamples: Sequence[int] = (1, 4, 16),
                       min_level_side: int = 256) -> None:
  """Writes `rgb` as a JPEG-tiled pyramidal TIFF.

  vendor='aperio': SVS layout (baseline, stripped thumbnail, reduced levels) with an Aperio
  ImageDescription carrying MPP and AppMag where given. vendor='generic': a plain tiled
  pyramid in SubIFDs with the MPP in the resolution tags (no objective power).
  """
  import tifffile

  h, w = rgb.shape[:2]
  slide_id = os.path.splitext(os.path.basename(path))[0]
  base = Image.fromarray(rgb)
  levels = [rgb]
  for ds in downsamples[1:]:
    if min(w, h) // ds < min_level_side:
      break
    levels.append(np.asarray(base.reduce(ds)))
  tmp = f"{path}.tmp-{os.getpid()}"
  jpeg = dict(compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
              tile=(tile, tile), metadata=None)
  with tifffile.TiffWriter(tmp) as tw:
    if vendor == "aperio":
      tw.write(levels[0], description=aperio_description(w, h, mpp=mpp, app_mag=app_mag, tile=tile,
                                                          quality=quality, slide_id=slide_id), **jpeg)
      thumb = base.copy()
      thumb.thumbnail((768, 768))
      tw.write(np.asarray(thumb), photometric="rgb", compression="jpeg", metadata=None,
               description=aperio_description(w, h, mpp=mpp, app_mag=app_mag, slide_id=slide_id,
                                              level_size=thumb.size))
      for arr in levels[1:]:
        tw.write(arr, description=aperio_description(
            w, h, mpp=mpp, app_mag=app_mag, slide_id=slide_id, level_size=(arr.shape[1], arr.shape[0])),
                 **jpeg)
    elif vendor == "generic":
      res = {}
      if mpp is not None:
        res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
      tw.write(levels[0], subifds=len(levels) - 1, **res, **jpeg)
      for arr in levels[1:]:
        tw.write(arr, subfiletype=1, **jpeg)
    else:
      raise ValueError(f"vendor must be 'aperio' or 'generic', got {vendor!r}")
  os.replace(tmp, path)


def write_synthetic_slide(path: str, *, width: int = 4096, height: int | None = None, seed: int = 0,
                          mpp: float | None = 0.25, app_mag: float | None = 40,
                          vendor: str = "aperio", classes: Sequence[str] = TISSUE_CLASSES,
                          tissue_fraction: float = 0.7, region_px: int = 1800,
                          quality: int = 80) -> SynthSlide:
  """Draws and writes one slide. `mpp`/`app_mag` None leave that metadata out (the drawing
  then assumes 0.25 um/px)."""
  height = width if height is None else height
  draw_mpp = mpp if mpp is not None else (10.0 / app_mag if app_mag else 0.25)
  rgb, cmap = render_tissue(width, height, seed=seed, classes=classes,
                            tissue_fraction=tissue_fraction, region_px=region_px, mpp=draw_mpp)
  write_pyramid_tiff(path, rgb, mpp=mpp, app_mag=app_mag, vendor=vendor, quality=quality)
  return SynthSlide(path=path, slide_id=os.path.splitext(os.path.basename(path))[0],
                    width=width, height=height, mpp=mpp, app_mag=app_mag, class_map=cmap)


def corrupt_tile(path: str, *, level_page: int = 0, tile_index: int = 0, seed: int = 0) -> None:
  """Overwrites one JPEG tile of page `level_page` with random bytes (for bad-input tests)."""
  import tifffile

  with tifffile.TiffFile(path) as tf:
    page = tf.pages[level_page]
    offset, count = page.dataoffsets[tile_index], page.databytecounts[tile_index]
  junk = np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(junk)


# ---------------------------------------------------------------------------------------
# Labels and captions


def patch_label(cmap: np.ndarray, classes: Sequence[str], x: int, y: int, extent: int) -> tuple[str, str | None]:
  """(majority tissue class, second class covering >= 25% of the tissue or None)."""
  x0, y0 = x // LABEL_SCALE, y // LABEL_SCALE
  x1, y1 = max(x0 + 1, -(-(x + extent) // LABEL_SCALE)), max(y0 + 1, -(-(y + extent) // LABEL_SCALE))
  sub = cmap[y0:y1, x0:x1]
  counts = np.bincount(sub[sub >= 0].astype(np.int64), minlength=len(classes))
  if counts.sum() == 0:
    return BACKGROUND, None
  order = np.argsort(-counts, kind="stable")
  second = classes[order[1]] if len(classes) > 1 and counts[order[1]] >= 0.25 * counts.sum() else None
  return classes[order[0]], second


def caption_for(label: str, second: str | None, magnification: float, rng) -> str:
  if label == BACKGROUND:
    return "background glass with no tissue"
  templates = _LOW_TEMPLATES if magnification <= 10 else _HIGH_TEMPLATES
  text = templates[label][int(rng.integers(len(templates[label])))]
  text = f"{text} at {magnification:g}x"
  if second is not None:
    text += f", next to {CLASS_PROMPT_NAMES[second]}"
  return text[0].upper() + text[1:] + "."


def caption_records(slide: SynthSlide, *, magnifications: Sequence[float], patch_size: int,
                    classes: Sequence[str] = TISSUE_CLASSES, seed: int = 0,
                    drop_fraction: float = 0.0) -> list[dict]:
  """Caption lines for every grid patch of every root that has any tissue."""
  mags = grid_lib.validate_magnifications(magnifications)
  base = 10.0 / slide.mpp if slide.mpp else float(slide.app_mag or 40)
  extent = grid_lib.root_extent(base, mags, patch_size)
  rng = np.random.default_rng(seed)
  lines = []
  for rx, ry in grid_lib.root_positions(slide.width, slide.height, extent):
    root_label, _ = patch_label(slide.class_map, classes, rx, ry, extent)
    if root_label == BACKGROUND:
      continue
    for p in grid_lib.bag_layout(rx, ry, extent, mags):
      label, second = patch_label(slide.class_map, classes, p.x, p.y, p.extent)
      if drop_fraction and rng.uniform() < drop_fraction:
        continue
      lines.append({"slide": slide.slide_id, "magnification": p.magnification, "x": p.x, "y": p.y,
                    "caption": caption_for(label, second, p.magnification, rng), "label": label})
  return lines


# ---------------------------------------------------------------------------------------
# Slide reports

# Report names of the classes and what a pathologist would say about each.
REPORT_NAMES = {
    "tumor": "tumor", "stroma": "fibrous stroma", "lymphocytes": "lymphocytic infiltrate",
    "adipose": "adipose tissue", "necrosis": "necrosis", "mucus": "extracellular mucin",
}
_REPORT_DETAIL = {
    "tumor": "malignant glands with pleomorphic nuclei",
    "stroma": "collagenous stroma with spindle cells",
    "lymphocytes": "dense lymphoid aggregates",
    "adipose": "mature fat lobules",
    "necrosis": "geographic necrosis with nuclear debris",
    "mucus": "pools of pale mucin",
}
_DIAGNOSIS = {
    "tumor": "Adenocarcinoma", "stroma": "Fibrous tissue without malignancy",
    "lymphocytes": "Reactive lymphoid tissue", "adipose": "Benign adipose tissue",
    "necrosis": "Extensive necrosis", "mucus": "Mucinous material",
}
_PART_SITES = ("colon, biopsy", "liver, wedge resection", "lymph node, excision",
               "soft tissue, excision", "stomach, biopsy", "omentum, biopsy")
# Header styles of multi-part reports (all parsed by pathjax.input.reports.split_parts).
_PART_HEADERS = ("{L}. ", "{L}) ", "Part {n}: ", "SPECIMEN {L}: ", "{L}: ")


def class_fractions(cmap: np.ndarray, classes: Sequence[str] = TISSUE_CLASSES) -> dict[str, float]:
  """Fraction of the tissue area of each class (sums to 1; empty dict for no tissue)."""
  counts = np.bincount(cmap[cmap >= 0].astype(np.int64), minlength=len(classes))
  total = counts.sum()
  if total == 0:
    return {}
  return {c: float(counts[i] / total) for i, c in enumerate(classes)}


def _amount(f: float) -> str:
  return ("predominantly" if f >= 0.5 else "extensive" if f >= 0.25 else "areas of" if f >= 0.1
          else "focal")


def slide_report_text(fractions: Mapping[str, float], rng, style: int | None = None) -> str:
  """A report describing a slide's tissue composition in one of several phrasings.

  Every phrasing names the dominant class first (its report name, after a diagnosis line
  in some phrasings) and every other class covering >= 3% of the
  tissue with a quantity word (and, in two phrasings, its approximate percentage), so
  reports tell slides apart by composition.
  """
  if not fractions:
    return "Sections show no diagnostic tissue; the slide is essentially blank."
  ranked = [(c, f) for c, f in sorted(fractions.items(), key=lambda kv: -kv[1]) if f >= 0.03]
  dom, dom_f = ranked[0]
  rest = ranked[1:]
  name = REPORT_NAMES
  style = int(rng.integers(5)) if style is None else style % 5
  def listing(items, pct=False):
    words = [f"{_amount(f)} {name[c]}" + (f" (about {round(f * 20) * 5}%)" if pct else "") for c, f in items]
    if not words:
      return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
  if style == 0:
    text = f"Sections show {_amount(dom_f)} {name[dom]}"
    text += f" with {listing(rest)}." if rest else "."
  elif style == 1:
    text = f"{_DIAGNOSIS[dom]}. The specimen consists mostly of {name[dom]} ({_REPORT_DETAIL[dom]})"
    text += f", accompanied by {listing(rest)}." if rest else "."
  elif style == 2:
    text = f"Microscopic description: {name[dom]} makes up about {round(dom_f * 20) * 5}% of the tissue"
    text += f"; also present: {listing(rest, pct=True)}." if rest else "."
  elif style == 3:
    text = f"The slide is dominated by {name[dom]} ({_REPORT_DETAIL[dom]})"
    text += f". Other findings include {listing(rest)}." if rest else "."
  else:
    text = f"Diagnosis: {_DIAGNOSIS[dom].lower()}. Composition: " + listing(ranked, pct=True) + "."
  return text[0].upper() + text[1:]


def dominant_class_named(report: str, classes: Sequence[str] = TISSUE_CLASSES) -> str | None:
  """The class a synthetic report says dominates: the first class it names (every phrasing of
  `slide_report_text` names the dominant class first), or None if it names none."""
  text = report.lower()
  found = [(text.find(REPORT_NAMES[c]), c) for c in classes if REPORT_NAMES[c] in text]
  return min(found)[1] if found else None


def dominant_class(fractions: Mapping[str, float]) -> str | None:
  return max(fractions, key=fractions.get) if fractions else None


def slide_reports(slides: Sequence["SynthSlide"], *, seed: int = 0, parts_per_case: int = 1,
                  classes: Sequence[str] = TISSUE_CLASSES) -> list[dict]:
  """Report lines {"slide", "report"[, "part"]} for synthetic slides.

  parts_per_case > 1 groups consecutive slides into cases whose report has one part per
  slide under a header ("A.", "Part 2:", "SPECIMEN B:", ... varying by case); each slide's
  line then carries the whole case report and its part label, as a real multi-part report
  file would.
  """
  rng = np.random.default_rng(seed + 7919)
  lines = []
  k = max(1, int(parts_per_case))
  for start in range(0, len(slides), k):
    case = slides[start:start + k]
    texts = [slide_report_text(class_fractions(s.class_map, classes), rng) for s in case]
    if len(case) == 1:
      lines.append({"slide": case[0].slide_id, "report": texts[0]})
      continue
    header = _PART_HEADERS[int(rng.integers(len(_PART_HEADERS)))]
    sites = rng.permutation(len(_PART_SITES))
    body = []
    for j, (s, t) in enumerate(zip(case, texts)):
      letter = chr(ord("A") + j)
      body.append(header.format(L=letter, n=j + 1) + f"{_PART_SITES[sites[j % len(sites)]].capitalize()}: {t}")
    report = "\n".join(body)
    for j, s in enumerate(case):
      label = str(j + 1) if "{n}" in header else chr(ord("A") + j)
      lines.append({"slide": s.slide_id, "report": report, "part": label})
  return lines


def write_synthetic_slides(out_dir: str, n: int, *, seed: int = 0, size: int = 4096,
                           magnifications: Sequence[float] = (5, 10, 20, 40), patch_size: int = 224,
                           mpp: float = 0.25, app_mag: float = 40, tissue_fraction: float = 0.7,
                           region_px: int | None = None, caption_drop_fraction: float = 0.0,
                           captions_name: str = "captions.jsonl", prefix: str = "synth",
                           quality: int = 80, reports_name: str | None = "reports.jsonl",
                           report_parts: int = 1) -> SyntheticSet:
  """Writes `n` slides `{prefix}-{i:03d}.svs` and their captions into `out_dir`.

  Returns SyntheticSet(slide_paths, captions_path). Captions (with the ground-truth class
  in "label") cover every patch of the grid for (magnifications, patch_size) under any
  roots that touch tissue; `caption_drop_fraction` leaves some out on purpose so missing
  captions can be exercised. Regions are about one root patch across by default, so roots
  are mostly of one class and every slide has several classes.
  """
  os.makedirs(out_dir, exist_ok=True)
  mags = grid_lib.validate_magnifications(magnifications)
  extent = grid_lib.root_extent(10.0 / mpp, mags, patch_size)
  region = region_px if region_px is not None else max(256, int(extent * 1.1 * mpp / 0.25))
  paths, lines, drawn = [], [], []
  for i in range(n):
    path = os.path.join(out_dir, f"{prefix}-{i:03d}.svs")
    slide = write_synthetic_slide(path, width=size, seed=seed * 100003 + i, mpp=mpp, app_mag=app_mag,
                                  tissue_fraction=tissue_fraction, region_px=region, quality=quality)
    lines += caption_records(slide, magnifications=mags, patch_size=patch_size,
                             seed=seed * 100003 + i, drop_fraction=caption_drop_fraction)
    paths.append(path)
    drawn.append(slide)
  captions_path = os.path.join(out_dir, captions_name)
  tmp = f"{captions_path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  os.replace(tmp, captions_path)
  reports_path = None
  if reports_name:
    from pathjax.input.reports import write_reports
    reports_path = os.path.join(out_dir, reports_name)
    write_reports(reports_path, slide_reports(drawn, seed=seed, parts_per_case=report_parts))
  truth_path = write_truth(os.path.join(out_dir, TRUTH_NAME), drawn)
  return SyntheticSet(paths, captions_path, reports_path, truth_path)


# ---------------------------------------------------------------------------------------
# Ground truth: what localization and instruction data are scored against

TRUTH_NAME = "truth.npz"


class SlideTruth(NamedTuple):
  class_map: np.ndarray           # (ceil(h/scale), ceil(w/scale)) int8 indices into classes, -1 glass
  fractions: dict[str, float]     # tissue share of each class (sums to 1)
  scale: int                      # level-0 pixels per class-map cell


def write_truth(path: str, slides: Sequence[SynthSlide],
                classes: Sequence[str] = TISSUE_CLASSES) -> str:
  """Writes every slide's class map (the lesion masks of localization) into one .npz, atomically."""
  arrays = {f"map/{s.slide_id}": s.class_map for s in slides}
  arrays["classes"] = np.asarray(list(classes))
  arrays["label_scale"] = np.asarray(LABEL_SCALE)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)
  return path


def read_truth(path: str) -> dict[str, SlideTruth]:
  """{slide id: SlideTruth} from a `write_truth` file (`truth.npz` next to synthetic slides)."""
  with np.load(path) as z:
    classes = [str(c) for c in z["classes"]]
    scale = int(z["label_scale"])
    return {k[len("map/"):]: SlideTruth(z[k], class_fractions(z[k], classes), scale)
            for k in z.files if k.startswith("map/")}
