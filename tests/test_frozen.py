"""Trainable/frozen split: frozen weights are loaded, never initialised, differentiated,
accumulated or checkpointed, and come out of training bit-identical."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pathjax import sharding, train as train_lib
from pathjax.optim import make_optimizer
from pathjax.recipes.toy import ToyRecipe
from train_helpers import toy_config

ENCODER = ("encoder/kernel", "encoder/bias")


class PretrainedToy(ToyRecipe):
  """The toy recipe with a published encoder: fixed weights for the frozen paths."""

  calls: list

  def __init__(self, config):
    super().__init__(config)
    self.calls = []
    rng = np.random.default_rng(7)
    self.weights = {"encoder/kernel": rng.standard_normal((8, 32)).astype(np.float32),
                    "encoder/bias": rng.standard_normal((32,)).astype(np.float32)}

  def load_pretrained(self, abstract, wanted):
    self.calls.append(sorted(wanted))
    return {p: jax.device_put(self.weights[p], abstract[p].sharding)
            for p in wanted if p in self.weights}


def _frozen_config(**overrides):
  config = toy_config("frozen", **overrides)
  config.unlock()
  config.optimizer.accumulate_steps = 4
  config.batch_size = 32  # 4 micro-batches over the 8 fake devices
  return config


def test_frozen_leaves_are_not_in_the_state_the_carry_or_the_checkpoint(tmp_path):
  config = _frozen_config(total_steps=6, log_every=3, checkpoint_every=3)
  recipe = PretrainedToy(config)
  mesh = sharding.mesh_from_config(config)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  layout = train_lib.abstract_train_state(config, recipe, mesh, tx)
  flat_state = traverse_util.flatten_dict(layout.state.params, sep="/")
  assert not set(ENCODER) & set(flat_state)
  assert sorted(traverse_util.flatten_dict(layout.frozen, sep="/")) == sorted(ENCODER)
  # No Adam moment for the frozen kernel (the only [8, 32] array of the model).
  assert all(x.shape != (8, 32) for x in jax.tree.leaves(layout.state.opt_state))

  # The accumulation carry of the scanned micro-batches holds trainable gradients only.
  step = train_lib.build_train_step(config, recipe, mesh, layout, tx, schedule)
  batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                       recipe.example_batch(config.batch_size))
  jaxpr = jax.make_jaxpr(step)(layout.state, layout.frozen, batch)
  scans = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "scan"]
  assert scans
  for scan in scans:
    carry = scan.invars[scan.params["num_consts"]:][:scan.params["num_carry"]]
    shapes = [tuple(v.aval.shape) for v in carry]
    assert (8, 32) not in shapes and (32,) in shapes, shapes  # proj bias is, encoder kernel is not
    n_carry = sum(int(np.prod(s)) for s in shapes)
    n_trainable = sum(int(np.prod(x.shape)) for x in flat_state.values())
    assert n_carry < n_trainable + 64  # loss + metrics on top of the trainable gradients

  # Training end to end: the checkpoint stores no frozen leaf.
  final = train_lib.train(config, tmp_path, recipe=recipe)
  assert final["step"] == 6
  metadata = "".join(open(f).read() for f in glob.glob(
      str(tmp_path / "checkpoints" / "6" / "**" / "_METADATA"), recursive=True))
  assert "proj" in metadata and "encoder" not in metadata


def test_frozen_weights_are_loaded_not_initialised_and_stay_bit_identical(tmp_path, monkeypatch):
  config = _frozen_config(total_steps=4, log_every=2, checkpoint_every=2)
  recipe = PretrainedToy(config)
  initialised = []
  real_init = train_lib._init_leaves
  monkeypatch.setattr(train_lib, "_init_leaves",
                      lambda layout, mesh, rules, paths: initialised.extend(paths)
                      or real_init(layout, mesh, rules, paths))
  seen = {}

  def capture(params, step):
    seen[step] = jax.device_get(params)
    return {}

  train_lib.train(config, tmp_path, recipe=recipe,
                  evaluators=[train_lib.Evaluator("capture", every=2, fn=capture)])
  assert not set(ENCODER) & set(initialised)          # never initialised randomly first
  assert sorted(ENCODER) in recipe.calls              # frozen paths asked for on the start
  for step in (2, 4):
    np.testing.assert_array_equal(seen[step]["encoder"]["kernel"], recipe.weights["encoder/kernel"])
    np.testing.assert_array_equal(seen[step]["encoder"]["bias"], recipe.weights["encoder/bias"])
  assert not np.array_equal(seen[2]["proj"]["kernel"], seen[4]["proj"]["kernel"])

  # A resumed run loads the frozen weights again (they are not in the checkpoint) and
  # asks for frozen paths only: trainable ones come from the checkpoint.
  config.unlock()
  config.total_steps = 6
  resumed = PretrainedToy(config)
  train_lib.train(config, tmp_path, recipe=resumed,
                  evaluators=[train_lib.Evaluator("capture", every=2, fn=capture)])
  assert resumed.calls == [sorted(ENCODER)]
  np.testing.assert_array_equal(seen[6]["encoder"]["kernel"], recipe.weights["encoder/kernel"])


def test_checkpoint_frozen_stores_and_restores_them(tmp_path):
  config = _frozen_config(total_steps=2, log_every=1, checkpoint_every=2)
  config.checkpoint_frozen = True
  train_lib.train(config, tmp_path)
  metadata = "".join(open(f).read() for f in glob.glob(
      str(tmp_path / "checkpoints" / "2" / "**" / "_METADATA"), recursive=True))
  assert "encoder" in metadata
  config.total_steps = 3
  assert train_lib.train(config, tmp_path)["step"] == 3


def test_init_traces_from_shapes_without_baking_a_batch():
  config = toy_config(batch_size=4096)
  recipe = ToyRecipe(config)
  batch = recipe.example_batch(config.batch_size)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(batch))
  mesh = sharding.mesh_from_config(config)
  layout = train_lib.abstract_train_state(config, recipe, mesh)
  hlo = jax.jit(lambda k: train_lib._flat(layout.init_fn(k))).lower(layout.seed_key).as_text()
  assert "4096" not in hlo  # no constant of the global batch's shape in the init program


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)
