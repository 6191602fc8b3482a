"""pathjax.losses against direct numpy formulas, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pathjax import losses


def _unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(x, axis=-1):
  x = x.astype(np.float64)
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _np_log_sigmoid(x):
  x = x.astype(np.float64)
  return -np.logaddexp(0.0, -x)


def _mesh(shape, names):
  devs = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return Mesh(devs, names)


def _close(a, b, rtol=1e-5, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- softmax


def _np_clip(img, txt, scale, eps=0.0):
  """Direct formula: CE with targets (1 - eps) onehot + eps / B, both directions."""
  logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
  b = logits.shape[0]
  target = (1 - eps) * np.eye(b) + eps / b
  i2t = -(target * _np_log_softmax(logits, 1)).sum(1).mean()
  t2i = -(target * _np_log_softmax(logits.T, 1)).sum(1).mean()
  return 0.5 * (i2t + t2i)


def _np_clip_grad(img, txt, scale):
  """Analytic gradients of the unsmoothed loss w.r.t. img, txt and scale."""
  img, txt = img.astype(np.float64), txt.astype(np.float64)
  raw = img @ txt.T
  logits = scale * raw
  b = logits.shape[0]
  p_r = np.exp(_np_log_softmax(logits, 1))
  p_c = np.exp(_np_log_softmax(logits, 0))
  dlogits = 0.5 * ((p_r - np.eye(b)) + (p_c - np.eye(b))) / b
  return scale * dlogits @ txt, scale * dlogits.T @ img, (dlogits * raw).sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_contrastive_value(eps):
  rng = np.random.default_rng(0)
  img, txt = _unit(rng, 6, 5), _unit(rng, 6, 5)
  got = losses.softmax_contrastive(img, txt, 10.0, label_smoothing=eps)
  _close(got, _np_clip(img, txt, 10.0, eps))


def test_softmax_contrastive_grad_vs_numpy_and_naive():
  rng = np.random.default_rng(1)
  img, txt = _unit(rng, 7, 4), _unit(rng, 7, 4)
  grads = jax.jit(jax.grad(losses.softmax_contrastive, argnums=(0, 1, 2)))(img, txt, 3.0)
  for g, ref in zip(grads, _np_clip_grad(img, txt, 3.0)):
    _close(g, ref)

  def naive(x, t, s):  # written differently: explicit logsumexp over rows and columns
    lg = s * jnp.einsum("id,jd->ij", x, t)
    d = jnp.trace(lg)
    return 0.5 * (jnp.sum(jax.nn.logsumexp(lg, 1)) - d + jnp.sum(jax.nn.logsumexp(lg, 0)) - d
                  ) / lg.shape[0]

  ng = jax.jit(jax.grad(naive, argnums=(0, 1, 2)))(img, txt, 3.0)
  for g, ref in zip(grads, ng):
    _close(g, ref)


def test_softmax_contrastive_valid_mask_equals_subset():
  rng = np.random.default_rng(2)
  img, txt = _unit(rng, 8, 4), _unit(rng, 8, 4)
  valid = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
  for eps in (0.0, 0.1):
    f = lambda x, t: losses.softmax_contrastive(x, t, 5.0, label_smoothing=eps, valid=valid)
    (val, (gx, gt)) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(img, txt)
    _close(val, _np_clip(img[valid], txt[valid], 5.0, eps))
    sx, st = jax.jit(jax.grad(
        lambda x, t: losses.softmax_contrastive(x, t, 5.0, label_smoothing=eps),
        argnums=(0, 1)))(img[valid], txt[valid])
    _close(gx[valid], sx)
    _close(gt[valid], st)
    assert np.all(np.asarray(gx)[~valid] == 0) and np.all(np.asarray(gt)[~valid] == 0)


def test_softmax_contrastive_from_logits_two_directions():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(5, 5)).astype(np.float32), rng.normal(size=(5, 5)).astype(np.float32)
  got = losses.softmax_contrastive_from_logits(a, b, label_smoothing=0.1)
  t = 0.9 * np.eye(5) + 0.02
  ref = 0.5 * (-(t * _np_log_softmax(a)).sum(1).mean() - (t * _np_log_softmax(b)).sum(1).mean())
  _close(got, ref)


def test_softmax_contrastive_sharded_jit_equals_unsharded():
  rng = np.random.default_rng(4)
  img, txt = _unit(rng, 16, 8), _unit(rng, 16, 8)
  mesh = _mesh((2, 4), ("data", "fsdp"))
  sh = NamedSharding(mesh, P(("data", "fsdp"), None))
  xi, xt = jax.device_put(img, sh), jax.device_put(txt, sh)
  f = jax.jit(jax.value_and_grad(
      lambda x, t, s: losses.softmax_contrastive(x, t, s, label_smoothing=0.1), argnums=(0, 1, 2)))
  val, grads = f(xi, xt, 7.0)
  assert val.sharding.is_fully_replicated
  rval, rgrads = jax.value_and_grad(
      lambda x, t, s: losses.softmax_contrastive(x, t, s, label_smoothing=0.1),
      argnums=(0, 1, 2))(img, txt, 7.0)
  _close(val, rval)
  for g, r in zip(grads, rgrads):
    _close(g, r)


def test_bf16_inputs_compute_in_fp32():
  rng = np.random.default_rng(5)
  img, txt = _unit(rng, 6, 4), _unit(rng, 6, 4)
  ib, tb = jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16)
  val = losses.softmax_contrastive(ib, tb, 10.0)
  assert val.dtype == jnp.float32
  # fp32 formula on the bf16-rounded inputs, not a bf16 computation
  _close(val, _np_clip(np.asarray(ib, np.float32), np.asarray(tb, np.float32), 10.0), rtol=1e-5)
  g = jax.grad(losses.softmax_contrastive)(ib, tb, 10.0)
  assert g.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------- sigmoid


def _np_siglip(img, txt, s, b):
  z = s * img.astype(np.float64) @ txt.astype(np.float64).T + b
  y = 2 * np.eye(len(img)) - 1
  return -_np_log_sigmoid(y * z).sum() / len(img)


def _np_siglip_grad(img, txt, s, b):
  img, txt = img.astype(np.float64), txt.astype(np.float64)
  raw = img @ txt.T
  z = s * raw + b
  y = 2 * np.eye(len(img)) - 1
  dz = -y / (1 + np.exp(y * z)) / len(img)  # d/dz -log sigmoid(yz) = -y sigmoid(-yz)
  return s * dz @ txt, s * dz.T @ img, (dz * raw).sum(), dz.sum()


def test_sigmoid_contrastive_value_and_grad():
  rng = np.random.default_rng(6)
  img, txt = _unit(rng, 8, 5), _unit(rng, 8, 5)
  _close(losses.sigmoid_contrastive(img, txt, 10.0, -10.0), _np_siglip(img, txt, 10.0, -10.0))
  grads = jax.jit(jax.grad(losses.sigmoid_contrastive, argnums=(0, 1, 2, 3)))(img, txt, 10.0, -10.0)
  for g, ref in zip(grads, _np_siglip_grad(img, txt, 10.0, -10.0)):
    _close(g, ref)


def test_sigmoid_loss_from_logits_mask():
  rng = np.random.default_rng(7)
  z = rng.normal(size=(3, 6)).astype(np.float32)
  y = np.where(rng.random((3, 6)) < 0.3, 1.0, -1.0).astype(np.float32)
  m = rng.random((3, 6)) < 0.7
  ref = -(_np_log_sigmoid(y * z) * m).sum() / 3
  _close(losses.sigmoid_loss_from_logits(z, y, m), ref)


@pytest.mark.parametrize("shape,names,batch_axes", [
    ((8,), ("data",), ("data",)),
    ((8,), ("data",), "data"),
    ((2, 4), ("data", "fsdp"), ("data", "fsdp")),
    ((2, 4), ("data", "tensor"), ("data",)),  # batch over part of the mesh, rest replicated
])
def test_chunked_sigmoid_equals_unchunked(shape, names, batch_axes):
  rng = np.random.default_rng(8)
  bsz = 16
  img, txt = _unit(rng, bsz, 8), _unit(rng, bsz, 8)
  mesh = _mesh(shape, names)
  axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  sh = NamedSharding(mesh, P(axes, None))
  xi, xt = jax.device_put(img, sh), jax.device_put(txt, sh)
  s, b = jnp.float32(10.0), jnp.float32(-10.0)

  def chunked(x, t, s, b):
    return losses.chunked_sigmoid_contrastive(x, t, s, b, mesh=mesh, batch_axes=batch_axes)

  val, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(xi, xt, s, b)
  rval, rgrads = jax.value_and_grad(losses.sigmoid_contrastive, argnums=(0, 1, 2, 3))(
      img, txt, s, b)
  _close(val, rval)
  _close(val, _np_siglip(img, txt, 10.0, -10.0))
  for g, r in zip(grads, rgrads):
    _close(g, r)
  # The image gradient stays sharded like the images.
  assert grads[0].sharding.is_equivalent_to(sh, 2)


def test_chunked_sigmoid_bf16_and_eager():
  rng = np.random.default_rng(9)
  img, txt = _unit(rng, 16, 8), _unit(rng, 16, 8)
  ib, tb = jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16)
  mesh = _mesh((8,), ("data",))
  f = lambda x, t: losses.chunked_sigmoid_contrastive(x, t, 2.0, -1.0, mesh=mesh,
                                                      batch_axes="data")
  val = f(ib, tb)  # eager, unsharded inputs
  assert val.dtype == jnp.float32
  _close(val, losses.sigmoid_contrastive(ib, tb, 2.0, -1.0))
  gx, gt = jax.jit(jax.grad(f, argnums=(0, 1)))(ib, tb)
  assert gx.dtype == jnp.bfloat16 and gt.dtype == jnp.bfloat16
  rx, rt = jax.grad(losses.sigmoid_contrastive, argnums=(0, 1))(ib, tb, 2.0, -1.0)
  _close(gx, rx, rtol=1e-2, atol=1e-3)
  _close(gt, rt, rtol=1e-2, atol=1e-3)


def test_chunked_sigmoid_on_explicit_axes_mesh():
  """jax.make_mesh's default Explicit axes: inputs laid out otherwise are resharded."""
  rng = np.random.default_rng(19)
  img, txt = _unit(rng, 16, 8), _unit(rng, 16, 8)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  xi, xt = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in (img, txt))
  f = lambda x, t: losses.chunked_sigmoid_contrastive(x, t, 10.0, -10.0, mesh=mesh,
                                                      batch_axes=("data", "fsdp"))
  val, g = jax.jit(jax.value_and_grad(f))(xi, xt)
  _close(val, _np_siglip(img, txt, 10.0, -10.0))
  _close(g, _np_siglip_grad(img, txt, 10.0, -10.0)[0])


