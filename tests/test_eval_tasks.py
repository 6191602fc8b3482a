"""Evaluation end to end: data sources built from synthetic slides, a tiny random model
directory, every task through `pathjax eval`, periodic evaluators, and bad input."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from pathjax.evaluate import data as data_lib
from pathjax.evaluate import prompts as prompts_lib

SIZE = 32          # model input size
PATCH = 64         # grid patch size of the synthetic slides
CLASSES = ("tumor", "stroma", "lymphocytes", "adipose", "necrosis", "mucus")


def run_eval(argv):
  from pathjax.cli import main
  return main(["eval", "--no-progress", "--batch-size", "16"] + list(argv))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
  from pathjax.wsi import synth
  out = str(tmp_path_factory.mktemp("slides"))
  synth.write_synthetic_slides(out, 2, seed=3, size=1024, patch_size=PATCH)
  return out


@pytest.fixture(scope="module")
def tokenizer_dir(synth_dir, tmp_path_factory):
  from pathjax.input import tokenize
  texts = list(tokenize.read_caption_texts([os.path.join(synth_dir, "captions.jsonl")]))
  texts += [t for name in ("synth", "crc100k") for c in prompts_lib.load_prompts(name).classes
            for t in prompts_lib.load_prompts(name).texts(c)]
  return tokenize.train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=600,
                                      context_length=16)


def _random_params(kind, module, seed):
  """Random parameters from the shapes alone (no init compile: tests stay fast)."""
  from pathjax.models.model_dir import abstract_params
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(leaf.shape, np.float32)
    if "bias" in name:
      return np.zeros(leaf.shape, np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, abstract_params(kind, module))


def _towers(tokenizer_dir, with_text=True):
  from pathjax.input.tokenize import TextTokenizer
  from pathjax.models.text import TextTransformer
  from pathjax.models.vit import ViT
  vit = ViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, image_size=SIZE, pool="avg")
  towers = {"vision": dict(kind="vit", module=vit, params=_random_params("vit", vit, 0),
                           projection=np.random.default_rng(0).normal(size=(32, 24)).astype(np.float32))}
  if with_text:
    tok = TextTokenizer(tokenizer_dir, context_length=16)
    text = TextTransformer(vocab_size=tok.vocab_size, width=32, depth=1, num_heads=2, mlp_dim=64,
                           context_length=16, embed_dim=24)
    towers["text"] = dict(kind="clip_text", module=text, params=_random_params("clip_text", text, 1),
                          projection=None)
  return towers


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
  from pathjax.models.model_dir import save_model_dir
  out = str(tmp_path_factory.mktemp("model") / "m")
  return save_model_dir(out, _towers(tokenizer_dir), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def image_only_model_dir(tokenizer_dir, tmp_path_factory):
  from pathjax.models.model_dir import save_model_dir
  out = str(tmp_path_factory.mktemp("model") / "vision_only")
  return save_model_dir(out, _towers(tokenizer_dir, with_text=False))


@pytest.fixture(scope="module")
def patch_sets(synth_dir, tmp_path_factory):
  """An ImageFolder and a CSV manifest (with MPP and captions) of 20x patches cut from the
  synthetic slides, with their ground-truth classes."""
  slides = data_lib.load_dataset(f"slides:{synth_dir}?patch_size={PATCH}")
  root = tmp_path_factory.mktemp("patches")
  folder = root / "folder"
  rows = []
  for i in range(len(slides)):
    label = slides.labels[i]
    img = slides.image(i, 2 * PATCH)  # 128 px at 20x: rescaling to 5x..40x has room
    os.makedirs(folder / label, exist_ok=True)
    rel = f"{label}/{i:04d}.png"
    Image.fromarray(img).save(folder / rel)
    rows.append({"path": f"folder/{rel}", "label": label, "mpp": 0.5, "caption": slides.captions[i]})
  with open(root / "manifest.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["path", "label", "mpp", "caption"])
    w.writeheader()
    w.writerows(rows)
  return {"folder": str(folder), "csv": str(root / "manifest.csv"), "n": len(rows),
          "labels": sorted({r["label"] for r in rows})}


# ---------------------------------------------------------------------------------------
# Data sources


def test_data_sources_agree(patch_sets, synth_dir):
  folder = data_lib.load_dataset(f"imagefolder:{patch_sets['folder']}?mpp=0.5")
  manifest = data_lib.load_dataset(patch_sets["csv"])
  slides = data_lib.load_dataset(f"slides:{synth_dir}?patch_size={PATCH}")
  assert len(folder) == len(manifest) == len(slides) == patch_sets["n"]
  assert sorted(folder.labels) == sorted(manifest.labels) == sorted(slides.labels)
  assert set(folder.labels) <= set(CLASSES)
  assert manifest.has_captions and slides.has_captions
  # Same field of view: the 20x folder image at 20x is the slide patch (up to PNG = exact).
  j = manifest.ids.index(manifest.ids[0])
  img = manifest.at_magnification(20).image(j, 2 * PATCH)
  assert img.shape == (2 * PATCH, 2 * PATCH, 3) and img.dtype == np.uint8
  # 10x from a 0.5 um/px image halves it; 40x crops the centre and upsamples.
  assert manifest.at_magnification(10).image(0, 48).shape == (48, 48, 3)
  assert manifest.at_magnification(40).image(0, 48).shape == (48, 48, 3)
  # Slides re-cut the same centre at every magnification.
  for m in (5, 10, 20, 40):
    assert slides.at_magnification(m).image(0, SIZE).shape == (SIZE, SIZE, 3)


def test_to_magnification_scales_by_mpp():
  img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (200, 1, 3)))
  # 0.5 um/px to 1.0 um/px (10x): 200 px -> 100 px; a 64 crop of the centre.
  out = data_lib.to_magnification(img, 64, 0.5, 10)
  assert out.shape == (64, 64, 3)
  row = out[0, :, 0].astype(int)
  assert abs(np.diff(row).mean() - 2.0) < 0.1  # each output pixel spans two input pixels
  # Unknown MPP: just a centre square resized.
  assert data_lib.to_magnification(img, 50, None, 10).shape == (50, 50, 3)


def test_records_source(synth_dir, tmp_path):
  from pathjax.input import tile
  out = str(tmp_path / "rec")
  tile.tile_slides([os.path.join(synth_dir, "synth-000.svs")], os.path.join(synth_dir, "captions.jsonl"),
                   out, patch_size=PATCH, progress=False, tissue_threshold=0.3)
  all_mags = data_lib.load_dataset(f"records:{out}")
  at20 = data_lib.load_dataset(f"records:{out}@20")
  assert 0 < len(at20) < len(all_mags)
  assert all("@20x" in i for i in at20.ids)
  assert set(at20.labels) <= set(CLASSES)
  assert at20.image(0, SIZE).shape == (SIZE, SIZE, 3)
  assert len(all_mags.at_magnification(40)) > len(all_mags.at_magnification(5))


def test_tfds_not_prepared_says_how(tmp_path):
  with pytest.raises(data_lib.DataError, match="tfds build patch_camelyon --file_format=array_record"):
    data_lib.load_dataset(f"tfds:patch_camelyon:test?data_dir={tmp_path}")


def test_tfds_source_with_injected_source():
  rng = np.random.default_rng(0)
  source = [{"image": rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), "label": i % 2} for i in range(6)]
  ds = data_lib.tfds_dataset("patch_camelyon", "test", source=source)
  assert ds.labels == ["normal", "tumor"] * 3 and ds.mpp[0] == pytest.approx(0.972)
  assert ds.at_magnification(10).image(0, SIZE).shape == (SIZE, SIZE, 3)


def test_bad_spec_and_option():
  with pytest.raises(data_lib.DataError, match="imagefolder:DIR"):
    data_lib.load_dataset("/no/such/thing")
  with pytest.raises(data_lib.DataError, match="unknown option"):
    data_lib.load_dataset("csv:/x.csv?mmp=0.5")


# ---------------------------------------------------------------------------------------
# Every task end to end through the command line


def _metrics(out):
  with open(os.path.join(out, "metrics.json")) as f:
    return json.load(f)


def test_every_task_end_to_end(model_dir, patch_sets, synth_dir, tmp_path, capsys):
  folder = f"imagefolder:{patch_sets['folder']}?mpp=0.5"
  runs = [
      ("zeroshot", folder, ["--prompts", "synth"], ["confusion_matrix.png"]),
      ("cross_mag", f"slides:{synth_dir}?patch_size={PATCH}", ["--prompts", "synth"],
       ["cross_mag.png", "confusion_matrix_5x.png"]),
      ("cross_mag", patch_sets["csv"], ["--prompts", "synth", "--magnifications", "10,40"], ["cross_mag.png"]),
      ("linear_probe", folder, [], ["confusion_matrix.png"]),
      ("knn", patch_sets["csv"], ["--k", "5"], ["confusion_matrix.png"]),
      ("kshot", folder, ["--shots", "1,4", "--seeds", "2"], ["kshot.png"]),
      ("retrieval", patch_sets["csv"], [], []),
  ]
  for i, (task, spec, extra, pngs) in enumerate(runs):
    out = str(tmp_path / f"{i}-{task}")
    assert run_eval(["--model", model_dir, "--task", task, "--data", spec, "--out", out] + extra) == 0, task
    m = _metrics(out)
    assert m["task"] == task
    assert os.path.exists(os.path.join(out, "predictions.csv"))
    for png in pngs:
      with Image.open(os.path.join(out, png)) as im:
        assert im.size[0] > 100
    if task in ("zeroshot", "linear_probe", "knn"):
      for key in ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "auc", "kappa", "quadratic_kappa"):
        assert key in m["metrics"]
      assert 0 <= m["metrics"]["accuracy"] <= 1
    if task == "cross_mag":
      assert {"mean"} <= set(m["metrics"])
    if task == "retrieval":
      assert 0 <= m["metrics"]["i2t_R@1"] <= m["metrics"]["i2t_R@5"] <= m["metrics"]["i2t_R@10"] <= 1
    if task == "kshot":
      assert m["metrics"]["4shot"]["balanced_accuracy_std"] >= 0
  printed = capsys.readouterr().out
  assert "magnification" in printed and "mean" in printed  # the cross-mag table
  with open(tmp_path / "0-zeroshot" / "predictions.csv") as f:
    header = next(csv.reader(f))
  assert header[:4] == ["id", "label", "prediction", "correct"]


def test_workdir_and_probe_with_train_data(model_dir, patch_sets, tmp_path):
  workdir = tmp_path / "wd"
  workdir.mkdir()
  os.symlink(model_dir, workdir / "model")
  out = str(tmp_path / "lp")
  spec = f"imagefolder:{patch_sets['folder']}"
  assert run_eval(["--workdir", str(workdir), "--task", "linear_probe", "--data", spec,
                   "--train-data", patch_sets["csv"], "--out", out]) == 0
  assert _metrics(out)["metrics"]["C"] > 0


# ---------------------------------------------------------------------------------------
# Bad input


def test_empty_class_folder_and_unreadable_image(model_dir, patch_sets, tmp_path, capsys):
  import shutil
  folder = tmp_path / "folder"
  shutil.copytree(patch_sets["folder"], folder)
  os.makedirs(folder / "necrosis_extra")  # an empty class folder
  bad = folder / patch_sets["labels"][0] / "broken.png"
  bad.write_bytes(b"not a png at all")
  ds = data_lib.load_dataset(f"imagefolder:{folder}")
  assert "necrosis_extra" in ds.classes and any("necrosis_extra" in w for w in ds.warnings)
  out = str(tmp_path / "out")
  prompts = tmp_path / "p.json"
  base = prompts_lib.load_prompts("synth")
  names = dict(base.classnames, necrosis_extra=["more necrosis"])
  prompts.write_text(json.dumps({"classnames": names, "templates": base.templates}))
  assert run_eval(["--model", model_dir, "--task", "zeroshot", "--data", f"imagefolder:{folder}",
                   "--prompts", str(prompts), "--out", out]) == 0
  err = capsys.readouterr().err
  assert "necrosis_extra" in err and "hold no images" in err
  assert "skipped 1 unreadable image" in err and "broken.png" in err
  m = _metrics(out)
  assert [s[0] for s in m["skipped"]] == [os.path.relpath(bad, folder)]
  assert m["metrics"]["num_examples"] == patch_sets["n"]


def test_all_class_folders_empty(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  with pytest.raises(data_lib.DataError, match="every class folder is empty"):
    data_lib.load_dataset(f"imagefolder:{tmp_path}")


def test_label_not_in_prompt_file(model_dir, patch_sets, tmp_path, capsys):
  prompts = tmp_path / "p.json"
  prompts.write_text(json.dumps({"classnames": {"tumor": ["tumor"], "stroma": ["stroma"]},
                                 "templates": ["an H&E image of {}."]}))
  code = run_eval(["--model", model_dir, "--task", "zeroshot", "--data", patch_sets["csv"],
                   "--prompts", str(prompts), "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code == 2
  assert "not classes of the prompt file" in err
  assert "Data labels:" in err and "Prompt classes: ['tumor', 'stroma']" in err
  assert "mucus" in err or "adipose" in err or "lymphocytes" in err


def test_prompt_file_without_placeholder(model_dir, patch_sets, tmp_path, capsys):
  prompts = tmp_path / "p.json"
  prompts.write_text(json.dumps({"classnames": {"tumor": ["tumor"]},
                                 "templates": ["an H&E image of CLASSNAME.", "an H&E image."]}))
  code = run_eval(["--model", model_dir, "--task", "zeroshot", "--data", patch_sets["csv"],
                   "--prompts", str(prompts), "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code == 2 and "no class placeholder" in err and "'an H&E image.'" in err
  with pytest.raises(prompts_lib.PromptError, match="no class placeholder"):
    prompts_lib.parse_prompts({"classnames": {"a": ["a"]}, "templates": ["x"]})


def test_image_only_model_asked_for_zeroshot(image_only_model_dir, patch_sets, tmp_path, capsys):
  code = run_eval(["--model", image_only_model_dir, "--task", "zeroshot", "--data", patch_sets["csv"],
                   "--prompts", "synth", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code == 2 and "needs a text tower" in err and "linear_probe or knn" in err
  # Probes work without a text tower.
  assert run_eval(["--model", image_only_model_dir, "--task", "knn", "--data", patch_sets["csv"],
                   "--out", str(tmp_path / "k")]) == 0


def test_cross_mag_without_mpp_is_explained(model_dir, patch_sets, tmp_path, capsys):
  code = run_eval(["--model", model_dir, "--task", "cross_mag", "--data",
                   f"imagefolder:{patch_sets['folder']}", "--prompts", "synth", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code == 2 and "?mpp=" in err


def test_embed_data_exports_a_whole_dataset(model_dir, patch_sets, tmp_path):
  """`pathjax embed --data SPEC`: features of every example with ids and labels."""
  from pathjax import cli
  out = tmp_path / "feats.npy"
  code = cli.main(["embed", "--model", model_dir, "--data", patch_sets["csv"], "--out", str(out),
                   "--no-progress", "--workers", "1"])
  assert code == 0
  feats = np.load(out)
  with open(tmp_path / "feats.index.csv") as f:
    index = list(csv.DictReader(f))
  assert feats.shape[0] == len(index) == patch_sets["n"]
  assert sorted({row["label"] for row in index}) == patch_sets["labels"]
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-4)
  code = cli.main(["embed", "--model", model_dir, "--data", patch_sets["csv"],
                   "--out", str(tmp_path / "feats.parquet"), "--no-progress", "--workers", "1"])
  assert code == 0 and (tmp_path / "feats.parquet").exists()


def test_slide_zeroshot_of_a_patch_model_through_the_cli(model_dir, synth_dir, patch_sets, tmp_path,
                                                         capsys):
  """`pathjax eval --task slide_zeroshot --data slides:DIR --labels FILE` with a CLIP-like
  patch model: MI-Zero's top-k pooling of each slide's patch scores (pathjax.evaluate.slides)."""
  from pathjax.evaluate import features as features_lib
  from pathjax.evaluate.slides import topk_pool
  spec = f"slides:{synth_dir}?patch_size={PATCH}"
  ds = data_lib.load_dataset(spec)
  slide_ids = sorted(set(ds.slides))
  labels = {s: ("tumor", "stroma")[i % 2] for i, s in enumerate(slide_ids)}
  (tmp_path / "labels.json").write_text(json.dumps(labels))
  out = str(tmp_path / "out")
  assert run_eval(["--model", model_dir, "--task", "slide_zeroshot", "--data", spec, "--labels",
                   str(tmp_path / "labels.json"), "--prompts", "synth", "--topk", "1,4,1000",
                   "--out", out]) == 0
  m = _metrics(out)["metrics"]
  assert m["topk"] == 4 and m["num_slides"] == len(slide_ids) and m["num_patches"] == len(ds)
  assert {"top1", "top4", "top1000"} <= set(m) and m["auc"] == m["top4"]["auc"]
  with open(os.path.join(out, "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  # The same scores from the model directory's embedder, pooled here.
  embedder = features_lib.Embedder.from_model_dir(model_dir)
  p = prompts_lib.load_prompts("synth")
  classifier = prompts_lib.build_classifier(p, embedder.text)
  feats = features_lib.extract_features(ds, embedder, batch_size=16, progress=False, report=None)
  slide_of = np.array([ds.slides[i] for i in feats.indices])
  for row in rows:
    want = topk_pool(feats.embeddings[slide_of == row["slide"]] @ classifier.T, (4,))[4]
    np.testing.assert_allclose([float(row[f"score_{c}"]) for c in p.classes], want, atol=1e-5)
  capsys.readouterr()
  # Without labels, or with patches that do not say their slide: exit 2, what to do.
  assert run_eval(["--model", model_dir, "--task", "slide_zeroshot", "--data", spec,
                   "--out", str(tmp_path / "o2")]) == 2
  assert "slide labels" in capsys.readouterr().err
  assert run_eval(["--model", model_dir, "--task", "slide_zeroshot", "--data",
                   f"imagefolder:{patch_sets['folder']}", "--labels", str(tmp_path / "labels.json"),
                   "--out", str(tmp_path / "o3")]) == 2
  assert "records:DIR[@MAG] or slides:DIR" in capsys.readouterr().err
