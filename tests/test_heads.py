"""SimSiam heads (BatchNorm over the global batch) and the collapse monitors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pathjax import losses
from pathjax.models import heads


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_monitors_match_direct_formulas():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 3, 16)), rng.normal(size=(5, 4, 16))
  ma, mb = rng.random((5, 3)) > 0.3, rng.random((5, 4)) > 0.3
  rows = _unit(a)[ma]
  expected = rows.std(0).mean() * np.sqrt(16)
  np.testing.assert_allclose(float(heads.spread(a, ma)), expected, rtol=1e-5)
  ua, ub = _unit(a), _unit(b)
  cos = [ua[g, i] @ ub[h, j] for g in range(5) for h in range(5) if g != h
         for i in range(3) for j in range(4) if ma[g, i] and mb[h, j]]
  np.testing.assert_allclose(float(heads.unrelated_cosine(a, b, ma, mb)), np.mean(cos), rtol=1e-5)
  same = np.ones((6, 2, 8))
  assert float(heads.spread(same)) < 1e-3
  assert float(heads.unrelated_cosine(same, same)) == pytest.approx(1.0, abs=1e-5)
  iso = rng.normal(size=(4000, 1, 64))
  assert 0.95 < float(heads.spread(iso)) < 1.05
  assert abs(float(heads.unrelated_cosine(iso, iso))) < 0.01


def test_batchnorm_head_uses_masked_global_batch_statistics():
  """Statistics over every device's rows: 8 devices give what 1 device gives; padded rows
  (mask False) change nothing."""
  head = heads.MlpHead((32, 32, 16), final_norm=True)
  x = jax.random.normal(jax.random.key(0), (64, 24))
  mask = jnp.arange(64) < 56
  params = head.init(jax.random.key(1), x, mask)["params"]
  run = lambda p, x, m: head.apply({"params": p}, x, m, mutable=["batch_stats"])[0]
  one = run(params, x, mask)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ms = jax.device_put(mask, NamedSharding(mesh, P("data")))
  eight = jax.jit(run, out_shardings=NamedSharding(mesh, P("data")))(params, xs, ms)
  assert len(eight.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(eight), np.asarray(one), atol=1e-5)
  garbage = x.at[56:].set(1e3)
  np.testing.assert_allclose(np.asarray(run(params, garbage, mask)[:56]), np.asarray(one[:56]),
                             atol=1e-5)
  # BatchNorm output: zero mean, unit variance over the real rows (before the affine, which
  # is the identity at init).
  np.testing.assert_allclose(np.asarray(one[:56]).mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(one[:56]).std(0), 1.0, atol=1e-2)


def _train_simsiam(norm: str, stop_gradient: bool, steps: int = 200):
  """A linear encoder + SimSiam heads on two noisy views of 64 random points."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      z = nn.Dense(32)(x)
      g = heads.MlpHead((32, 32, 32), final_norm=True, norm=norm, name="projector")(z)
      return g, heads.MlpHead((8, 32), norm=norm, name="predictor")(g)

  net = Net()
  data = jax.random.normal(jax.random.key(0), (64, 16))
  params = net.init(jax.random.key(1), data)["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  fwd = lambda p, x: net.apply({"params": p}, x, mutable=["batch_stats"])[0]

  def loss_fn(p, key):
    k1, k2 = jax.random.split(key)
    g1, h1 = fwd(p, data + 0.3 * jax.random.normal(k1, data.shape))
    g2, h2 = fwd(p, data + 0.3 * jax.random.normal(k2, data.shape))
    if stop_gradient:
      return losses.simsiam_loss(h1, g2, h2, g1), g1
    cos = lambda a, b: jnp.sum(losses.l2_normalize(a) * losses.l2_normalize(b), -1)
    return -0.5 * jnp.mean(cos(h1, g2) + cos(h2, g1)), g1

  @jax.jit
  def step(p, o, key):
    (_, g), grad = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
    updates, o = tx.update(grad, o, p)
    return optax.apply_updates(p, updates), o, g

  for i in range(steps):
    params, opt, g = step(params, opt, jax.random.key(100 + i))
  return float(heads.spread(g)), float(heads.unrelated_cosine(g[:, None], g[:, None]))


@pytest.mark.slow
def test_monitor_catches_a_collapsing_setup():
  """The previous LayerNorm heads collapse even with SimSiam's stop-gradient (as MR-PLIP's
  demo did: spread 0.0003, unrelated cosine 0.99999); the monitors catch it. BatchNorm heads
  on the same data stay spread."""
  collapsed_spread, collapsed_cos = _train_simsiam("layer", stop_gradient=True)
  healthy_spread, healthy_cos = _train_simsiam("batch", stop_gradient=True)
  assert collapsed_spread < 0.1 and collapsed_cos > 0.9
  assert healthy_spread > 0.5 and healthy_cos < 0.5
