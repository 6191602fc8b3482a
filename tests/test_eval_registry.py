"""Evaluation inside training (registry with a recipe), embedding export, prompt
ensembling and the eval benchmark. Fixtures come from test_eval_tasks (a separate file so
pytest-xdist runs the two halves side by side)."""

import csv

import ml_collections
import numpy as np
import pytest

from pathjax.evaluate import data as data_lib
from pathjax.evaluate import features as features_lib
from pathjax.evaluate import prompts as prompts_lib
from pathjax.evaluate import registry
from test_eval_tasks import PATCH, SIZE, model_dir, patch_sets, synth_dir, tokenizer_dir  # noqa: F401 (fixtures)


def test_classifier_is_conch_ensemble():
  p = prompts_lib.parse_prompts({"classnames": {"a": ["x", "y"], "b": ["z"]}, "templates": ["{}.", "CLASSNAME!"]})
  assert p.texts("a") == ["x.", "x!", "y.", "y!"]
  table = {"x.": [1, 0, 0], "x!": [2, 0, 0], "y.": [0, 1, 0], "y!": [0, 3, 0], "z.": [0, 0, 1], "z!": [0, 0, 5]}
  w = prompts_lib.build_classifier(p, lambda texts: np.asarray([table[t] for t in texts], np.float32))
  np.testing.assert_allclose(w[0], np.array([1, 1, 0]) / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(w[1], [0, 0, 1], rtol=1e-6)


def test_registry_evaluators_with_a_recipe(model_dir, tokenizer_dir, patch_sets, synth_dir):
  from pathjax.models.model_dir import load_model_dir
  from pathjax.input import transforms
  model = load_model_dir(model_dir)
  vision, text = model.towers["vision"], model.towers["text"]

  class FakeRecipe:
    config = ml_collections.ConfigDict({"recipe": "fake", "input": {
        "image_size": SIZE, "context_length": 16, "tokenizer": tokenizer_dir}})

    def predict_fns(self, params):
      def image(x):
        f = vision.module.apply({"params": params["v"]}, transforms.normalize_on_device(x))["pooled"]
        return f @ params["proj"]

      def txt(ids):
        return text.module.apply({"params": params["t"]}, ids)["pooled"]
      return {"image": image, "text": txt}

  params = {"v": vision.params, "t": text.params, "proj": vision.projection}
  recipe = FakeRecipe()
  zs = registry.make_evaluator(registry.eval_config(
      kind="zeroshot", name="zs_synth", data=f"imagefolder:{patch_sets['folder']}", prompts="synth",
      max_examples=40, every=10), recipe)
  out = zs(params, 10)
  assert zs.every == 10
  assert {"zs_synth/accuracy", "zs_synth/weighted_f1", "zs_synth/balanced_accuracy"} <= set(out)
  assert all(isinstance(v, float) for v in out.values())
  assert zs(params, 20) == out  # same params, same numbers; the dataset is loaded once
  xm = registry.make_evaluator({"kind": "cross_mag", "data": f"slides:{synth_dir}?patch_size={PATCH}",
                                "prompts": "synth", "magnifications": (10, 20), "max_examples": 24}, recipe)
  xo = xm(params, 1)
  assert "cross_mag/10x/weighted_f1" in xo and "cross_mag/mean/accuracy" in xo
  knn = registry.make_evaluator({"kind": "knn", "data": patch_sets["csv"], "k": 5}, recipe)
  assert "knn/accuracy" in knn(params, 1)
  with pytest.raises(ValueError, match="unknown task 'nope'.*valid tasks: cross_mag"):
    registry.make_evaluator({"kind": "nope", "data": "x"}, recipe)


def test_new_tasks_register_themselves_and_needs_are_checked(tmp_path, monkeypatch):
  from pathjax.evaluate import tasks as tasks_lib
  (tmp_path / "my_slide_task.py").write_text(
      "from pathjax.evaluate.tasks import register_task\n"
      "@register_task('my_slide_task:count', needs=('slide',), per_magnification=False)\n"
      "def run(dataset, embedder, *, batch_size=64, **unused):\n"
      "  return ('ran', len(dataset), batch_size)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  task = tasks_lib.get_task("my_slide_task:count")  # imported on demand
  assert task.needs == ("slide",) and "my_slide_task:count" in tasks_lib.task_names()
  assert tasks_lib.run_task("my_slide_task:count", [1, 2, 3], None, batch_size=7, k=3) == ("ran", 3, 7)

  class PatchOnly:
    config = ml_collections.ConfigDict({"recipe": "patch_only"})

    def predict_fns(self, params):
      return {"image": lambda x: x}

  with pytest.raises(ValueError, match=r"needs predict functions \['slide'\].*provides \['image'\]"):
    registry.make_evaluator({"kind": "my_slide_task:count", "data": "x"}, PatchOnly())


def test_embed_a_dataset_with_ids(model_dir, patch_sets, tmp_path):
  """What `pathjax embed --data SPEC` runs: load_dataset -> extract_features -> save_features."""
  import pyarrow.parquet as pq
  ds = data_lib.load_dataset(patch_sets["csv"])
  feats = features_lib.extract_features(ds, features_lib.Embedder.from_model_dir(model_dir), batch_size=16,
                                        progress=False)
  assert feats.embeddings.shape == (len(ds), 24) and feats.ids == ds.ids
  np.testing.assert_allclose(np.linalg.norm(feats.embeddings, axis=1), 1.0, rtol=1e-5)
  npy, index = features_lib.save_features(feats, str(tmp_path / "f.npy"))
  assert np.load(npy).shape == feats.embeddings.shape
  with open(index) as f:
    rows = list(csv.DictReader(f))
  assert [r["id"] for r in rows] == feats.ids
  (pq_path,) = features_lib.save_features(feats, str(tmp_path / "f.parquet"))
  table = pq.read_table(pq_path)
  assert table.column("id").to_pylist() == feats.ids
  np.testing.assert_allclose(np.asarray(table.column("embedding").to_pylist()), feats.embeddings, rtol=1e-6)


def test_bench_eval_measures_rates(model_dir, patch_sets, capsys):
  from pathjax.bench import eval as bench_eval
  r = bench_eval.measure(model_dir, batch_size=8, steps=1, data=patch_sets["csv"], workers=2, rounds=1)
  for key in ("forward_images_per_s", "eval_images_per_s", "eval_to_forward", "e2e_images_per_s"):
    assert r[key] > 0
