"""PathFLIP losses against direct numpy formulas; 8 devices equal 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pathjax import losses_pathflip as lp
from train_helpers import fake_devices

TOL = dict(rtol=1e-5, atol=1e-5)


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _infonce_np(img, txt, valid, temperature=0.1, eps=0.1):
  idx = np.nonzero(valid)[0]
  img, txt = _norm(img[idx].astype(np.float64)), _norm(txt[idx].astype(np.float64))
  logits = img @ txt.T / temperature
  b = len(idx)
  target = (1 - eps) * np.eye(b) + eps / b
  ce = lambda z: np.mean(-np.sum(target * _log_softmax(z), axis=-1))
  return 0.5 * (ce(logits) + ce(logits.T))


def _region_np(v_own, t_own, v_neg, t_neg, s, beta, own_mask, valid, not_negative=None):
  """-sum log sigmoid(y z) / P, pair by pair, straight from the spec; not_negative[i, c]
  leaves slide c's negative out of anchor i's terms."""
  b, k = own_mask.shape
  total, n_pos = 0.0, 0
  logsig = lambda x: -np.logaddexp(0.0, -x)
  for i in range(b):
    if not valid[i]:
      continue
    for j in range(k):
      if own_mask[i, j]:
        z = s * _norm(v_own[i, j]) @ _norm(t_own[i, j]) + beta
        total -= logsig(z)
        n_pos += 1
    for c in range(b):
      if c != i and valid[c] and own_mask[c].any() and not (not_negative is not None and not_negative[i, c]):
        z = s * _norm(v_neg[i, c]) @ _norm(t_neg[c]) + beta
        total -= logsig(-z)
  return total / n_pos


def _data(b=8, k=3, d=6, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return f(b, k, d), f(b, k, d), f(b, b, d), f(b, d), f(b, d), f(b, d)


@pytest.mark.parametrize("padded", [False, True])
def test_slide_infonce_matches_formula(padded):
  *_, img, txt = _data()
  valid = np.ones(8, bool)
  if padded:
    valid[[2, 7]] = False
  got = lp.slide_infonce(img * 3.0, txt, valid=valid if padded else None)
  np.testing.assert_allclose(float(got), _infonce_np(img, txt, valid), **TOL)


@pytest.mark.parametrize("padded", [False, True])
def test_region_loss_matches_formula(padded):
  v_own, t_own, v_neg, t_neg, *_ = _data()
  own_mask, valid = np.ones((8, 3), bool), np.ones(8, bool)
  if padded:
    own_mask[1, 2] = False
    own_mask[4] = False          # a slide without subcaptions: no positives, no negative
    valid[6] = False
  s, beta = lp.PAPER_SCALE_INIT, -1.5
  loss, metrics = lp.region_sigmoid_loss(v_own, t_own, v_neg, t_neg, s, beta,
                                         own_mask=own_mask if padded else None,
                                         valid=valid if padded else None)
  np.testing.assert_allclose(float(loss), _region_np(v_own, t_own, v_neg, t_neg, s, beta, own_mask, valid), **TOL)
  if not padded:  # the spec's normaliser B * K
    z = np.asarray(lp.region_logits(v_own, t_own, v_neg, t_neg, s, beta))
    y = np.concatenate([np.ones((8, 3)), -np.ones((8, 8))], 1)
    m = np.concatenate([np.ones((8, 3), bool), ~np.eye(8, dtype=bool)], 1)
    np.testing.assert_allclose(float(loss), np.sum(np.logaddexp(0, -y * z) * m) / (8 * 3), **TOL)
    np.testing.assert_allclose(float(metrics["region_pos_prob"]), np.mean(1 / (1 + np.exp(-z[:, :3]))), **TOL)
  assert 0 < float(metrics["region_neg_prob"]) < 1


def _same_text_loop(sub_ids, sub_mask, neg_index):
  """same_subcaption_text, subcaption by subcaption: compare the real tokens as lists."""
  b, k, _ = sub_ids.shape
  text = lambda i, j: list(sub_ids[i, j][sub_mask[i, j]])
  out = np.zeros((b, b), bool)
  for i in range(b):
    for c in range(b):
      out[i, c] = any(sub_mask[i, j].any() and text(i, j) == text(c, neg_index[c]) for j in range(k))
  return out


def test_same_subcaption_text_and_the_loss_leaves_those_pairs_out():
  rng = np.random.default_rng(3)
  b, k, t = 6, 3, 5
  sub_ids = rng.integers(5, 8, size=(b, k, t))           # a small vocabulary: repeats happen
  lengths = rng.integers(0, t + 1, size=(b, k))
  sub_mask = np.arange(t)[None, None] < lengths[..., None]
  sub_ids = np.where(sub_mask, sub_ids, 0)
  for i, j in ((2, 1), (4, 0)):                  # slide 4's negative is slide 2's subcaption 1
    sub_ids[i, j], sub_mask[i, j] = [5, 6, 0, 0, 0], [True, True, False, False, False]
  neg_index = np.array([0, 1, 2, 0, 0, 2])
  got = np.asarray(lp.same_subcaption_text(sub_ids, sub_mask, neg_index))
  want = _same_text_loop(sub_ids, sub_mask, neg_index)
  np.testing.assert_array_equal(got, want)
  assert want[2, 4] and want[4, 4]
  # The loss drops exactly those (anchor, negative) pairs.
  v_own, t_own, v_neg, t_neg, *_ = _data(b=b, k=k)
  own = sub_mask.any(-1)
  loss, _ = lp.region_sigmoid_loss(v_own, t_own, v_neg, t_neg, 2.0, -1.0, own_mask=own, not_negative=got)
  np.testing.assert_allclose(float(loss), _region_np(v_own, t_own, v_neg, t_neg, 2.0, -1.0, own,
                                                     np.ones(b, bool), want), **TOL)
  full, _ = lp.region_sigmoid_loss(v_own, t_own, v_neg, t_neg, 2.0, -1.0, own_mask=own)
  assert float(full) != float(loss)


def test_region_loss_gradients_reach_scale_and_bias():
  v_own, t_own, v_neg, t_neg, *_ = _data()
  g = jax.grad(lambda s, b: lp.region_sigmoid_loss(v_own, t_own, v_neg, t_neg, s, b)[0],
               argnums=(0, 1))(jnp.float32(2.0), jnp.float32(0.0))
  assert all(np.isfinite(float(x)) and float(x) != 0 for x in g)


def test_region_loss_shape_errors():
  v_own, t_own, v_neg, t_neg, *_ = _data()
  with pytest.raises(ValueError, match="shapes"):
    lp.region_sigmoid_loss(v_own, t_own, v_neg[:, :4], t_neg, 1.0, 0.0)


def test_pick_negative_subcaptions():
  mask = np.array([[True, False, True], [False, True, False], [False, False, False]])
  picks = np.stack([np.asarray(lp.pick_negative_subcaptions(jax.random.key(i), mask)) for i in range(60)])
  assert set(picks[:, 0]) == {0, 2} and set(picks[:, 1]) == {1} and set(picks[:, 2]) == {0}


def test_eight_devices_equal_one():
  """The losses (values and gradients) under jit with the batch sharded over 8 devices
  equal the single-device values. Run in a fresh process: an XLA abort once took down a test
  worker here (after other tests had run in it), and a subprocess reports it as a failure."""
  import os
  import subprocess
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS=fake_devices(8),
             JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(here))
  proc = subprocess.run([sys.executable, "-c", "import test_losses_pathflip as t; "
                         "t._eight_devices_equal_one()"], cwd=here, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _eight_devices_equal_one():
  assert len(jax.devices()) >= 8
  v_own, t_own, v_neg, t_neg, img, txt = _data(b=16, seed=1)
  own_mask = np.ones((16, 3), bool)
  own_mask[5, 1:] = False
  valid = np.ones(16, bool)
  valid[9] = False

  def total(v_own, t_own, v_neg, t_neg, img, txt, s, b):
    region, _ = lp.region_sigmoid_loss(v_own, t_own, v_neg, t_neg, s, b, own_mask=own_mask, valid=valid)
    return lp.slide_infonce(img, txt, valid=valid) + region

  args = (v_own, t_own, v_neg, t_neg, img, txt, np.float32(2.0), np.float32(-1.0))
  f = jax.value_and_grad(total, argnums=tuple(range(8)))
  one_val, one_grad = jax.jit(f)(*[jax.device_put(a, jax.devices()[0]) for a in args])
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1))) if x.ndim else P()))
  sharded = [put(a) for a in args]
  assert sharded[0].sharding.spec[0] == "data"
  val, grad = jax.jit(f)(*sharded)
  np.testing.assert_allclose(float(val), float(one_val), **TOL)
  for a, b in zip(grad, one_grad):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


@pytest.mark.slow
def test_context_region_head_and_losses_compose():
  """[global; regions] -> ContextEncoder -> RegionHead over region_texts -> L_slide + L_region:
  finite, every parameter gets a gradient, and the same on 8 devices."""
  from pathjax.models import pathflip as pf
  b, k, l, d = 8, 2, 3, 16
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(b, 1 + l, d)).astype(np.float32)
  t_own = rng.normal(size=(b, k, d)).astype(np.float32)
  cap = rng.normal(size=(b, d)).astype(np.float32)
  ctx = pf.ContextEncoder(depth=2, num_heads=4, mlp_dim=32)
  head = pf.RegionHead(width=d, num_heads=4)
  texts0 = lp.region_texts(t_own, t_own[:, 0])
  params = {"ctx": ctx.init(jax.random.key(0), tokens)["params"],
            "head": head.init(jax.random.key(1), texts0, tokens[:, 1:])["params"],
            "s": jnp.float32(lp.PAPER_SCALE_INIT), "beta": jnp.float32(lp.PAPER_BIAS_INIT)}

  def loss_fn(params, tokens, t_own, cap, neg_idx):
    x = ctx.apply({"params": params["ctx"]}, tokens)
    t_neg = jnp.take_along_axis(t_own, neg_idx[:, None, None], axis=1)[:, 0]
    v, w = head.apply({"params": params["head"]}, lp.region_texts(t_own, t_neg), x[:, 1:])
    region, _ = lp.region_sigmoid_loss(v[:, :k], t_own, v[:, k:], t_neg, params["s"], params["beta"])
    return lp.slide_infonce(x[:, 0], cap) + region, w

  neg_idx = lp.pick_negative_subcaptions(jax.random.key(2), np.ones((b, k), bool))
  f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (val, w), grads = f(params, tokens, t_own, cap, neg_idx)
  assert np.isfinite(float(val)) and w.shape == (b, k + b, l)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0), path
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
  (val8, _), grads8 = f(params, put(tokens), put(t_own), put(cap), put(neg_idx))
  np.testing.assert_allclose(float(val8), float(val), **TOL)
  for a, b_ in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)
