"""Trainer on the toy recipe: metrics, accumulation, NaN guard, evaluators, meshes, CLI."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from pathjax import sharding
from pathjax.metrics_log import read_metrics
from pathjax.recipes.base import make_recipe
from pathjax.train import (Evaluator, NonFiniteError, abstract_train_state, build_train_step,
                           create_train_state, train)
from pathjax.optim import make_optimizer, path_str
from train_helpers import ROOT, TOY, comparable, toy_config


def test_train_writes_metrics_tensorboard_and_progress(tmp_path, capsys):
  config = toy_config(total_steps=30, log_every=10, checkpoint_every=15)
  final = train(config, tmp_path)
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [10, 20, 30]
  for key in ("loss", "learning_rate", "grad_norm", "mse", "steps_per_sec", "examples_per_sec"):
    assert key in records[-1], key
  assert records[-1]["loss"] < records[0]["loss"]
  assert final["step"] == 30 and final["loss"] == records[-1]["loss"]
  out = capsys.readouterr().out
  assert "step 30/30" in out and "steps/s" in out and "ETA" in out
  assert os.listdir(tmp_path / "tb")
  assert json.load(open(tmp_path / "config.json"))["optimizer"]["lr"] == config.optimizer.lr
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [15, 30]


def _one_step(config, batch, steps=2):
  recipe = make_recipe(config)
  mesh = sharding.mesh_from_config(config)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  state, frozen, layout = create_train_state(config, recipe, mesh, tx)
  step = build_train_step(config, recipe, mesh, layout, tx, schedule)
  rules = sharding.rules_from_config(config)
  out = []
  for _ in range(steps):
    state, metrics = step(state, frozen, sharding.make_global_batch(batch, mesh, rules))
    out.append(jax.device_get(metrics))
  return jax.device_get(state.params), out


def test_gradient_accumulation_equals_big_batch():
  config = toy_config(batch_size=32)
  batch = next(make_recipe(config).train_iterator(0, 1))
  big_params, big = _one_step(config, batch)
  config_acc = toy_config("accum", batch_size=32)
  config_acc.unlock()
  config_acc.optimizer.accumulate_steps = 4
  acc_params, acc = _one_step(config_acc, batch)
  for a, b in zip(big, acc):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               big_params, acc_params)


def test_nan_guard_names_step_and_metrics(tmp_path):
  config = toy_config(total_steps=10, log_every=1)
  config.unlock()
  config.data.noise = float("nan")  # NaN targets: the loss is NaN from the first step
  with pytest.raises(NonFiniteError, match=r"step 1: .*loss=nan.*mse=nan"):
    train(config, tmp_path)
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


def test_fake_evaluator_is_called_and_logged(tmp_path):
  calls = []

  def evaluate(params, step):
    calls.append(step)
    assert set(params) == {"encoder", "norm", "proj", "head"}
    return {"accuracy": step / 100, "fake/loss": 1.0}

  config = toy_config(total_steps=6, log_every=4, checkpoint_every=100)
  train(config, tmp_path, evaluators=[Evaluator("fake", every=3, fn=evaluate)])
  assert calls == [3, 6]
  by_step = {r["step"]: r for r in read_metrics(tmp_path)}
  assert sorted(by_step) == [3, 4, 6]
  assert by_step[3]["fake/accuracy"] == 0.03 and "loss" in by_step[3]
  assert by_step[3]["fake/loss"] == 1.0  # keys that carry a "/" are kept as they are
  assert "fake/accuracy" not in by_step[4]


def test_config_evals_resolve_through_registry(tmp_path, monkeypatch):
  seen = []

  def make_evaluator(eval_config, recipe):
    seen.append((eval_config.kind, recipe.config.recipe))
    return lambda params, step: {"score": 1.0}

  module = types.ModuleType("pathjax.evaluate.registry")
  module.make_evaluator = make_evaluator
  monkeypatch.setitem(sys.modules, "pathjax.evaluate.registry", module)
  config = toy_config(total_steps=2, log_every=1, checkpoint_every=100)
  config.unlock()
  config.evals = [dict(kind="zero_shot", every=2, name="zs")]
  train(config, tmp_path)
  assert seen == [("zero_shot", "toy")]
  assert read_metrics(tmp_path)[-1]["zs/score"] == 1.0


def test_eight_device_fsdp_mesh_matches_one_device(tmp_path):
  assert jax.device_count() == 8
  config = toy_config(total_steps=8, log_every=1, checkpoint_every=100)
  config.unlock()
  config.mesh.shape = (1, 2, 4, 1)  # data 2 x fsdp 4: params sharded over "embed"
  train(config, tmp_path / "eight")
  config.mesh.shape = (1, 1, 1, 1)
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  eight, one = comparable(tmp_path / "eight"), comparable(tmp_path / "one")
  assert sorted(eight) == list(range(1, 9))
  for step in eight:
    for key in ("loss", "grad_norm", "mae"):
      np.testing.assert_allclose(eight[step][key], one[step][key], rtol=2e-5, err_msg=f"{step} {key}")


def test_abstract_state_lowers_the_step_without_allocating():
  config = toy_config()
  config.unlock()
  config.mesh.shape = (1, 2, 4, 1)
  recipe = make_recipe(config)
  mesh = sharding.mesh_from_config(config)
  layout = abstract_train_state(config, recipe, mesh)
  structs = layout.state
  kernel = structs.params["encoder"]["kernel"]
  assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.sharding.spec[0] == "fsdp"
  # Adam moments share the parameters' shardings.
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(structs.opt_state)
             if path_str(path).endswith("encoder/kernel")]
  assert len(moments) == 2  # Adam mu and nu
  assert all(m.sharding == kernel.sharding for m in moments)
  rules = sharding.rules_from_config(config)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, rules)),
      recipe.example_batch(config.batch_size))
  compiled = build_train_step(config, recipe, mesh, layout).lower(structs, layout.frozen, batch).compile()
  assert compiled.cost_analysis() is not None


def test_config_typo_is_a_clear_error_before_anything_runs(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "pathjax", "train", f"--config={TOY}", "--workdir", str(workdir),
       "--config.optimizer.lrr=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert "unknown config key 'optimizer.lrr'" in proc.stderr and "valid fields" in proc.stderr
  assert not workdir.exists()
