"""`pathjax embed` and model directories written by save_model_dir (no torch needed)."""

import argparse
import os

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from pathjax import embed
from pathjax.convert import cli as convert_cli
from pathjax.models import model_dir as md
from pathjax.models.text import TextTransformer
from pathjax.models.vit import ViT

from test_convert import timm_state_dict


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  from pathjax.input.tokenize import train_bpe_tokenizer
  out = tmp_path_factory.mktemp("tok")
  texts = ["tumor cells with large nuclei", "normal stroma", "lymphocytes infiltrating tumor",
           "adipose tissue", "necrosis and debris"] * 20
  return train_bpe_tokenizer(texts, str(out / "tokenizer"), vocab_size=600, min_frequency=1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer_dir):
  """A vision + text model directory with a tokenizer, written by save_model_dir."""
  from pathjax.input.tokenize import TextTokenizer
  tok = TextTokenizer(tokenizer_dir, context_length=16)
  vision = ViT(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=16, image_size=32)
  text = TextTransformer(vocab_size=tok.vocab_size, width=32, depth=2, num_heads=4, mlp_dim=64,
                         context_length=16, embed_dim=24, eos_id=tok.eos_id)
  vp = vision.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  tp = text.init(jax.random.PRNGKey(1), np.zeros((1, 16), np.int32))["params"]
  proj = np.random.default_rng(0).standard_normal((32, 24)).astype(np.float32)
  out = tmp_path_factory.mktemp("models") / "clip"
  md.save_model_dir(str(out), {
      "vision": dict(kind="vit", module=vision, params=vp, projection=proj),
      "text": dict(kind="clip_text", module=text, params=tp, projection=None)},
      preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
      tokenizer_dir=tokenizer_dir, source="test")
  return str(out)


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vit")
  save_file(timm_state_dict(), str(tmp / "vit.safetensors"))
  parser = argparse.ArgumentParser()
  convert_cli.register(parser)
  args = parser.parse_args(["--vision", str(tmp / "vit.safetensors"), "--num-heads", "4",
                            "--image-size", "64", "--out", str(tmp / "m")])
  assert convert_cli.main(args) == 0
  return str(tmp / "m")


def run_embed(*argv):
  parser = argparse.ArgumentParser()
  embed.register(parser)
  return embed.main(parser.parse_args(list(argv)))


def _write_images(folder, n, size=(48, 40), seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    sub = os.path.join(folder, "a" if i % 2 else "b")
    os.makedirs(sub, exist_ok=True)
    arr = rng.integers(0, 255, size + (3,), np.uint8)
    Image.fromarray(arr).save(os.path.join(sub, f"img{i}.png" if i % 3 else f"img{i}.jpg"))


def test_save_and_load_round_trip(clip_dir):
  model = md.load_model_dir(clip_dir)
  assert model.has_text and model.has_vision and model.image_size == 32
  assert os.path.isdir(os.path.join(clip_dir, "tokenizer"))
  images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), np.uint8)
  feats = model.encode_image(images, batch_size=2)
  assert feats.shape == (3, 24)
  # uint8 input is normalised with the stored statistics; float input is used as is.
  normed = (images.astype(np.float32) / 255 - 0.5) / 0.25
  np.testing.assert_allclose(model.encode_image(normed), feats, atol=1e-5)
  text = model.encode_text(["tumor cells", "stroma"])
  assert text.shape == (2, 24)
  np.testing.assert_allclose(model.encode_text(model.tokenize(["tumor cells", "stroma"])), text,
                             atol=1e-6)


def test_embed_folder_writes_npy_and_parquet(tmp_path, vision_dir):
  import pyarrow.parquet as pq
  folder = tmp_path / "tiles"
  _write_images(str(folder), 5)
  out = tmp_path / "feats.npy"
  assert run_embed("--model", vision_dir, "--images", str(folder), "--out", str(out),
                   "--batch-size", "2", "--no-progress") == 0
  feats = np.load(out)
  assert feats.shape == (5, 32)
  table = pq.read_table(tmp_path / "feats.parquet")
  ids = table.column("id").to_pylist()
  assert ids == sorted(ids) and ids[0] == os.path.join("a", "img1.png")
  np.testing.assert_allclose(np.asarray(table.column("features").to_pylist()), feats, rtol=1e-6)
  # The same images through the library give the same features.
  model = md.load_model_dir(vision_dir)
  one = embed.load_image(str(folder / "a" / "img1.png"), model.image_size)
  assert one.shape == (64, 64, 3)
  np.testing.assert_allclose(model.encode_image(one[None])[0], feats[0], atol=1e-5)


def test_embed_npy_of_normalised_images(tmp_path, vision_dir):
  x = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  assert run_embed("--model", vision_dir, "--images", str(tmp_path / "x.npy"), "--out",
                   str(tmp_path / "f.npy"), "--no-progress") == 0
  np.testing.assert_allclose(np.load(tmp_path / "f.npy"),
                             md.load_model_dir(vision_dir).encode_image(x), atol=1e-6)


def test_undecodable_image_names_the_file(tmp_path, vision_dir, capsys):
  folder = tmp_path / "tiles"
  _write_images(str(folder), 3)
  bad = folder / "b" / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  code = run_embed("--model", vision_dir, "--images", str(folder), "--out",
                   str(tmp_path / "f.npy"), "--no-progress")
  err = capsys.readouterr().err
  assert code == 2
  assert "cannot decode image" in err and str(bad) in err
  assert not (tmp_path / "f.npy").exists()
  # --skip-bad: left out, counted and reported.
  code = run_embed("--model", vision_dir, "--images", str(folder), "--out",
                   str(tmp_path / "f.npy"), "--skip-bad", "--no-progress")
  err = capsys.readouterr().err
  assert code == 0
  assert "skipped 1 image(s)" in err and str(bad) in err
  assert np.load(tmp_path / "f.npy").shape == (3, 32)


def test_embed_text_strings_and_ids(tmp_path, clip_dir):
  assert run_embed("--model", clip_dir, "--text", "tumor", "normal stroma", "--out",
                   str(tmp_path / "t.npy")) == 0
  feats = np.load(tmp_path / "t.npy")
  assert feats.shape == (2, 24)
  model = md.load_model_dir(clip_dir)
  np.save(tmp_path / "ids.npy", model.tokenize(["tumor", "normal stroma"]))
  assert run_embed("--model", clip_dir, "--text-ids", str(tmp_path / "ids.npy"), "--out",
                   str(tmp_path / "t2.npy")) == 0
  np.testing.assert_allclose(np.load(tmp_path / "t2.npy"), feats, atol=1e-6)


def test_text_on_vision_only_model_is_refused(tmp_path, vision_dir, capsys):
  assert run_embed("--model", vision_dir, "--text", "tumor", "--out", str(tmp_path / "t.npy")) == 2
  assert "no text tower" in capsys.readouterr().err
  with pytest.raises(md.ModelDirError, match="no text tower"):
    md.load_model_dir(vision_dir).encode_text(["tumor"])
