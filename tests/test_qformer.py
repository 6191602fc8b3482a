"""Q-Former mechanics without a reference: K/V reuse, patch sampling, masks, logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax import losses_blip
from pathjax.models import qformer as qf

B, N, D, T, V = 4, 10, 24, 6, 40


def _module(**kw):
  base = dict(vocab_size=V, width=32, depth=2, num_heads=4, mlp_dim=48, max_position=16,
              num_queries=3, encoder_width=D, embed_dim=16, cross_attention_frequency=1)
  base.update(kw)
  return qf.QFormer(**base)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(B, N, D)).astype(np.float32)
  coords = rng.integers(0, 30, size=(B, N, 2)).astype(np.int32)
  pmask = np.ones((B, N), bool)
  pmask[1, 6:] = False
  ids = rng.integers(5, V - 1, size=(B, T)).astype(np.int32)
  ids[:, 0] = 2
  tmask = np.ones((B, T), bool)
  tmask[2, 3:] = False
  ids[~tmask] = 0
  ids[3] = ids[0]  # two slides share a report
  return feats, coords, pmask, ids, tmask


def _params(m, seed=0):
  return nn.unbox(m.init(jax.random.PRNGKey(seed), *qf.example_inputs(m))["params"])


def _stage1(m, params, batch, rng, *, reuse: bool):
  """The module docstring's flow; reuse=False recomputes the K/V for every pass."""
  feats, coords, pmask, ids, tmask = batch
  apply = lambda method, *a, **kw: m.apply({"params": params}, *a, method=method, **kw)
  encode = lambda f=feats, c=coords, p=pmask: apply(qf.QFormer.encode_patches, f, c, p)
  kv = encode()
  fresh = (lambda: kv) if reuse else encode
  img = apply(qf.QFormer.image_embeds, apply(qf.QFormer.query_pass, fresh()))
  txt = apply(qf.QFormer.text_embeds, apply(qf.QFormer.text_pass, ids, tmask))
  temp = apply(qf.QFormer.temperature)
  same = losses_blip.same_text_mask(ids, tmask)
  sim = losses_blip.itc_similarity(img, txt)
  l_itc, _ = losses_blip.itc_loss(sim, temp, positive_mask=same)
  neg = losses_blip.itm_negatives(sim / temp, rng, positive_mask=same)
  itm = lambda kv_, i, t: apply(qf.QFormer.itm_logits, apply(qf.QFormer.multimodal_pass, kv_, i, t))
  j = neg.image_for_text
  kv_neg = qf.take_kv(kv, j) if reuse else encode(feats[j], coords[j], pmask[j])
  l_itm, _ = losses_blip.itm_loss(
      itm(fresh(), ids, tmask), itm(kv_neg, ids, tmask),
      itm(fresh(), ids[neg.text_for_image], tmask[neg.text_for_image]), negatives=neg)
  dec = jnp.asarray(ids).at[:, 0].set(V - 1)
  logits = apply(qf.QFormer.lm_logits,
                 apply(qf.QFormer.multimodal_pass, fresh(), dec, tmask, causal=True))
  l_itg, _ = losses_blip.itg_loss(logits, dec, tmask)
  return l_itc + l_itm + l_itg


