"""Tiling slides into bag records: geometry, captions, bad input, resume, CLI, real tissue."""

import glob
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import TINY_MAGS, TINY_PATCH, TINY_SIZE
from tile_helpers import tile_tiny

from pathjax import cli
from pathjax.input import records, tile
from pathjax.wsi import synth, tissue


def _bags(out):
  source, manifest = records.open_records(str(out))
  return [source.full_bag(i) for i in range(len(source))], manifest


@pytest.fixture(scope="module")
def tiled(tiny_slides, tmp_path_factory):
  out = tmp_path_factory.mktemp("tiled")
  manifest = tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, out)
  return out, manifest


def test_bags_geometry_captions_labels(tiled, tiny_slides):
  out, manifest = tiled
  bags, m2 = _bags(out)
  c = manifest["counts"]
  assert m2["counts"] == c and c["slides"] == 3 and c["slides_tiled"] == 3 and c["bags"] == len(bags) > 0
  assert c["patches_per_magnification"] == {"5": c["bags"], "10": 4 * c["bags"], "20": 16 * c["bags"], "40": 64 * c["bags"]}
  assert c["captions_missing"] == 0 and c["captions_matched"] == c["patches"]
  assert manifest["shards"] == sorted(os.path.basename(p) for p in records.shard_paths(str(out)))
  assert manifest["pathjax_version"] and manifest["options"]["patch_size"] == TINY_PATCH
  for bag in bags:
    assert [len(bag.level_indices(l)) for l in range(4)] == [1, 4, 16, 64]
    root = bag.patches[0]
    assert root.parent == -1 and root.extent == TINY_PATCH * 8 and root.tissue >= 0.5
    assert root.x % root.extent == 0 and root.y % root.extent == 0
    for i, p in enumerate(bag.patches):
      if i:
        q = bag.patches[p.parent]
        assert q.level == p.level - 1 and p.extent * 2 == q.extent
        assert q.x <= p.x < q.x + q.extent and q.y <= p.y < q.y + q.extent
        assert p.x + p.extent <= q.x + q.extent and p.y + p.extent <= q.y + q.extent
      assert p.magnification == TINY_MAGS[p.level] and p.has_caption and p.caption
      assert p.label in synth.TISSUE_CLASSES + (synth.BACKGROUND,)
      if p.label != synth.BACKGROUND:
        assert synth.CLASS_PROMPT_NAMES[p.label] in p.caption.lower()
      img = Image.open(io.BytesIO(p.jpeg))
      assert img.size == (TINY_PATCH, TINY_PATCH) and img.mode == "RGB"
    assert bag.keywords and set(bag.keywords) == {k for p in bag.patches for k in p.keywords}
    for c_ in range(len(bag.patches)):
      assert len(bag.children(c_)) in (0, 4)


def test_patch_pixels_match_slide(tiled):
  from pathjax.wsi import slide as slide_lib
  out, manifest = tiled
  bags, _ = _bags(out)
  bag = bags[0]
  path = next(s["path"] for s in manifest["slides"] if s["slide_id"] == bag.slide_id)
  with slide_lib.open_slide(path) as s:
    for i in (0, 1, 5, 21, 84):
      p = bag.patches[i]
      ref = s.read_at(p.x, p.y, p.magnification, TINY_PATCH).astype(float)
      got = np.asarray(Image.open(io.BytesIO(p.jpeg))).astype(float)
      assert np.abs(ref - got).mean() < 10


def test_missing_captions_counted_never_invented(tiny_slides, tmp_path):
  lines = open(tiny_slides.captions_path).read().splitlines()
  kept = tmp_path / "captions.jsonl"
  kept.write_text("\n".join(lines[::2]) + "\n")
  m = tile_tiny(tiny_slides.slide_paths[:1], str(kept), tmp_path / "out")
  bags, _ = _bags(tmp_path / "out")
  missing = [p for b in bags for p in b.patches if not p.has_caption]
  assert missing and m["counts"]["captions_missing"] == len(missing)
  assert all(p.caption == "" and p.keywords == [] for p in missing)
  assert sum(m["counts"]["captions_missing_per_magnification"].values()) == len(missing)
  m = tile_tiny(tiny_slides.slide_paths[:1], None, tmp_path / "nocap")
  assert m["counts"]["captions_missing"] == m["counts"]["patches"] > 0


