"""Optimizer: schedule values, regex masks, lr multipliers and freezing."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathjax.optim import describe_rules, make_optimizer, make_schedule, parameter_paths
from pathjax.train import ParamSplit
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


def test_param_split_and_describe():
  params = _params()
  split = ParamSplit((r"head/.*",))
  trainable, frozen = split.split(params)
  assert sorted(parameter_paths(trainable)) == ["encoder/bias", "encoder/kernel", "norm/scale"]
  assert sorted(parameter_paths(frozen)) == ["head/bias", "head/kernel"]
  jax.tree.map(np.testing.assert_array_equal, ParamSplit.merge(trainable, frozen), params)
  # The optimizer only ever sees the trainable half: no moments for frozen leaves.
  tx, _ = make_optimizer(_config(weight_decay=0.1), 10)
  n_moments = sum(x.size for x in jax.tree.leaves(tx.init(trainable)) if x.ndim > 0)
  assert n_moments == 2 * sum(x.size for x in jax.tree.leaves(trainable))
  lines = describe_rules(_config(freeze=(r"head/.*",), weight_decay=0.1), params)
  assert "head/kernel frozen=True wd=True lr_mult=1.0" in lines
  assert "encoder/bias frozen=False wd=False lr_mult=1.0" in lines


def test_invalid_regex_is_a_clear_error():
  with pytest.raises(ValueError, match="invalid parameter regex"):
    ParamSplit(("enc(",))