def test_chunked_sigmoid_rejects_indivisible_batch():
  mesh = _mesh((8,), ("data",))
  x = np.zeros((12, 4), np.float32)
  with pytest.raises(ValueError):
    losses.chunked_sigmoid_contrastive(x, x, 1.0, 0.0, mesh=mesh, batch_axes="data")


# ---------------------------------------------------------------------------- CVTA


def _np_cvta(v, w, w_mask, k, temp, negatives, v_mask=None):
  """Loops straight from the formula; returns (loss, valid bags, masked bags)."""
  bsz, num_l, _ = v.shape
  v_mask = np.ones((bsz, num_l), bool) if v_mask is None else v_mask
  v, w = v.astype(np.float64), w.astype(np.float64)
  bag_losses = []
  for b in range(bsz):
    kw = np.flatnonzero(w_mask[b])
    if len(kw) < k + 1 or not v_mask[b].any():
      continue
    if negatives == "bag":
      denom_w = w[b, kw]
    else:
      denom_w = w[w_mask]
    terms = []
    for a in np.flatnonzero(v_mask[b]):
      s_own = w[b, kw] @ v[b, a] / temp
      top = np.argsort(-s_own)[:k]
      lse = np.log(np.exp(denom_w @ v[b, a] / temp).sum())
      terms.append(-np.mean(s_own[top] - lse))
    bag_losses.append(np.mean(terms))
  n = len(bag_losses)
  return (np.mean(bag_losses) if n else 0.0), n, bsz - n