def test_bad_slides_are_counted_skips(tiny_slides, tmp_path):
  d = tmp_path / "slides"
  d.mkdir()
  good = str(d / "good.svs")
  shutil.copy(tiny_slides.slide_paths[0], good)
  data = open(good, "rb").read()
  (d / "truncated.svs").write_bytes(data[: len(data) // 3])
  (d / "junk.svs").write_bytes(b"II*\x00" + os.urandom(3000))
  import tifffile
  tifffile.imwrite(str(d / "plain.tif"), np.full((512, 512, 3), 180, np.uint8), photometric="rgb", metadata=None)
  synth.write_synthetic_slide(str(d / "nometa.svs"), width=TINY_SIZE, seed=2, mpp=None, app_mag=None, region_px=300)
  synth.write_synthetic_slide(str(d / "max20x.svs"), width=TINY_SIZE, seed=2, mpp=0.5, app_mag=20, region_px=300)
  synth.write_synthetic_slide(str(d / "blank.svs"), width=TINY_SIZE, seed=2, tissue_fraction=0.0)
  bad_tile = str(d / "badtile.svs")
  synth.write_synthetic_slide(bad_tile, width=TINY_SIZE, seed=4, tissue_fraction=1.0, region_px=300)
  synth.corrupt_tile(bad_tile, level_page=0, tile_index=5)
  m = tile_tiny(str(d / "*"), tiny_slides.captions_path, tmp_path / "out", workers=1)
  reasons = {s["slide"]: s["reason"] for s in m["skipped"]["slides"]}
  assert reasons == {"truncated": "corrupt_or_truncated", "junk": "corrupt_or_truncated",
                     "plain": "not_pyramidal", "nometa": "no_magnification_metadata",
                     "max20x": "magnification_unavailable", "blank": "no_tissue"}
  for s in m["skipped"]["slides"]:
    assert s["message"]
  c = m["counts"]
  assert c["slides"] == 8 and c["slides_tiled"] == 2 and c["slides_skipped"] == 6
  assert m["skipped"]["slides_by_reason"]["corrupt_or_truncated"] == 2
  # The corrupt tile loses only the bags that touch it, counted.
  assert m["skipped"]["bags_by_reason"] == {"corrupt_tile": c["bags_skipped"]} and c["bags_skipped"] >= 1
  bags, _ = _bags(tmp_path / "out")
  assert {b.slide_id for b in bags} == {"good", "badtile"}
  # The override makes the metadata-free slide usable.
  m = tile_tiny([str(d / "nometa.svs")], None, tmp_path / "out2", magnification_override=40)
  assert m["counts"]["slides_tiled"] == 1
  # 20x slide tiles fine when 40x is not asked.
  m = tile_tiny([str(d / "max20x.svs")], None, tmp_path / "out3", magnifications=(5, 10, 20))
  assert m["counts"]["slides_tiled"] == 1 and m["counts"]["patches_per_magnification"]["20"] > 0


def test_caption_file_problems_reported_with_line_numbers(tiny_slides, tmp_path):
  lines = open(tiny_slides.captions_path, "rb").read().splitlines()
  bad = lines[:3] + [b"{not json", b'{"slide": "x", "caption": "\xff\xfe bad"}', lines[1], b"[1, 2]",
                     b'{"slide": "synth-000", "magnification": 5, "x": -1, "y": 0, "caption": "c"}'] + lines[3:]
  path = tmp_path / "captions.jsonl"
  path.write_bytes(b"\n".join(bad) + b"\n")
  m = tile_tiny(tiny_slides.slide_paths, str(path), tmp_path / "out")
  cap = m["captions"]
  assert cap["issues_by_kind"] == {"malformed_json": 1, "invalid_utf8": 1, "duplicate_key": 1,
                                   "not_an_object": 1, "bad_value": 1}
  issues = [json.loads(l) for l in open(tmp_path / "out" / "caption_issues.jsonl")]
  assert [i["line"] for i in issues] == [4, 5, 6, 7, 8]
  assert "line 2" in issues[2]["message"]
  assert m["counts"]["captions_missing"] == 0  # the duplicate's first copy is kept


def test_resume_after_killed_run(tiny_slides, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  opts = tile.TileOptions(magnifications=TINY_MAGS, patch_size=TINY_PATCH)
  # A killed run: one slide finished, one shard half-written, no manifest.
  tile.tile_one_slide(os.path.abspath(tiny_slides.slide_paths[0]), str(out), opts, {})
  (out / "bags-synth-001.array_record.tmp-12345").write_bytes(b"partial")
  (out / "pixels-synth-001.array_record.tmp-12345").write_bytes(b"partial")
  with pytest.raises(records.IncompleteRecordsError, match="re-run `pathjax tile`"):
    records.open_records(str(out))
  m = tile_tiny(tiny_slides.slide_paths, None, out)
  assert m["counts"]["slides_resumed"] == 1 and m["counts"]["slides_tiled"] == 3
  assert not glob.glob(str(out / "*.tmp-*"))
  bags, _ = _bags(out)
  assert len(bags) == m["counts"]["bags"]
  # A finished directory whose shard then vanishes is refused.
  os.remove(records.shard_paths(str(out))[0])
  with pytest.raises(records.IncompleteRecordsError):
    records.open_records(str(out))
  m2 = tile_tiny(tiny_slides.slide_paths, None, out)  # and a rerun repairs it
  assert m2["counts"]["slides_resumed"] == 2 and m2["counts"]["bags"] == m["counts"]["bags"]
  # So is one whose pixel shard vanishes; the rerun redoes just that slide.
  os.remove(records.pixels_path(records.shard_paths(str(out))[1]))
  with pytest.raises(records.IncompleteRecordsError, match="pixel shards"):
    records.open_records(str(out))
  m3 = tile_tiny(tiny_slides.slide_paths, None, out)
  assert m3["counts"]["slides_resumed"] == 2 and m3["counts"]["bags"] == m["counts"]["bags"]
  assert len(_bags(out)[0]) == m["counts"]["bags"]


def test_parallel_workers_same_result(tiled, tiny_slides, tmp_path):
  _, m1 = tiled
  m2 = tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, tmp_path / "out", workers=2)
  assert m2["counts"] == {**m1["counts"]} and m2["shards"] == m1["shards"]
  for a, b in zip(records.shard_paths(str(tmp_path / "out")), records.shard_paths(str(tiled[0]))):
    assert open(a, "rb").read() == open(b, "rb").read()


def test_cli_tile_and_inspect(tiny_slides, tmp_path, capsys):
  out = str(tmp_path / "out")
  code = cli.main(["tile", "--slides", os.path.dirname(tiny_slides.slide_paths[0]) + "/*.svs",
                   "--captions", tiny_slides.captions_path, "--out", out, "--magnifications", "5,10,20,40",
                   "--patch-size", str(TINY_PATCH), "--no-progress"])
  assert code == 0
  capsys.readouterr()
  png = str(tmp_path / "sheet.png")
  assert cli.main(["inspect", out, "--records", "2", "--png", png, "--bag", "1"]) == 0
  printed = capsys.readouterr().out
  lines = printed.strip().splitlines()
  rec = json.loads(lines[-1])
  assert rec["bag_index"] >= 0 and "jpeg" not in rec["patches"][0] and rec["patches"][0]["pixel"] >= 0
  assert '"counts"' in printed
  assert Image.open(png).size[0] > 200
  # A records directory without manifest is refused by inspect.
  os.remove(os.path.join(out, "manifest.json"))
  assert cli.main(["inspect", out]) == 1


def test_real_slide_tiles_and_respects_20x(real_slide, tmp_path):
  from pathjax.input import inspect_cli
  m = tile.tile_slides([real_slide], None, str(tmp_path / "r40"), magnifications=(5, 10, 20, 40),
                       patch_size=112, progress=False)
  assert m["counts"]["slides_tiled"] == 0
  assert m["skipped"]["slides"][0]["reason"] == "magnification_unavailable"
  assert "highest magnification is 20" in m["skipped"]["slides"][0]["message"]
  m = tile.tile_slides([real_slide], None, str(tmp_path / "r20"), magnifications=(5, 10, 20),
                       patch_size=112, progress=False)
  assert m["counts"]["slides_tiled"] == 1 and m["counts"]["bags"] >= 2
  assert m["counts"]["captions_missing"] == m["counts"]["patches"]
  bags, _ = _bags(tmp_path / "r20")
  for bag in bags:
    for level in range(3):
      pix = [np.asarray(Image.open(io.BytesIO(bag.patches[i].jpeg))) for i in bag.level_indices(level)]
      # Real H&E tissue at every magnification: stained (saturated) pixels in the level's patches.
      assert max(tissue.tissue_mask(p, cleanup_px=0).mean() for p in pix) > 0.5
  png = str(tmp_path / "real.png")
  inspect_cli.contact_sheet(bags[0], png)
  sheet = np.asarray(Image.open(png).convert("RGB"))
  assert tissue.tissue_mask(sheet, cleanup_px=0).mean() > 0.1
