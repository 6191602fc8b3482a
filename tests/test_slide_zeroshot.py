"""Zero-shot slide classification for patch models (MI-Zero): top-k pooling against a direct
formula, and MR-PLIP's in-training evaluator over tiled records."""

import json
import os

import jax
import numpy as np
import pytest

from mrplip_helpers import TINY
from pathjax import config_lib
from pathjax.evaluate import slides as slides_lib
from slide_fixtures import TINY_MAGS
from train_helpers import ROOT


def _direct_pool(scores, k):
  """Per class: the mean of the min(k, N) largest patch scores, one class at a time."""
  n = scores.shape[0]
  return np.array([np.mean(sorted(scores[:, c], reverse=True)[:min(k, n)])
                   for c in range(scores.shape[1])])


def test_topk_pool_equals_the_direct_formula():
  rng = np.random.default_rng(0)
  scores = rng.uniform(-1, 1, (7, 3)).astype(np.float32)
  pooled = slides_lib.topk_pool(scores, (1, 3, 7, 100))
  for k in (1, 3, 7, 100):
    np.testing.assert_allclose(pooled[k], _direct_pool(scores, k), rtol=1e-6)
  np.testing.assert_allclose(pooled[1], scores.max(0))      # k=1: max pooling
  np.testing.assert_allclose(pooled[100], scores.mean(0), atol=1e-6)  # k >= N: mean pooling
  with pytest.raises(slides_lib.SlideEvalError, match="positive"):
    slides_lib._topk_tuple((0, 5))


def _random_params(recipe):
  """Random values of the recipe's parameter shapes (no init compile)."""
  import flax.linen as nn
  shapes = jax.eval_shape(lambda key: nn.unbox(recipe.init(key, None)), jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: (1.0 + 0.1 * rng.standard_normal(a.shape) if "scale" in jax.tree_util.keystr(path)
                       else 0.1 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)


def test_mrplip_evaluator_pools_patch_scores_per_slide(tiny_training_data, tmp_path):
  """`config.evals` slide_zeroshot on MR-PLIP (predict fns image/text, no slide): every
  patch of each slide at one magnification through the recipe's own encoders, pooled as
  MI-Zero does; equal to the formula applied to the same embeddings."""
  from pathjax.evaluate import data as data_lib
  from pathjax.evaluate import features as features_lib
  from pathjax.evaluate import prompts as prompts_lib
  from pathjax.evaluate.registry import eval_config, make_evaluator, recipe_embedder
  from pathjax.recipes.base import make_recipe
  records, tokenizer = tiny_training_data
  overrides = [o for o in TINY if not o.startswith("model.text.overrides.vocab_size")] + [
      "model.text.overrides.vocab_size=0", f"input.records_dir={records}",
      f"input.tokenizer={tokenizer}"]
  recipe = make_recipe(config_lib.load_config(os.path.join(ROOT, "configs", "mrplip.py") + ":smoke",
                                              overrides))
  assert "slide" not in recipe.predict_fns(None)
  params = _random_params(recipe)
  mag = TINY_MAGS[1]
  spec = f"records:{records}@{mag:g}?exclude="
  ds = data_lib.load_dataset(spec)
  slide_ids = sorted(set(ds.slides))
  assert len(slide_ids) == 3
  labels = {s: ("tumor", "stroma")[i % 2] for i, s in enumerate(slide_ids)}
  with open(tmp_path / "labels.json", "w") as f:
    json.dump(labels, f)
  ks = (1, 3, 1000)
  cfg = eval_config(kind="slide_zeroshot", data=spec, labels=str(tmp_path / "labels.json"),
                    prompts="synth", topk=ks, batch_size=16)
  evaluator = make_evaluator(cfg, recipe, log=lambda s: None)
  got = evaluator(params)
  # The formula on embeddings computed here.
  embedder = recipe_embedder(recipe)(params)
  p = prompts_lib.load_prompts("synth")
  classifier = prompts_lib.build_classifier(p, embedder.text)
  feats = features_lib.extract_features(ds, embedder, batch_size=16, progress=False, report=None)
  slide_of = np.array([ds.slides[i] for i in feats.indices])
  y = np.array([p.classes.index(labels[s]) for s in slide_ids])
  result = slides_lib.run_patch_zeroshot(slides_lib.patch_eval_set(ds, labels), embedder,
                                        prompts="synth", topk=ks, batch_size=16,
                                        progress=False, report=lambda s: None)
  for k in ks:
    pooled = np.stack([_direct_pool(feats.embeddings[slide_of == s] @ classifier.T, k)
                       for s in slide_ids])
    if k == 3:  # the headline k: its pooled scores are in the predictions
      table = np.array([[r[f"score_{c}"] for c in p.classes] for r in result.predictions])
      assert [r["slide"] for r in result.predictions] == slide_ids
      np.testing.assert_allclose(table, pooled, atol=1e-5)
    preds = pooled.argmax(1)
    recall = [np.mean(preds[y == c] == c) for c in np.unique(y)]
    assert got[f"slide_zeroshot/top{k}/balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert got[f"slide_zeroshot/top{k}/accuracy"] == pytest.approx(np.mean(preds == y))
  assert got["slide_zeroshot/topk"] == 3 and got["slide_zeroshot/num_slides"] == 3
  assert got["slide_zeroshot/num_patches"] == len(ds)
  # A recipe split name instead of a data spec is explained when the evaluator is built.
  with pytest.raises(slides_lib.SlideEvalError, match="records:DIR"):
    make_evaluator(eval_config(kind="slide_zeroshot", data="heldout", labels="x"), recipe)