def _cvta_inputs(seed, bsz=4, num_l=3, num_k=6, d=5):
  rng = np.random.default_rng(seed)
  v, w = _unit(rng, bsz, num_l, d), _unit(rng, bsz, num_k, d)
  w_mask = np.ones((bsz, num_k), bool)
  w_mask[1, 3:] = False   # 3 valid keywords: enough for k = 2, not for k = 3
  w_mask[2, 1:] = False   # 1 valid keyword: always masked
  return v, w, w_mask


@pytest.mark.parametrize("negatives", ["bag", "global"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cvta_value_and_masking(negatives, k):
  v, w, w_mask = _cvta_inputs(10)
  v_mask = np.ones(v.shape[:2], bool)
  v_mask[0, 2] = False
  loss, metrics = losses.cvta_loss(v, w, w_mask, k=k, temperature=0.07, negatives=negatives,
                                   v_mask=v_mask)
  ref, n_ok, n_masked = _np_cvta(v, w, w_mask, k, 0.07, negatives, v_mask)
  _close(loss, ref)
  assert int(metrics["cvta_valid_bags"]) == n_ok
  assert int(metrics["cvta_masked_bags"]) == n_masked
  assert n_masked == (2 if k >= 3 else 1)
  assert 0 < float(metrics["cvta_pos_prob"]) <= 1


def test_cvta_all_bags_masked_is_zero_not_nan():
  v, w, _ = _cvta_inputs(11)
  w_mask = np.zeros(w.shape[:2], bool)
  w_mask[:, 0] = True
  (loss, m), g = jax.jit(jax.value_and_grad(
      lambda v: losses.cvta_loss(v, w, w_mask, k=1, temperature=0.1), has_aux=True))(v)
  assert float(loss) == 0.0 and int(m["cvta_masked_bags"]) == 4
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("negatives", ["bag", "global"])
def test_cvta_grad_topk_selection_is_stopped(negatives):
  """Gradients equal those of a naive loss whose positive indices are fixed constants."""
  v, w, w_mask = _cvta_inputs(12)
  k, temp = 2, 0.1
  sims = np.einsum("bld,bkd->blk", v, w)
  sims = np.where(w_mask[:, None], sims, -np.inf)
  idx = np.argsort(-sims, axis=-1)[..., :k]                # constants: no gradient path
  ok = w_mask.sum(-1) >= k + 1

  def naive(v, w, temp):
    terms = []
    for b in np.flatnonzero(ok):
      kw = np.flatnonzero(w_mask[b])
      denom = w[b, kw] if negatives == "bag" else w[w_mask]
      logits_den = jnp.einsum("ld,nd->ln", v[b], denom) / temp
      lse = jax.scipy.special.logsumexp(logits_den, axis=-1)
      pos = jnp.einsum("lkd,ld->lk", w[b][idx[b]], v[b]) / temp
      terms.append(jnp.mean(lse[:, None] - pos))
    return jnp.mean(jnp.stack(terms))

  f = lambda v, w, t: losses.cvta_loss(v, w, w_mask, k=k, temperature=t, negatives=negatives)[0]
  val, got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(v, w, temp)
  rval, ref = jax.jit(jax.value_and_grad(naive, argnums=(0, 1, 2)))(v, w, temp)
  _close(val, rval)
  for g, r in zip(got, ref):
    _close(g, r, atol=1e-4)
  # padded keywords get no gradient
  assert np.all(np.asarray(got[1])[~w_mask] == 0)


# ---------------------------------------------------------------------------- SimSiam


def _np_negcos(p, z):
  p, z = p.astype(np.float64), z.astype(np.float64)
  return -(p * z).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(z, axis=-1)


def test_simsiam_value_mask_and_stop_gradient():
  rng = np.random.default_rng(13)
  p1, z2, p2, z1 = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(4))
  ref = 0.5 * _np_negcos(p1, z2) + 0.5 * _np_negcos(p2, z1)
  _close(losses.simsiam_loss(p1, z2, p2, z1), ref.mean())
  mask = np.array([1, 0, 1, 1, 0, 1], bool)
  _close(losses.simsiam_loss(p1, z2, p2, z1, mask=mask), ref[mask].mean())

  gz2, gz1 = jax.jit(jax.grad(losses.simsiam_loss, argnums=(1, 3)))(p1, z2, p2, z1)
  assert np.all(np.asarray(gz2) == 0) and np.all(np.asarray(gz1) == 0)

  def naive(p1, p2):  # gradient w.r.t. p of -cos(p, z): -(z/|z| - cos p/|p|) / |p|
    cos = lambda a, b: jnp.sum(a * b, -1) / jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
    return jnp.mean(-0.5 * cos(p1, z2) - 0.5 * cos(p2, z1))

  got = jax.jit(jax.grad(losses.simsiam_loss, argnums=(0, 2)))(p1, z2, p2, z1)
  for g, r in zip(got, jax.jit(jax.grad(naive, argnums=(0, 1)))(p1, p2)):
    _close(g, r)
  # analytic numpy gradient for p1
  p, z = p1.astype(np.float64), z2.astype(np.float64)
  pn, zn = np.linalg.norm(p, axis=-1, keepdims=True), np.linalg.norm(z, axis=-1, keepdims=True)
  cos = (p * z).sum(-1, keepdims=True) / pn / zn
  ana = -0.5 * (z / zn - cos * p / pn) / pn / len(p)
  _close(got[0], ana)


def test_simsiam_through_shared_network_only_predictor_path():
  """With z = g(x) and p = h(z), only the p branch carries gradient into g's weights."""
  rng = np.random.default_rng(14)
  x1, x2 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
  wg, wh = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=(3, 3)).astype(np.float32)

  def loss(wg):
    z1, z2 = x1 @ wg, x2 @ wg
    return losses.simsiam_loss(z1 @ wh, z2, z2 @ wh, z1)

  def manual(wg):
    z1, z2 = x1 @ wg, x2 @ wg
    c1, c2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    cos = lambda a, b: jnp.sum(losses.l2_normalize(a) * losses.l2_normalize(b), -1)
    return jnp.mean(-0.5 * cos(z1 @ wh, c2) - 0.5 * cos(z2 @ wh, c1))

  _close(jax.jit(jax.grad(loss))(wg), jax.jit(jax.grad(manual))(wg))


