"""MR-PLIP recipe: loss pieces against direct formulas, gradients, ablation switches."""

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax import config_lib, sharding
from pathjax.recipes import mrplip
from pathjax.recipes.base import make_recipe

from mrplip_helpers import TINY


def tiny_recipe(*overrides):
  # No tokenizer: the vocabulary size is given (random ids below stay under it).
  return make_recipe(config_lib.load_config("configs/mrplip.py:smoke", TINY + list(overrides)))


def fake_batch(recipe, seed=0):
  batch = {k: np.zeros(s.shape, s.dtype) for k, s in recipe.example_batch(8).items()}
  batch["patch_mask"][:] = True
  batch["labels"][:] = -1
  if "color_transform" in batch:
    batch["color_transform"][:] = np.eye(3, 4, dtype=np.float32)
  rng = np.random.default_rng(seed)
  batch["images"] = rng.integers(0, 256, batch["images"].shape, dtype=np.uint8)
  batch["caption_ids"] = rng.integers(1, 128, batch["caption_ids"].shape).astype(np.int32)
  batch["keyword_ids"] = rng.integers(1, 128, batch["keyword_ids"].shape).astype(np.int32)
  batch["keyword_mask"] = rng.random(batch["keyword_mask"].shape) > 0.2
  batch["caption_mask"] = rng.random(batch["caption_mask"].shape) > 0.1
  p = batch["parent"].shape[1]
  batch["parent"][:] = np.arange(-1, p - 1, dtype=np.int32)  # a root-to-leaf chain
  return batch


@pytest.fixture(scope="module")
def setup():
  recipe = tiny_recipe()
  batch = fake_batch(recipe)
  params = nn.unbox(recipe.init(jax.random.key(0), batch))
  return recipe, batch, params


def test_ancestor_pairs_by_tree_depth():
  """A full 4-level bag (85 patches) gathers 3 ancestors per patch, not 84."""
  from pathjax.input import sampling
  parent = [-1]
  level_start = 0
  for level in range(1, 4):
    count = 4 ** (level - 1)
    parent += [level_start + i // 4 for i in range(4 * count)]
    level_start += count
  parent = jnp.asarray([parent])
  assert parent.shape[1] == 85 == sampling.num_selected(range(4), "all")
  cfg = tiny_recipe("input.sampling=all").config.input
  depth = mrplip._tree_depth(cfg, 85)
  assert depth == 3
  anc, ok = mrplip._ancestor_pairs(parent, "all", depth)
  assert anc.shape == (1, 85, 3)
  full, full_ok = mrplip._ancestor_pairs(parent, "all")           # the P - 1 bound
  pairs = lambda a, k: {(int(x), i) for i in range(85) for x, y in zip(a[0, i], k[0, i]) if y}
  assert pairs(anc, ok) == pairs(full, full_ok) and len(pairs(anc, ok)) == 84 + 80 + 64
  assert mrplip._tree_depth(tiny_recipe().config.input, 4) == 3


def test_ancestor_pairs_chain_and_tree():
  chain = jnp.asarray([[-1, 0, 1, 2]])
  anc, ok = mrplip._ancestor_pairs(chain, "adjacent")
  np.testing.assert_array_equal(ok[0, :, 0], [False, True, True, True])
  np.testing.assert_array_equal(anc[0, 1:, 0], [0, 1, 2])
  anc, ok = mrplip._ancestor_pairs(chain, "all")
  pairs = {(int(a), i) for i in range(4) for a, k in zip(anc[0, i], ok[0, i]) if k}
  assert pairs == {(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)}
  tree = jnp.asarray([[-1, 0, 0, 1, 1, 2, 2]])  # root, 2 children, 2 grandchildren each
  anc, ok = mrplip._ancestor_pairs(tree, "all")
  pairs = {(int(a), i) for i in range(7) for a, k in zip(anc[0, i], ok[0, i]) if k}
  assert pairs == {(0, 1), (0, 2), (1, 3), (0, 3), (1, 4), (0, 4), (2, 5), (0, 5), (2, 6), (0, 6)}


def test_loss_finite_and_every_part_gets_gradients(setup):
  recipe, batch, params = setup
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: recipe.loss(p, batch, jax.random.key(1), True), has_aux=True))(params)
  assert np.isfinite(float(loss))
  total = sum(float(metrics[k]) for k in ("itc", "cvta", "mrtva")) + float(metrics["itm"])
  np.testing.assert_allclose(float(loss), total, rtol=1e-5)
  for name in ("vision_tower", "text_tower", "vision_proj", "fusion_encoder", "projector",
               "predictor", "itm_head", "itc_log_scale", "cvta_log_scale"):
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[name]))
    assert norm > 0, f"no gradient reaches {name}"


