"""BLIP-2 stage-1 losses against direct formulas and torch's label-smoothed cross-entropy;
8 sharded devices against 1 device (a subprocess)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train_helpers import fake_devices

from pathjax import losses_blip


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- ITC


def _np_itc(img, txt, temp, pos, eps):
  """Direct formula: max over queries, targets spread over positives, smoothed by eps / B."""
  sim = np.einsum("bqe,ce->bcq", img.astype(np.float64), txt.astype(np.float64)).max(-1)
  logits = sim / temp
  b = logits.shape[0]

  def ce(lg, p):
    t = p / p.sum(1, keepdims=True)
    t = (1 - eps) * t + eps / b
    return -(t * _log_softmax(lg)).sum(1).mean()

  return 0.5 * (ce(logits, pos) + ce(logits.T, pos.T))


def test_same_text_mask():
  ids = np.array([[2, 5, 6, 3, 0], [2, 5, 6, 3, 7], [2, 5, 6, 3, 0], [2, 9, 3, 0, 0]])
  mask = ids != 0
  got = np.asarray(losses_blip.same_text_mask(ids, mask))
  want = np.eye(4, dtype=bool)
  want[0, 2] = want[2, 0] = True
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shared", [False, True], ids=["unique", "shared_reports"])
def test_itc_equals_direct_formula_and_torch(shared):
  rng = np.random.default_rng(0)
  b, q, e = 6, 4, 8
  img, txt = _unit(rng, b, q, e), _unit(rng, b, e)
  pos = np.eye(b, dtype=bool)
  if shared:  # slides 1, 3, 4 share one report; 0 and 5 another
    for group in ((1, 3, 4), (0, 5)):
      for i in group:
        for j in group:
          pos[i, j] = True
  sim = losses_blip.itc_similarity(img, txt)
  loss, metrics = losses_blip.itc_loss(sim, 0.07, positive_mask=pos)
  _close(loss, _np_itc(img, txt, 0.07, pos.astype(np.float64), 0.1))
  torch = pytest.importorskip("torch")
  s = torch.from_numpy(np.asarray(sim, np.float64)) / 0.07
  t = torch.from_numpy(pos / pos.sum(1, keepdims=True))
  ref = 0.5 * (torch.nn.functional.cross_entropy(s, t, label_smoothing=0.1)
               + torch.nn.functional.cross_entropy(s.T, t.T.contiguous(), label_smoothing=0.1))
  _close(loss, ref.item())
  if not shared:  # LAVIS' integer targets
    ref = 0.5 * (torch.nn.functional.cross_entropy(s, torch.arange(b), label_smoothing=0.1)
                 + torch.nn.functional.cross_entropy(s.T, torch.arange(b), label_smoothing=0.1))
    _close(loss, ref.item())
  assert 0.0 <= float(metrics["itc_i2t_accuracy"]) <= 1.0


def test_itc_gradient_and_valid_mask_equals_subset():
  rng = np.random.default_rng(1)
  img, txt = _unit(rng, 5, 3, 4), _unit(rng, 5, 4)
  valid = np.array([1, 1, 0, 1, 0], bool)
  f = lambda i, t, v=None: losses_blip.itc_loss(losses_blip.itc_similarity(i, t), 0.1,
                                                valid=v)[0]
  _close(f(img, txt, valid), f(img[valid], txt[valid]))
  g = jax.grad(f, argnums=(0, 1))(img, txt, valid)
  gs = jax.grad(f, argnums=(0, 1))(img[valid], txt[valid])
  _close(g[0][valid], gs[0])
  assert np.all(np.asarray(g[0])[~valid] == 0)
  # numerical gradient of the temperature-scaled loss w.r.t. one text embedding entry
  h = 1e-3
  tp, tm = txt.copy(), txt.copy()
  tp[0, 1] += h
  tm[0, 1] -= h
  num = (float(f(img, tp)) - float(f(img, tm))) / (2 * h)
  _close(jax.grad(f, argnums=1)(img, txt)[0, 1], num, tol=2e-3)


# ------------------------------------------------------------------------------------- ITM


def test_itm_negatives_follow_lavis_weights_and_skip_identical_reports():
  rng = np.random.default_rng(2)
  b = 5
  sim = rng.normal(size=(b, b)).astype(np.float32) * 3
  pos = np.eye(b, dtype=bool)
  pos[0, 2] = pos[2, 0] = True            # slides 0 and 2 share a report
  valid = np.array([1, 1, 1, 1, 0], bool)  # slide 4 is padding
  keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
  neg = jax.vmap(lambda k: losses_blip.itm_negatives(sim, k, positive_mask=pos, valid=valid))(keys)
  t4i, i4t = np.asarray(neg.text_for_image), np.asarray(neg.image_for_text)
  for row in range(4):
    for idx, s in ((t4i[:, row], sim[row]), (i4t[:, row], sim[:, row])):
      # LAVIS: softmax over the (valid) candidates + 1e-4, positives zeroed, renormalised.
      p = np.exp(_log_softmax(np.where(valid, s, -np.inf)))
      w = np.where(valid & ~pos[row], p + 1e-4, 0.0)
      w = w / w.sum()
      freq = np.bincount(idx, minlength=b) / len(idx)
      np.testing.assert_allclose(freq, w, atol=0.012)
      assert not np.any(pos[row][idx]) and np.all(valid[idx])
  assert np.all(np.asarray(neg.text_ok)[:, :4]) and not np.any(np.asarray(neg.text_ok)[:, 4])


def test_itm_negatives_none_admissible_is_not_ok():
  sim = np.zeros((3, 3), np.float32)
  pos = np.ones((3, 3), bool)  # one report for all
  neg = losses_blip.itm_negatives(sim, jax.random.PRNGKey(0), positive_mask=pos)
  assert not np.any(np.asarray(neg.text_ok)) and not np.any(np.asarray(neg.image_ok))
  lp = jnp.array([[0.0, 2.0]] * 3)
  loss, _ = losses_blip.itm_loss(lp, lp, lp, negatives=neg)
  _close(loss, -np.log(np.exp(2.0) / (1 + np.exp(2.0))))  # only the positives count


def test_itm_loss_equals_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  lp, li, lt = (rng.normal(size=(4, 2)).astype(np.float32) for _ in range(3))
  loss, metrics = losses_blip.itm_loss(lp, li, lt)
  labels = torch.tensor([1] * 4 + [0] * 8)
  ref = torch.nn.functional.cross_entropy(torch.from_numpy(np.concatenate([lp, li, lt])), labels)
  _close(loss, ref.item())
  assert "itm_accuracy" in metrics


# ------------------------------------------------------------------------------------- ITG


def test_itg_equals_torch_label_smoothed_ce_with_pads_ignored():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(4)
  b, t, v = 3, 6, 11
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
  ids = rng.integers(1, v, size=(b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[0, 4:] = False
  mask[2, 2:] = False
  ids[~mask] = 0
  loss, metrics = losses_blip.itg_loss(logits, ids, mask)
  labels = torch.from_numpy(np.where(mask, ids, -100)[:, 1:].astype(np.int64))
  ref = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits[:, :-1]).reshape(-1, v), labels.reshape(-1), ignore_index=-100,
      label_smoothing=0.1)
  _close(loss, ref.item())
  assert int(metrics["itg_tokens"]) == int(mask[:, 1:].sum())
  # direct formula
  lp = _log_softmax(logits[:, :-1])
  tgt, w = ids[:, 1:], mask[:, 1:]
  nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
  per = 0.9 * nll - 0.1 * lp.mean(-1)
  _close(loss, (per * w).sum() / w.sum())


# ------------------------------------------------------------------------------- 8 == 1 device

_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from pathjax import losses_blip

def inputs():
  rng = np.random.default_rng(7)
  b, q, e, t, v = 16, 4, 8, 6, 13
  img = rng.normal(size=(b, q, e)); img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt = rng.normal(size=(b, e)); txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  ids = rng.integers(1, v, size=(b, t)).astype(np.int32)
  ids[3] = ids[9]; ids[5] = ids[9]          # three slides share a report
  mask = np.ones((b, t), bool); mask[::3, 4:] = False
  ids[~mask] = 0
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  itm = rng.normal(size=(3, b, 2)).astype(np.float32)
  valid = np.ones(b, bool); valid[-1] = False
  return img.astype(np.float32), txt.astype(np.float32), ids, mask, logits, itm, valid

def losses(img, txt, ids, mask, logits, itm, valid, rng):
  same = losses_blip.same_text_mask(ids, mask)
  sim = losses_blip.itc_similarity(img, txt)
  l_itc, _ = losses_blip.itc_loss(sim, 0.07, positive_mask=same, valid=valid)
  neg = losses_blip.itm_negatives(sim / 0.07, rng, positive_mask=same, valid=valid)
  l_itm, _ = losses_blip.itm_loss(itm[0], itm[1], itm[2], negatives=neg, valid=valid)
  l_itg, _ = losses_blip.itg_loss(logits, ids, mask)
  return l_itc, l_itm, l_itg, neg.text_for_image, neg.image_for_text

def run(shard):
  args = inputs()
  if shard is not None:
    args = tuple(jax.device_put(a, shard(a)) for a in args)
  f = jax.jit(jax.value_and_grad(lambda img, txt, *rest: sum(losses(img, txt, *rest)[:3]),
                                 argnums=(0, 1)))
  out = jax.jit(losses)(*args, jax.random.PRNGKey(3))
  (val, grads) = f(*args, jax.random.PRNGKey(3))
  return {"losses": [float(x) for x in out[:3]], "t4i": np.asarray(out[3]).tolist(),
          "i4t": np.asarray(out[4]).tolist(), "total": float(val),
          "grads": [np.asarray(g).ravel().tolist() for g in grads]}

if __name__ == "__main__":
  print(json.dumps(run(None)))
"""


@pytest.mark.slow
def test_losses_on_8_devices_equal_1_device(tmp_path):
  script = tmp_path / "blip_losses.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, XLA_FLAGS=fake_devices(1),
             JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = json.loads(proc.stdout.strip().splitlines()[-1])
  sys.path.insert(0, str(tmp_path))
  try:
    import blip_losses
  finally:
    sys.path.remove(str(tmp_path))
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  shard = lambda a: NamedSharding(mesh, P(("data", "fsdp"), *([None] * (a.ndim - 1)))
                                  if a.shape[0] % 8 == 0 else P(None, ("data", "fsdp")))
  eight = blip_losses.run(shard)
  _close(eight["losses"], one["losses"])
  _close(eight["total"], one["total"])
  assert eight["t4i"] == one["t4i"] and eight["i4t"] == one["i4t"]
  for g8, g1 in zip(eight["grads"], one["grads"]):
    _close(g8, g1)