# ---------------------------------------------------------------------------- ITM


def test_itm_hard_negatives_never_positive_and_follow_softmax():
  rng = np.random.default_rng(15)
  b = 5
  sim = rng.normal(size=(b, b)).astype(np.float32) * 2
  pos_mask = np.zeros((b, b), bool)
  pos_mask[0, 1] = True   # text 1 also describes image 0 (e.g. same slide)
  valid = np.array([1, 1, 1, 1, 0], bool)
  keys = jax.random.split(jax.random.key(0), 3000)
  f = jax.jit(jax.vmap(lambda k: losses.itm_hard_negative_indices(
      sim, sim.T, k, positive_mask=pos_mask, valid=valid)))
  neg_t, neg_i = map(np.asarray, f(keys))
  assert neg_t.dtype == np.int32 and neg_t.shape == (3000, b)
  assert not np.any(neg_t == np.arange(b)) and not np.any(neg_i == np.arange(b))
  assert not np.any(neg_t[:, 0] == 1) and not np.any(neg_i[:, 1] == 0)
  assert not np.any(neg_t == 4) and not np.any(neg_i == 4)
  # empirical frequencies of image 2's negative text vs softmax over admissible texts
  adm = np.array([1, 1, 0, 1, 0], bool)
  p = np.exp(sim[2] - sim[2].max()) * adm
  p /= p.sum()
  freq = np.bincount(neg_t[:, 2], minlength=b) / len(neg_t)
  np.testing.assert_allclose(freq, p, atol=0.03)
  # deterministic in the key
  a1 = losses.itm_hard_negative_indices(sim, sim.T, jax.random.key(3))
  a2 = losses.itm_hard_negative_indices(sim, sim.T, jax.random.key(3))
  np.testing.assert_array_equal(a1[0], a2[0])