def test_ablations_switch_losses_off(setup):
  _, batch, params = setup
  recipe = tiny_recipe("loss.w_mrtva=0", "loss.w_itm=0")
  (_, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: recipe.loss(p, batch, jax.random.key(1), True), has_aux=True))(params)
  assert "mrtva" not in metrics and "itm" not in metrics
  for name in ("projector", "predictor", "itm_head"):
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[name]))


def test_mrtva_matches_direct_pairs(setup):
  """The vectorised MRTVA equals SimSiam summed over explicit (parent, child) pairs."""
  recipe, batch, params = setup
  model = recipe.model
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
  b, p = batch["images"].shape[:2]
  from pathjax.input import transforms
  x = transforms.normalize_on_device(batch["images"].reshape((b * p,) + batch["images"].shape[2:]))
  pooled, v = apply(mrplip.MRPLIPModel.encode_image, x)
  kb = batch["keyword_ids"]
  _, w_eot, w = apply(mrplip.MRPLIPModel.encode_text, kb.reshape(-1, kb.shape[-1]))
  w, w_eot = w.reshape(b, kb.shape[1], -1), w_eot.reshape(b, kb.shape[1], -1)
  valid = jnp.asarray(batch["patch_mask"])
  got, monitors = recipe._mrtva(params, pooled.reshape(b, p, -1), v.reshape(b, p, -1), w, w_eot,
                                jnp.asarray(batch["keyword_mask"]), jnp.asarray(batch["parent"]),
                                valid)

  k = recipe.config.loss.fusion_keywords
  z = []
  for i in range(b):
    mask = np.asarray(batch["keyword_mask"][i])
    for j in range(p):
      sims = np.where(mask, np.asarray(w[i] @ v.reshape(b, p, -1)[i, j]), -np.inf)
      top = np.argsort(-sims, kind="stable")[:k]
      z.append(apply(mrplip.MRPLIPModel.fuse, pooled.reshape(b, p, -1)[i, j][None],
                     w_eot[i][top][None], jnp.asarray(np.isfinite(sims[top]))[None])[0])
  # BatchNorm heads: statistics over the whole batch of patches.
  (g, h), _ = model.apply({"params": params}, jnp.stack(z), valid.reshape(-1),
                          method=mrplip.MRPLIPModel.simsiam, mutable=["batch_stats"])
  g, h = np.asarray(g).reshape(b, p, -1), np.asarray(h).reshape(b, p, -1)
  cos = lambda a, c: float(np.dot(a, c) / np.linalg.norm(a) / np.linalg.norm(c))
  terms = [-0.5 * cos(h[i, child - 1], g[i, child]) - 0.5 * cos(h[i, child], g[i, child - 1])
           for i in range(b) for child in range(1, p)]
  np.testing.assert_allclose(float(got), np.mean(terms), rtol=2e-4, atol=2e-5)
  assert 0.3 < float(monitors["monitor_projector_spread"]) < 1.5


def test_sigmoid_itc_under_mesh_equals_unsharded(setup):
  _, batch, params = setup
  overrides = ("loss.contrastive=sigmoid", "loss.w_itm=0", "loss.w_cvta=0", "loss.w_mrtva=0")
  plain = float(tiny_recipe(*overrides).loss(params, batch, jax.random.key(1), True)[0])
  mesh = sharding.make_mesh(("data",), (8,))
  rules = sharding.FSDP_TENSOR_RULES
  recipe = make_recipe(config_lib.load_config("configs/mrplip.py:smoke", TINY + list(overrides)),
                       mesh=mesh)
  def step(p, bt):
    with sharding.mesh_context(mesh, rules):
      return recipe.loss(p, bt, jax.random.key(1), True)[0]
  sharded_batch = sharding.make_global_batch(batch, mesh, rules)
  ringed = float(jax.jit(step)(params, sharded_batch))
  np.testing.assert_allclose(ringed, plain, rtol=1e-5)


def test_predict_fns_embed_normalised(setup):
  recipe, batch, params = setup
  enc = recipe.predict_fns(params)
  img = enc["image"](jnp.asarray(batch["images"][:, 0]))
  txt = enc["text"](jnp.asarray(batch["caption_ids"][:, 0]))
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
  assert img.shape == txt.shape == (8, 16)


