"""`pathjax bench train --config=configs/RECIPE.py:VARIANT`: the jitted train step's speed.

Prints steps/s, examples/s, images/s, achieved FLOP/s (XLA's cost analysis of the compiled
step) and its ratio to the matmul peak measured in the same run (the MFU where that peak is
the chip's). The step runs on synthetic batches of the real shapes, so the figure is the
model's; `pathjax bench input` measures the input pipeline that must keep up with it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pathjax import config_lib, sharding
from pathjax.bench import common

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def register(parser):
  parser.add_argument("--config", required=True, help="configs/NAME.py:VARIANT")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
  parser.add_argument("--seed", type=int, default=0)


def _random_batch(shapes: dict, seed: int) -> dict:
  """Data for a batch of these ShapeDtypeStructs: random pixels and token ids, every mask
  on, no parents or labels (-1), identity colour transforms; the cost of a real step."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, x in shapes.items():
    if x.dtype == np.uint8:
      out[key] = rng.integers(0, 256, x.shape, dtype=np.uint8)
    elif x.dtype.kind == "i" and key.endswith("_ids"):
      out[key] = rng.integers(1, 100, x.shape).astype(x.dtype)
    elif x.dtype == bool:
      out[key] = np.ones(x.shape, bool)
    elif key in ("parent", "labels"):
      out[key] = np.full(x.shape, -1, x.dtype)
    elif key == "color_transform":
      out[key] = np.broadcast_to(np.eye(3, 4, dtype=x.dtype), x.shape).copy()
    else:
      out[key] = np.zeros(x.shape, x.dtype)
  return out


def measure(config, steps: int = 5, seed: int = 0) -> dict:
  from pathjax import train as train_lib
  from pathjax.optim import make_optimizer
  from pathjax.recipes.base import make_recipe

  mesh = sharding.mesh_from_config(config)
  recipe = make_recipe(config, mesh=mesh)
  rules = sharding.rules_from_config(config)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  state, frozen, layout = train_lib.create_train_state(config, recipe, mesh, tx)
  step = train_lib.build_train_step(config, recipe, mesh, layout, tx, schedule)
  batch = sharding.make_global_batch(_random_batch(recipe.example_batch(config.batch_size), seed),
                                     mesh, rules)
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = _step_flops(config, mesh, frozen, batch)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], frozen, batch)
    return metrics["loss"]

  seconds = common.time_calls(one_step, warmup=2, min_seconds=0, min_calls=steps)
  images = batch["images"].shape[0] * int(np.prod(batch["images"].shape[1:-3])) \
      if "images" in batch else 0
  return dict(seconds_per_step=seconds, compile_seconds=compile_s, flops_per_step=flops,
              examples_per_step=config.batch_size, images_per_step=images)


def _step_flops(config, mesh, frozen, batch) -> float | None:
  """FLOPs of one step, counted on an unscanned build (XLA counts a scan body once)."""
  from pathjax import train as train_lib
  from pathjax.optim import make_optimizer
  from pathjax.recipes.base import make_recipe

  config = common.unscanned_config(config)
  recipe = make_recipe(config, mesh=mesh)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  layout = train_lib.abstract_train_state(config, recipe, mesh, tx)
  step = train_lib.build_train_step(config, recipe, mesh, layout, tx, schedule)
  return common.compiled_flops(step.lower(layout.state, frozen, batch).compile())


def main(args) -> int:
  from pathjax import distributed
  distributed.initialize()
  config = config_lib.load_config(args.config, args.config_overrides)
  dtype = DTYPES[config.precision.compute_dtype]
  print(f"pathjax bench train: {args.config}; {common.machine_line()}")
  r = measure(config, args.steps, args.seed)  # first: a config the recipe rejects fails fast
  peak = common.matmul_peak_flops(dtype)
  print(f"matmul peak ({jnp.dtype(dtype).name}, measured now): {peak / 1e9:,.1f} GFLOP/s per device")
  sps = 1.0 / r["seconds_per_step"]
  print(f"compile {r['compile_seconds']:.1f} s; global batch {r['examples_per_step']} examples "
        f"({r['images_per_step']} images)")
  print(f"steps/s {sps:.3f} | examples/s {r['examples_per_step'] * sps:,.1f} | "
        f"images/s {r['images_per_step'] * sps:,.1f}")
  if r["flops_per_step"]:
    achieved = r["flops_per_step"] * sps / jax.device_count()
    print(f"FLOPs per step {r['flops_per_step']:.3e} (XLA cost analysis) | achieved "
          f"{achieved / 1e9:,.1f} GFLOP/s per device | {100 * achieved / peak:.1f}% of the "
          f"measured matmul peak")
  else:
    print("FLOPs per step unavailable from this backend's cost analysis")
  return 0
