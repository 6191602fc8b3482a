"""A sharding plan cannot rot silently: the compiled MR-PLIP step keeps every batch-sized
activation split over the devices.

The v5e-256 plan once stopped fitting because the images were all-gathered through the
on-device augmentation (a bf16[16384, 224, 224, 3] tensor on every chip). This compiles a
small MR-PLIP step on 8 fake CPU devices with on-device augmentation on, under a data
parallel and an FSDP mesh, and reads the optimised HLO: no all-gather may produce a tensor
that has the global batch (bags, or bags x patches) as a dimension and more than a feature
vector per example (what contrastive candidates and ITM negatives legitimately gather),
and the images must enter the program split over the batch.
"""

import math
import re
import sys

import jax
import pytest

from pathjax import aot, config_lib, sharding, train
from pathjax.recipes.base import make_recipe
from mrplip_helpers import TINY

BAGS = 40        # distinct from every model dimension (patch 16, widths 24-64)
WIDTH = 32        # every tower's width in TINY; also the largest feature vector per example
_SHAPE = re.compile(r"= \(?([a-z0-9]+)\[([0-9,]*)\]")


def _gathers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  out = []
  for line in hlo.splitlines():
    if " all-gather(" in line or " all-gather-start(" in line:
      m = _SHAPE.search(line)
      if m:
        out.append((line.strip()[:160], tuple(int(d) for d in m.group(2).split(",") if d)))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", ["(1,8,1,1)", "(1,2,4,1)"])
def test_no_batch_sized_activation_is_gathered(mesh_shape):
  assert jax.device_count() == 8
  config = config_lib.load_config("configs/mrplip.py:smoke", TINY + [
      f"batch_size={BAGS}", f"mesh.shape={mesh_shape}", "model.embed_dim=24",
      "model.remat=dots_no_batch"])
  assert config.input.augment.on_device and config.input.augment.enabled
  mesh = sharding.mesh_from_config(config)
  recipe = make_recipe(config, mesh=mesh)
  rules = sharding.rules_from_config(config)
  layout = train.abstract_train_state(config, recipe, mesh)
  batch = aot.abstract_batch(recipe, mesh, rules, BAGS)
  assert "color_transform" in batch
  patches = batch["images"].shape[1]
  compiled = train.build_train_step(config, recipe, mesh, layout).lower(
      layout.state, layout.frozen, batch).compile()
  images_sharding = compiled.input_shardings[0][2]["images"]
  assert images_sharding.shard_shape(batch["images"].shape)[0] == BAGS // math.prod(
      mesh.shape[a] for a in ("data", "fsdp"))
  batch_sizes = {BAGS, BAGS * patches}
  offenders = [(line, shape) for line, shape in _gathers(compiled.as_text())
               if any(d in batch_sizes for d in shape)
               and math.prod(shape) // max(d for d in shape if d in batch_sizes) > WIDTH]
  assert not offenders, "batch-sized activations all-gathered:\n" + "\n".join(
      line for line, _ in offenders)


def test_the_check_catches_gathered_images():
  """The detector itself: an explicitly replicated image batch shows up as a gather."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh(("data",), (8,))
  images = jax.ShapeDtypeStruct((BAGS * 4, 16, 16, 3), jax.numpy.float32,
                                sharding=NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda x: x[::-1] * 2.0, out_shardings=NamedSharding(mesh, P()))
  shapes = [shape for _, shape in _gathers(fn.lower(images).compile().as_text())]
  assert (BAGS * 4, 16, 16, 3) in shapes, shapes
