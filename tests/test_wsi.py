"""Slide access, magnification, regions, tissue mask, grid geometry, bad slide files."""

import numpy as np
import pytest
import tifffile

from pathjax.wsi import grid, synth, tissue
from pathjax.wsi import slide as slide_lib


def _slide(tmp_path, name="s.svs", size=1024, **kw):
  path = str(tmp_path / name)
  synth.write_synthetic_slide(path, width=size, seed=3, region_px=300, **kw)
  return path


def test_magnification_from_mpp(tmp_path):
  with slide_lib.open_slide(_slide(tmp_path, mpp=0.25, app_mag=None)) as s:
    assert s.magnification == pytest.approx(40.0)
    assert s.magnification_source == "mpp" and s.mpp_known
    assert s.level_count if hasattr(s, "level_count") else len(s.level_dimensions) >= 2


def test_magnification_from_appmag(tmp_path):
  with slide_lib.open_slide(_slide(tmp_path, mpp=None, app_mag=20)) as s:
    assert s.magnification == 20.0 and s.magnification_source == "objective_power"
    assert s.mpp == pytest.approx(0.5) and not s.mpp_known


def test_generic_pyramidal_tiff_mpp_from_resolution_tags(tmp_path):
  path = _slide(tmp_path, "g.tiff", mpp=0.5, app_mag=None, vendor="generic")
  with slide_lib.open_slide(path) as s:
    assert s.magnification == pytest.approx(20.0) and len(s.level_dimensions) >= 2


def test_no_metadata_is_an_error_unless_overridden(tmp_path):
  path = _slide(tmp_path, mpp=None, app_mag=None)
  with pytest.raises(slide_lib.MissingMagnificationError, match="magnification-override"):
    slide_lib.open_slide(path)
  with slide_lib.open_slide(path, magnification_override=40) as s:
    assert s.magnification == 40 and s.magnification_source == "override"


