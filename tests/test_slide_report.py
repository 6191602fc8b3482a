"""`pathjax generate --model DIR --slide ID`: a stage-2 PathAlign model directory writes the
report for one slide of an embed-slides directory; bad inputs exit 2 naming the file."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import pathalign_helpers as H
from pathjax import cli
from pathjax.recipes.base import make_recipe


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
  """A stage-2 model exported by the trainer's export (random Q-Former, a tiny LLM directory)."""
  from pathjax import train as train_lib
  root = tmp_path_factory.mktemp("slide_report")
  data = H.make_dataset(str(root / "data"), 9, dim=32, max_patches=20)
  llm = H.tiny_llm_dir(str(root / "llm"))
  config = H.smoke_config(data, "smoke,stage2", **{"model.llm_dir": llm})
  recipe = make_recipe(config)
  # Random values of the model's shapes (compiling the real init takes longer than the rest).
  shapes = jax.eval_shape(lambda key: nn.unbox(recipe.init(key, None)), jax.random.key(1))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (1.0 + 0.1 * rng.standard_normal(a.shape) if "scale" in jax.tree_util.keystr(path)
                       else 0.05 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
  train_lib._export(config, recipe, params, str(root / "run"))
  return {"model": str(root / "run" / "model"), "data": data, "llm": llm, "recipe": recipe,
          "params": params}


@pytest.mark.slow
def test_prints_the_recipes_report_for_the_slide(stage2, capsys):
  """The command's output equals the recipe's own generation with the LLM from its directory."""
  from pathjax.models.llm import load_llm
  from pathjax.recipes.pathalign import slide_arrays
  recipe, data = stage2["recipe"], stage2["data"]
  params = dict(stage2["params"], llm=load_llm(stage2["llm"])[1])
  for sid in ("slide-002", "slide-004"):
    feats, grid = data["slides"][sid]
    assert len(feats) <= recipe.config.data.max_patches   # all patches, in order
    x = slide_arrays(feats, grid, len(feats), None, np.float32)
    want = recipe.generate(params, x["features"][None], x["coords"][None], x["patch_mask"][None],
                           max_new_tokens=6)[0]
    assert cli.main(["generate", "--model", stage2["model"], "--slide", sid,
                     "--max-new-tokens", "6"]) == 0
    assert want and capsys.readouterr().out == want + "\n"
  # --embeddings given explicitly, and beam search
  assert cli.main(["generate", "--model", stage2["model"], "--slide", "slide-002", "--embeddings",
                   data["embeddings"], "--max-new-tokens", "6", "--num-beams", "2"]) == 0
  assert capsys.readouterr().out.endswith("\n")


def _fails(args, capsys, *needles):
  assert cli.main(["generate"] + args) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  for n in needles:
    assert n in err, err
  return err


def test_bad_inputs_exit_2_naming_the_file_and_the_fix(stage2, tmp_path, capsys):
  model, emb = stage2["model"], stage2["data"]["embeddings"]
  manifest = os.path.join(emb, "manifest.json")
  _fails(["--model", model, "--slide", "no-such-slide"], capsys, "no-such-slide", manifest,
         "pass a slide id")
  _fails(["--model", model, "--slide", "slide-002", "--embeddings", str(tmp_path / "none")],
         capsys, str(tmp_path / "none"), "embed-slides")
  other = H.write_embeddings(str(tmp_path / "emb16"), {"slide-002": (np.zeros((3, 16)),
                                                                      np.zeros((3, 2)))}, dim=16)
  _fails(["--model", model, "--slide", "slide-002", "--embeddings", other], capsys, other,
         "expected dimension 32")
  # an LLM directory, a stage-1 export and a directory that is no model at all
  _fails(["--model", stage2["llm"], "--slide", "slide-002"], capsys,
         os.path.join(stage2["llm"], "model.json"), "not a PathAlign model", "stage2")
  stage1 = tmp_path / "s1"
  stage1.mkdir()
  meta = json.load(open(os.path.join(model, "model.json")))
  meta["pathalign"]["stage"] = 1
  json.dump(meta, open(stage1 / "model.json", "w"))
  _fails(["--model", str(stage1), "--slide", "slide-002"], capsys, "stage-1", "export_model")
  _fails(["--model", str(tmp_path / "nothing"), "--slide", "slide-002"], capsys,
         "not a pathjax model directory")
  # no recorded embeddings: --embeddings is required; a moved LLM is named
  for key, value, needles in (("data", None, ("--embeddings DIR",)),
                              ("llm_dir", str(tmp_path / "moved"), (str(tmp_path / "moved"), "put it back"))):
    d = tmp_path / f"edited-{key}"
    d.mkdir()
    for name in os.listdir(model):
      if name != "model.json":
        os.symlink(os.path.join(model, name), d / name)
    edited = json.load(open(os.path.join(model, "model.json")))
    if key == "data":
      edited["train_config"]["data"]["embeddings"] = ""
    else:
      edited["pathalign"]["llm_dir"] = value
    json.dump(edited, open(d / "model.json", "w"))
    _fails(["--model", str(d), "--slide", "slide-002"], capsys, str(d / "model.json"), *needles)
  _fails(["--model", model, "--slide", "slide-002", "--temperature", "0.5"], capsys, "--num-beams")


def test_training_config_from_the_workdir_when_model_json_has_none(stage2, tmp_path, capsys):
  """Older exports record no config in model.json: WORKDIR/config.json beside WORKDIR/model."""
  from pathjax.slide_report import SlideReportModel
  model = stage2["model"]
  d = tmp_path / "wd" / "model"
  d.mkdir(parents=True)
  for name in os.listdir(model):
    if name != "model.json":
      os.symlink(os.path.join(model, name), d / name)
  meta = json.load(open(os.path.join(model, "model.json")))
  recorded = meta.pop("train_config")
  json.dump(meta, open(d / "model.json", "w"))
  _fails(["--model", str(d), "--slide", "slide-002"], capsys, "records no training config",
         str(tmp_path / "wd" / "config.json"))
  json.dump(recorded, open(tmp_path / "wd" / "config.json", "w"))
  loaded = SlideReportModel(str(d))
  assert loaded.recipe.stage == 2 and loaded.embeddings_dir == stage2["data"]["embeddings"]