@pytest.mark.slow
def test_kv_reuse_equals_recomputation_value_and_grads():
  m = _module()
  params = _params(m)
  batch = tuple(jnp.asarray(x) for x in _batch())
  rng = jax.random.PRNGKey(1)
  # Eager: compiling two whole fwd+bwd graphs costs minutes on 2 CPU cores, running them ms.
  f = lambda reuse: jax.value_and_grad(lambda p: _stage1(m, p, batch, rng, reuse=reuse))(params)
  (v1, g1), (v2, g2) = f(True), f(False)
  assert np.isfinite(float(v1))
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
  flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  for a, b in zip(flat1, flat2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # every trainable part receives gradient (ln_vision and the cross-attention K/V included)
  assert float(jnp.abs(g1["cross_kv_1"]["key"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g1["ln_vision"]["scale"]).sum()) > 0
  assert float(jnp.abs(g1["temp"]).sum()) > 0


def test_sample_patches_uniform_without_replacement_with_masks():
  n, m = 12, 4
  feats = np.arange(3 * n, dtype=np.float32).reshape(3, n, 1)
  coords = np.stack([np.arange(3 * n).reshape(3, n)] * 2, -1).astype(np.int32)
  mask = np.ones((3, n), bool)
  mask[1, 7:] = False            # 7 real patches > m
  mask[2, 3:] = False            # 3 real patches < m
  f = jax.jit(lambda k: qf.sample_patches(k, feats, coords, mask, max_patches=m))
  counts = np.zeros((3, n))
  for i in range(600):
    fs, cs, ms = (np.asarray(x) for x in f(jax.random.PRNGKey(i)))
    assert fs.shape == (3, m, 1) and cs.shape == (3, m, 2) and ms.shape == (3, m)
    for s in range(3):
      chosen = fs[s, ms[s], 0].astype(int) - s * n
      assert len(set(chosen)) == len(chosen)               # without replacement
      assert np.all(mask[s, chosen])                      # real patches only
      np.testing.assert_array_equal(cs[s, ms[s], 0], fs[s, ms[s], 0])  # coords travel along
      counts[s, chosen] += 1
    assert ms[0].sum() == m and ms[1].sum() == m and ms[2].sum() == 3
  np.testing.assert_allclose(counts[0] / 600, m / n, atol=0.07)      # uniform
  np.testing.assert_allclose(counts[1, :7] / 600, m / 7, atol=0.07)
  assert counts[1, 7:].sum() == 0 and np.all(counts[2, :3] == 600)
  same = qf.sample_patches(jax.random.PRNGKey(0), feats, coords, mask, max_patches=n)
  np.testing.assert_array_equal(np.asarray(same[0]), feats)


@pytest.mark.slow
def test_slide_without_patches_gives_finite_outputs():
  m = _module()
  params = _params(m)
  feats, coords, pmask, ids, tmask = _batch()
  pmask[0] = False
  out = m.apply({"params": params}, feats, coords, pmask, ids, tmask)
  for value in out.values():
    assert np.all(np.isfinite(np.asarray(value)))


def test_padded_patches_do_not_change_a_slide():
  """A slide's outputs are independent of what sits in its masked patch slots."""
  m = _module()
  params = _params(m)
  feats, coords, pmask, ids, tmask = _batch()
  other = feats.copy()
  other[1, 6:] = 100.0
  run = lambda f: np.asarray(m.apply({"params": params}, f, coords, pmask, ids, tmask)["itm_logits"])
  np.testing.assert_allclose(run(feats), run(other), atol=1e-6)


@pytest.mark.slow
def test_variants_and_logical_axes():
  m = _module(vision_width=16, pos_encoding=True, cross_attention_frequency=3, depth=4,
              dropout_rate=0.1, attention_dropout_rate=0.1, deterministic=False)
  variables = m.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                     *qf.example_inputs(m))
  flat = jax.tree_util.tree_leaves_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in flat:
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim, path
  params = nn.unbox(variables)["params"]
  assert set(k for k in params if k.startswith("cross_kv")) == {"cross_kv_0", "cross_kv_3"}
  assert params["cross_kv_0"]["key"]["kernel"].shape == (16, 4, 8)  # over the projected width
  assert params["patch_proj"]["kernel"].shape == (D, 16)
  feats, coords, pmask, ids, tmask = _batch()
  a, b = (m.apply({"params": params}, feats, coords, pmask, ids, tmask,
                  rngs={"dropout": jax.random.PRNGKey(i)})["itm_logits"] for i in (0, 1))
  assert not np.allclose(np.asarray(a), np.asarray(b))  # dropout is live
  with pytest.raises(ValueError, match="encoder_width"):
    m.apply({"params": params}, feats[..., :8], coords, pmask, ids, tmask,
            rngs={"dropout": jax.random.PRNGKey(0)})


@pytest.mark.slow
def test_bf16_compute_stays_close_to_fp32():
  m32, m16 = _module(), _module(dtype=jnp.bfloat16)
  params = _params(m32)
  batch = _batch()
  a = m32.apply({"params": params}, *batch)
  b = m16.apply({"params": params}, *batch)
  assert b["lm_logits"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(a["image_embeds"]), np.asarray(b["image_embeds"]),
                             atol=0.1)