def test_truncated_and_corrupt_files(tmp_path):
  path = _slide(tmp_path)
  data = open(path, "rb").read()
  trunc = tmp_path / "trunc.svs"
  trunc.write_bytes(data[: len(data) // 2])
  with pytest.raises(slide_lib.SlideOpenError, match="truncated|corrupt|not a readable"):
    slide_lib.open_slide(str(trunc))
  junk = tmp_path / "junk.svs"
  junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  with pytest.raises(slide_lib.SlideOpenError, match="not a readable TIFF"):
    slide_lib.open_slide(str(junk))
  empty = tmp_path / "empty.svs"
  empty.write_bytes(b"")
  with pytest.raises(slide_lib.SlideOpenError, match="empty"):
    slide_lib.open_slide(str(empty))


def test_non_pyramidal_tiff(tmp_path):
  rgb = np.full((600, 800, 3), 200, np.uint8)
  plain = str(tmp_path / "plain.tif")
  tifffile.imwrite(plain, rgb, photometric="rgb", metadata=None, resolution=(40000, 40000),
                   resolutionunit="CENTIMETER")
  with pytest.raises(slide_lib.NotPyramidalError, match="strips, not tiles"):
    slide_lib.open_slide(plain)
  # Tiled but single-level and large: refused beyond the single-level limit.
  tiled = str(tmp_path / "tiled.tif")
  tifffile.imwrite(tiled, rgb, photometric="rgb", tile=(256, 256), metadata=None,
                   resolution=(40000, 40000), resolutionunit="CENTIMETER")
  with pytest.raises(slide_lib.NotPyramidalError, match="no reduced pyramid"):
    slide_lib.open_slide(tiled, max_single_level_side=512)
  with slide_lib.open_slide(tiled) as s:
    assert s.magnification == pytest.approx(40.0)


def test_read_region_resizes_from_best_level_and_pads_white(tmp_path):
  with slide_lib.open_slide(_slide(tmp_path, size=2048)) as s:
    assert s.best_level(4.0) == 1 and s.best_level(3.9) == 0 and s.best_level(100) == len(s.level_dimensions) - 1
    # A 10x patch (4x downsample) from level 1 vs box-averaged level 0.
    patch = s.read_at(512, 512, 10, 64)
    assert patch.shape == (64, 64, 3) and patch.dtype == np.uint8
    full = s.read_region(512, 512, 256, 256)
    ref = full.reshape(64, 4, 64, 4, 3).mean((1, 3))
    assert np.abs(patch.astype(float) - ref).mean() < 12
    # Out of bounds: white, not black.
    edge = s.read_region(2048 - 32, 2048 - 32, 64, 64)
    assert edge[40:, 40:].min() == 255 and edge[:32, :32].mean() < 255
    with pytest.raises(slide_lib.MagnificationUnavailableError):
      s.read_at(0, 0, 80, 32)


def test_corrupt_tile_raises_clear_error(tmp_path):
  path = _slide(tmp_path, size=1024)
  synth.corrupt_tile(path, level_page=0, tile_index=5)
  with slide_lib.open_slide(path) as s:
    x, y = (5 % 4) * 256, (5 // 4) * 256
    with pytest.raises(slide_lib.CorruptTileError, match="cannot decode"):
      s.read_region(x + 10, y + 10, 32, 32)
    s.read_region(0, 0, 32, 32)  # other tiles still read


def test_grid_geometry_quadtree():
  mags = grid.parse_magnifications("5,10,20,40")
  extent = grid.root_extent(40.0, mags, 224)
  assert extent == 1792
  assert grid.root_extent(20.04, (5, 10, 20), 224) % 4 == 0
  patches = grid.bag_layout(1792, 3584, extent, mags)
  counts = [sum(p.level == l for p in patches) for l in range(4)]
  assert counts == [1, 4, 16, 64] == grid.bags_per_level(mags)
  assert patches[0].parent == -1 and (patches[0].x, patches[0].y) == (1792, 3584)
  for i, p in enumerate(patches[1:], start=1):
    q = patches[p.parent]
    assert q.level == p.level - 1 and p.extent * 2 == q.extent
    assert q.x <= p.x and p.x + p.extent <= q.x + q.extent
    assert q.y <= p.y and p.y + p.extent <= q.y + q.extent
  for level in range(1, 4):
    lv = [p for p in patches if p.level == level]
    side = extent >> level
    n = 2 ** level
    # Row-major and exact: patch k of the level sits at (col, row) = (k % n, k // n).
    assert [(p.x, p.y) for p in lv] == [(1792 + (k % n) * side, 3584 + (k // n) * side) for k in range(n * n)]
    # Children of one parent tile it exactly.
    for parent in {p.parent for p in lv}:
      kids = [p for p in lv if p.parent == parent]
      assert len(kids) == 4 and sum(k.extent ** 2 for k in kids) == patches[parent].extent ** 2
  with pytest.raises(grid.GridError):
    grid.parse_magnifications("5,7.5")
  assert grid.root_positions(1000, 600, 256) == [(0, 0), (256, 0), (512, 0), (0, 256), (256, 256), (512, 256)]


def test_tissue_mask_and_fraction(tmp_path):
  assert not tissue.tissue_mask(np.full((64, 64, 3), 245, np.uint8)).any()
  assert not tissue.tissue_mask(np.zeros((64, 64, 3), np.uint8)).any()  # black padding
  img = np.full((64, 64, 3), 245, np.uint8)
  img[16:48, 16:48] = (200, 120, 180)
  tm = tissue.TissueMap(tissue.tissue_mask(img, cleanup_px=0), downsample=10.0)
  assert tm.fraction(160, 160, 320) == pytest.approx(1.0)
  assert tm.fraction(0, 0, 160) == 0.0
  assert tm.fraction(0, 0, 640) == pytest.approx(0.25)
  assert tm.fraction(155, 160, 10) == pytest.approx(0.5)  # half a mask pixel covered


def test_real_slide_metadata(real_slide):
  with slide_lib.open_slide(real_slide) as s:
    assert s.magnification == pytest.approx(10 / 0.499) and s.mpp == pytest.approx(0.499)
    assert s.dimensions == (2220, 2967)
    tmap = tissue.slide_tissue_map(s, 224)
    assert 0.1 < tmap.mask.mean() < 0.9
    with pytest.raises(slide_lib.MagnificationUnavailableError, match="highest magnification is 20"):
      s.check_magnification(40)