def test_load_pretrained_replaces_towers(setup, tmp_path):
  """A model directory's towers (e.g. converted UNI + QuiltNet) replace the random init."""
  from pathjax.models import model_dir
  recipe, batch, params = setup
  other = nn.unbox(recipe.init(jax.random.key(7), batch))
  exported = recipe.export(jax.device_get(other))
  model_dir.save_model_dir(str(tmp_path / "init"), **exported)
  recipe2 = tiny_recipe(f"model.init_dir={tmp_path / 'init'}")
  flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")
  abstract = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
              for p, x in flat(params).items()}
  loaded = recipe2.load_pretrained(abstract, set(abstract))
  expected = {p: x for p, x in flat(other).items()
              if p.split("/")[0] in ("vision_tower", "text_tower", "vision_proj")}
  assert sorted(loaded) == sorted(expected)  # the fusion encoder etc. keep their init
  for path, value in expected.items():
    np.testing.assert_array_equal(loaded[path], value)
  only = {p for p in abstract if p.startswith("text_tower/")}
  assert set(recipe2.load_pretrained(abstract, only)) == only
  # An override that disagrees with the directory names both values.
  with pytest.raises(config_lib.ConfigError, match=r"mlp_dim=48 .*mlp_dim=64"):
    tiny_recipe(f"model.init_dir={tmp_path / 'init'}", "model.vision.overrides.mlp_dim=48")


def test_architecture_from_init_dir(setup, tmp_path):
  """A text tower converted with gelu trains with gelu (fields the config does not set come
  from the directory); an explicit override that disagrees is a ConfigError naming both."""
  from pathjax.models import model_dir
  recipe, batch, params = setup
  exported = recipe.export(jax.device_get(params))
  text = exported["towers"]["text"]
  text["module"] = text["module"].clone(activation="gelu", norm_eps=1e-6)
  model_dir.save_model_dir(str(tmp_path / "gelu"), **exported)
  loaded = tiny_recipe(f"model.init_dir={tmp_path / 'gelu'}")
  assert loaded.model.text["activation"] == "gelu" and loaded.model.text["norm_eps"] == 1e-6
  assert recipe.model.text.get("activation", "quick_gelu") == "quick_gelu"  # module default
  with pytest.raises(config_lib.ConfigError, match=r"num_heads=4 .*num_heads=2"):
    tiny_recipe(f"model.init_dir={tmp_path / 'gelu'}", "model.text.overrides.num_heads=4")


def test_keyword_context_cuts_long_keywords_to_end_with_eos(setup):
  recipe = tiny_recipe("loss.keyword_context=4")
  eos = recipe.model.text["vocab_size"] - 1       # no tokenizer: argmax pooling, eos is the last id
  ids = np.zeros((1, 3, 8), np.int32)
  ids[0, 0, :3] = [5, 6, eos]                     # fits
  ids[0, 1, :7] = [5, 6, 7, 8, 9, 10, eos]        # too long: cut to 5, 6, 7, eos
  metrics = {}
  out = np.asarray(recipe._keyword_context(jnp.asarray(ids), metrics))
  np.testing.assert_array_equal(out[0, 0], [5, 6, eos, 0])
  np.testing.assert_array_equal(out[0, 1], [5, 6, 7, eos])
  np.testing.assert_array_equal(out[0, 2], [0, 0, 0, 0])
  assert int(metrics["keywords_truncated"]) == 1


def test_itm_identical_captions_are_not_negatives(setup):
  """Captions that say the same as the positive never serve as its negative: with one caption
  repeated over the batch no row has a negative and only the positives are scored."""
  recipe, batch, params = setup
  same = dict(batch)
  same["caption_ids"] = np.broadcast_to(batch["caption_ids"][:1, :1], batch["caption_ids"].shape).copy()
  same["caption_mask"] = np.ones_like(batch["caption_mask"])
  _, metrics = recipe.loss(params, same, jax.random.key(1), True)
  assert int(metrics["itm_rows_with_negative"]) == 0
  _, metrics = recipe.loss(params, batch, jax.random.key(1), True)
  assert int(metrics["itm_rows_with_negative"]) > 0
  for key in ("monitor_image_spread", "monitor_projector_spread", "monitor_mrtva_unrelated_cos"):
    assert np.isfinite(float(metrics[key]))
