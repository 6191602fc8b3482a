"""Synthetic slides: format, metadata, determinism, labels and captions per magnification."""

import json

import numpy as np
import pytest
import tiffslide

from pathjax import cli
from pathjax.input import keywords
from pathjax.wsi import grid, synth
from slide_fixtures import TINY_PATCH


def test_synthetic_slide_is_svs_like_pyramid(tiny_slides):
  with tiffslide.TiffSlide(tiny_slides.slide_paths[0]) as s:
    assert s.properties["tiffslide.vendor"] == "aperio"
    assert s.properties["tiffslide.mpp-x"] == pytest.approx(0.25)
    assert s.properties["tiffslide.objective-power"] == 40
    assert s.level_count >= 2 and s.level_downsamples[1] == pytest.approx(4.0)
    assert s.properties["tiffslide.level[0].tile-width"] == 256
    assert "thumbnail" in s.associated_images


def test_deterministic(tmp_path):
  a = synth.write_synthetic_slide(str(tmp_path / "a.svs"), width=2048, seed=7)
  b = synth.write_synthetic_slide(str(tmp_path / "b.svs"), width=2048, seed=7)
  assert np.array_equal(a.class_map, b.class_map)
  with tiffslide.TiffSlide(a.path) as sa, tiffslide.TiffSlide(b.path) as sb:
    assert np.array_equal(sa.read_region((0, 0), 1, (512, 512), as_array=True),
                          sb.read_region((0, 0), 1, (512, 512), as_array=True))


def test_truth_holds_the_class_maps_the_captions_were_labelled_from(tiny_slides):
  truth = synth.read_truth(tiny_slides.truth_path)
  assert sorted(truth) == ["synth-000", "synth-001", "synth-002"]
  lines = [json.loads(l) for l in open(tiny_slides.captions_path)]
  checked = 0
  for line in lines[::7]:
    t = truth[line["slide"]]
    assert sum(t.fractions.values()) == pytest.approx(1.0)
    extent = int(round(TINY_PATCH * 40 / line["magnification"]))
    label, _ = synth.patch_label(t.class_map, synth.TISSUE_CLASSES, line["x"], line["y"], extent)
    assert label == line["label"]
    checked += 1
  assert checked > 5


def test_captions_per_magnification_name_the_class(tiny_slides):
  lines = [json.loads(l) for l in open(tiny_slides.captions_path)]
  assert lines and {l["slide"] for l in lines} == {"synth-000", "synth-001", "synth-002"}
  labels = {l["label"] for l in lines}
  assert len(labels - {synth.BACKGROUND}) >= 4
  low = [l for l in lines if l["magnification"] <= 10 and l["label"] != synth.BACKGROUND]
  high = [l for l in lines if l["magnification"] >= 20 and l["label"] != synth.BACKGROUND]
  for l in low + high:
    assert synth.CLASS_PROMPT_NAMES[l["label"]] in l["caption"].lower()
    assert f"{l['magnification']:g}x" in l["caption"]
  low_words = " ".join(l["caption"].lower() for l in low)
  high_words = " ".join(l["caption"].lower() for l in high)
  assert "architecture" in low_words and "nuclei" not in low_words
  assert "nuclei" in high_words and "architecture" not in high_words
  # Keys follow the tiling grid exactly.
  extent = grid.root_extent(40.0, (5, 10, 20, 40), 32)
  for l in lines:
    level = [5, 10, 20, 40].index(l["magnification"])
    assert l["x"] % (extent >> level) == 0 and l["y"] % (extent >> level) == 0


def test_classes_look_different_at_high_magnification(tmp_path):
  rgb, cmap = synth.render_tissue(2048, 2048, seed=5, region_px=400)
  means = {}
  for k, name in enumerate(synth.TISSUE_CLASSES):
    sel = np.kron(cmap == k, np.ones((synth.LABEL_SCALE, synth.LABEL_SCALE), bool))[:2048, :2048]
    if sel.sum() > 10000:
      px = rgb[sel].astype(float)
      means[name] = (px.mean(0), (px.mean(-1) < 110).mean())  # colour, fraction of dark nuclei
  assert len(means) >= 3
  names = list(means)
  for i in range(len(names)):
    for j in range(i + 1, len(names)):
      a, b = means[names[i]], means[names[j]]
      assert np.abs(a[0] - b[0]).max() > 8 or abs(a[1] - b[1]) > 0.03, (names[i], names[j])


def test_synth_cli(tmp_path, capsys):
  assert cli.main(["synth-slides", "--out", str(tmp_path), "--n", "1", "--size", "1024",
                   "--patch-size", "32", "--caption-drop-fraction", "0.5"]) == 0
  assert "wrote 1 slides" in capsys.readouterr().out
  assert (tmp_path / "synth-000.svs").exists() and (tmp_path / "captions.jsonl").exists()


def test_keyword_extractor():
  kws = keywords.extract_keywords("The image shows a lymph node with follicles, a mantle zone and plasma cells.")
  assert kws == ["lymph node", "follicles", "mantle zone", "plasma cells"]
  assert keywords.extract_keywords("High-power view of tumor cells with large pleomorphic nuclei at 40x.") == [
      "tumor cells", "large pleomorphic nuclei"]
  assert keywords.extract_keywords("") == []
  assert keywords.bag_keywords([["a", "b"], ["b"], ["c", "b", "a"]]) == ["b", "a", "c"]
