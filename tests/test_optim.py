"""Optimizer: schedule values, regex masks, lr multipliers and freezing."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathjax.optim import (describe_rules, make_optimizer, make_schedule, parameter_paths,
                           stop_frozen_gradients)
from pathjax.train_config import default_optimizer_config


def _params():
  return {"encoder": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
          "norm": {"scale": jnp.ones((4,))},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones((2,))}}


def _config(**kw):
  c = default_optimizer_config()
  c.grad_clip_norm = 0.0
  c.warmup_steps = 0
  c.schedule = "constant"
  c.lr = 0.1
  c.update(kw)
  return c


def test_parameter_paths():
  assert sorted(parameter_paths(_params())) == [
      "encoder/bias", "encoder/kernel", "head/bias", "head/kernel", "norm/scale"]


def test_warmup_cosine_schedule_values():
  c = _config(lr=1.0, end_lr=0.1, warmup_steps=10, schedule="cosine")
  s = make_schedule(c, total_steps=110)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  # Halfway through the decay: end + (peak - end) * (1 + cos(pi/2)) / 2.
  np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)
  assert float(s(200)) == pytest.approx(0.1)


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="schedule"):
    make_schedule(_config(schedule="cosin"), 10)


def test_weight_decay_mask_excludes_bias_and_norm():
  c = _config(weight_decay=0.5, wd_exclude=(r".*bias", r"norm/.*"))
  tx, _ = make_optimizer(c, 10)
  params = _params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # Zero gradient: Adam contributes nothing, decay is -lr * wd * p where not excluded.
  np.testing.assert_allclose(updates["encoder"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["encoder"]["bias"], 0.0)
  np.testing.assert_allclose(updates["head"]["bias"], 0.0)
  np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


def test_lr_multipliers_first_match_wins():
  c = _config(weight_decay=0.0, lr_multipliers=((r"head/kernel", 10.0), (r"head/.*", 0.5)))
  tx, _ = make_optimizer(c, 10)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  base = float(updates["encoder"]["kernel"][0, 0])
  np.testing.assert_allclose(base, -0.1, rtol=1e-5)  # first Adam step: -lr * g/|g|
  np.testing.assert_allclose(updates["head"]["kernel"], 10 * base, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"], 0.5 * base, rtol=1e-6)


def test_frozen_params_never_change_and_have_no_moments():
  c = _config(weight_decay=0.1, freeze=(r"encoder/.*",), grad_clip_norm=1.0)
  tx, _ = make_optimizer(c, 10)
  params = _params()
  state = tx.init(params)
  # No optimizer state leaf has the shape of a frozen-only parameter ((3, 4) is encoder/kernel).
  assert all(leaf.shape != (3, 4) for leaf in jax.tree.leaves(state))
  n_trainable = params["head"]["kernel"].size + params["head"]["bias"].size + params["norm"]["scale"].size
  n_moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert n_moments == 2 * n_trainable
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for i in range(3):
    grads = jax.tree.map(lambda x: jnp.full_like(x, i + 1.0), params)
    updates, state = step(params, state, grads)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["encoder"]["kernel"], 1.0)
  np.testing.assert_array_equal(params["encoder"]["bias"], 1.0)
  assert not np.allclose(params["head"]["kernel"], 1.0)


def test_gradient_clipping_ignores_frozen_gradients():
  # eps=1 makes the first Adam step lr * g / (|g| + 1), so the gradient's scale shows.
  c = _config(freeze=(r"encoder/.*",), grad_clip_norm=10.0, b1=0.0, b2=0.0, eps=1.0)
  tx, _ = make_optimizer(c, 10)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  grads["encoder"]["kernel"] = jnp.full((3, 4), 1e6)  # huge but frozen: must not shrink the rest
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.05, rtol=1e-4)  # norm 3.5 < 10: unclipped


def test_stop_frozen_gradients_and_describe():
  params = _params()
  f = lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(stop_frozen_gradients(p, (r"head/.*",))))
  g = jax.grad(f)(params)
  np.testing.assert_array_equal(g["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(g["encoder"]["kernel"], 1.0)
  lines = describe_rules(_config(freeze=(r"head/.*",), weight_decay=0.1), params)
  assert "head/kernel frozen=True wd=True lr_mult=1.0" in lines
  assert "encoder/bias frozen=False wd=False lr_mult=1.0" in lines


def test_invalid_regex_is_a_clear_error():
  with pytest.raises(ValueError, match="invalid parameter regex"):
    make_optimizer(_config(freeze=("enc(",)), 10)[0].init(_params())