def test_image_text_matching_loss():
  rng = np.random.default_rng(17)
  logits = rng.normal(size=(9, 2)).astype(np.float32)
  labels = np.array([1] * 3 + [0] * 6)
  mask = np.ones(9, bool)
  mask[4] = False
  loss, m = losses.image_text_matching_loss(logits, labels, mask)
  lp = _np_log_softmax(logits)
  _close(loss, -lp[np.arange(9), labels][mask].mean())
  _close(m["itm_accuracy"], (logits.argmax(1) == labels)[mask].mean())


def test_sigmoid_valid_mask_equals_subset_and_chunked():
  rng = np.random.default_rng(18)
  img, txt = _unit(rng, 16, 6), _unit(rng, 16, 6)
  valid = np.ones(16, bool)
  valid[[2, 3, 11]] = False
  mesh = _mesh((2, 4), ("data", "fsdp"))

  def plain(x, t, s, b, v):
    return losses.sigmoid_contrastive(x, t, s, b, valid=v)

  def chunked(x, t, s, b, v):  # valid is traced here: a jit argument
    return losses.chunked_sigmoid_contrastive(x, t, s, b, mesh=mesh,
                                              batch_axes=("data", "fsdp"), valid=v)

  args = (img, txt, jnp.float32(5.0), jnp.float32(-3.0), valid)
  val, grads = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2, 3)))(*args)
  cval, cgrads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(*args)
  _close(val, _np_siglip(img[valid], txt[valid], 5.0, -3.0))
  _close(cval, val)
  ref = _np_siglip_grad(img[valid], txt[valid], 5.0, -3.0)
  _close(grads[0][valid], ref[0])
  _close(grads[1][valid], ref[1])
  _close(grads[2], ref[2])
  _close(grads[3], ref[3])
  assert np.all(np.asarray(grads[0])[~valid] == 0)
  for g, r in zip(cgrads, grads):
    _close(g, r)


def test_chunked_sigmoid_memory_does_not_hold_global_logits():
  """Compiled per-device scratch of the chunked loss stays below one [B/n, B] logit slab."""
  mesh = _mesh((8,), ("data",))
  sh = NamedSharding(mesh, P("data", None))
  bsz, n = 2048, 8
  x = jax.ShapeDtypeStruct((bsz, 32), jnp.float32, sharding=sh)
  s = jax.ShapeDtypeStruct((), jnp.float32)
  slab = bsz * (bsz // n) * 4

  def temp_bytes(f):
    c = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3))).lower(x, x, s, s).compile()
    m = c.memory_analysis()
    if m is None:
      pytest.skip("no memory analysis on this backend")
    return m.temp_size_in_bytes

  chunked = temp_bytes(lambda a, b, c, d: losses.chunked_sigmoid_contrastive(
      a, b, c, d, mesh=mesh, batch_axes="data"))
  plain = temp_bytes(losses.sigmoid_contrastive)
  assert plain >= slab
  assert chunked < 0.75 * slab, (chunked, slab)
