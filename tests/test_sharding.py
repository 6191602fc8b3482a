"""Sharding core on 8 fake CPU devices (tests/conftest.py sets them before jax starts).

The golden files tests/golden/vit_shardings_{dp,fsdp,fsdp_tensor}.txt record every ViT
parameter's partition spec under three rule sets, so a layout change shows up in review.
Regenerate them with PATHJAX_UPDATE_GOLDENS=1 pytest tests/test_sharding.py.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pathjax import sharding
from pathjax.models.vit import ViT

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
MESH_AXES = ("slice", "data", "fsdp", "tensor")


def _param_rules(mapping):
  """FSDP_TENSOR_RULES with parameter (non-"act_") rules replaced by `mapping` (else None)."""
  out = []
  for name, axes in sharding.FSDP_TENSOR_RULES:
    if name.startswith("act_"):
      out.append((name, axes))
    else:
      out.append((name, mapping.get(name)))
  return tuple(out)


RULE_SETS = {
    "dp": _param_rules({}),
    "fsdp": _param_rules({"embed": "fsdp"}),
    "fsdp_tensor": sharding.FSDP_TENSOR_RULES,
}


def _need_8():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def _init_fn(model, image_size):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return lambda rng: model.init(rng, images)


# ------------------------------------------------------------------------------- meshes


def test_resolve_mesh_shape_fills_minus_one():
  assert sharding.resolve_mesh_shape((1, -1, 2, 1), 8) == (1, 4, 2, 1)
  assert sharding.resolve_mesh_shape((-1,), 8) == (8,)
  assert sharding.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize("shape, match", [
    ((-1, -1), "more than one -1"),
    ((3, -1), "not divisible"),
    ((2, 2), "needs 4 devices, have 8"),
])
def test_bad_mesh_shapes(shape, match):
  with pytest.raises(sharding.ShardingError, match=match):
    sharding.resolve_mesh_shape(shape, 8)


def test_make_mesh():
  _need_8()
  mesh = sharding.make_mesh(MESH_AXES, (1, -1, 2, 2))
  assert dict(mesh.shape) == {"slice": 1, "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(sharding.ShardingError, match="differ in length"):
    sharding.make_mesh(MESH_AXES, (2, 4))


# --------------------------------------------------------------------------- sharded init


def test_sharded_init_places_params_per_rules():
  _need_8()
  mesh = sharding.make_mesh(MESH_AXES, (1, 2, 2, 2))
  model = ViT(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=16, image_size=32)
  variables, shardings = sharding.sharded_init(_init_fn(model, 32), mesh,
                                               sharding.FSDP_TENSOR_RULES, jax.random.PRNGKey(0))
  params = variables["params"]
  fc1 = params["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]      # [layers, embed, mlp]
  assert fc1.shape == (2, 64, 128)
  assert fc1.sharding.spec == P(None, "fsdp", "tensor")
  assert fc1.addressable_shards[0].data.shape == (2, 32, 64)
  q = params["encoder"]["blocks"]["attn"]["query"]["kernel"]     # [layers, embed, heads, kv]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  out = params["encoder"]["blocks"]["attn"]["out"]["kernel"]     # [layers, heads, kv, embed]
  assert out.sharding.spec == P(None, "tensor", None, "fsdp")
  norm = params["norm"]["scale"]
  assert norm.sharding.spec == P(None) or norm.sharding.spec == P()
  assert norm.sharding.is_fully_replicated
  # The returned shardings are what the arrays carry.
  assert shardings["params"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].spec == fc1.sharding.spec


def test_indivisible_dimension_names_the_parameter():
  _need_8()
  mesh = sharding.make_mesh(MESH_AXES, (1, 2, 1, 4))
  model = ViT(width=64, depth=1, num_heads=2, mlp_dim=128, patch_size=16, image_size=32)
  with pytest.raises(sharding.ShardingError, match=r"\[.attn.\].*shape \(1, 2, 32\).*not divisible by mesh axes tensor of size 4"):
    sharding.sharded_init(_init_fn(model, 32), mesh, sharding.FSDP_TENSOR_RULES,
                          jax.random.PRNGKey(0))


def test_make_global_batch_assembles_global_arrays():
  _need_8()
  mesh = sharding.make_mesh(MESH_AXES, (1, 4, 2, 1))
  local = {"images": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "ids": np.arange(16, dtype=np.int32)}
  batch = sharding.make_global_batch(local, mesh, sharding.FSDP_TENSOR_RULES)
  assert batch["images"].shape == (16 * jax.process_count(), 3)
  assert batch["images"].sharding.spec == P(("slice", "data", "fsdp"))
  assert sharding.num_batch_shards(mesh, sharding.FSDP_TENSOR_RULES) == 8
  # Each device holds 2 consecutive rows; together they are the local data.
  assert {s.data.shape for s in batch["ids"].addressable_shards} == {(2,)}
  np.testing.assert_array_equal(np.asarray(batch["images"]), local["images"])
  np.testing.assert_array_equal(np.asarray(batch["ids"]), local["ids"])


@pytest.mark.parametrize("rules_name", sorted(RULE_SETS))
def test_sharded_forward_equals_unsharded(rules_name):
  _need_8()
  rules = RULE_SETS[rules_name]
  mesh = sharding.make_mesh(MESH_AXES, (1, 2, 2, 2))
  model = ViT(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32,
              layer_scale_init=0.5, reg_tokens=2)
  variables, _ = sharding.sharded_init(_init_fn(model, 32), mesh, rules, jax.random.PRNGKey(1))
  images = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
  plain = jax.tree.map(np.asarray, variables)
  expected = model.apply(plain, images)["pooled"]
  batch = sharding.make_global_batch(images, mesh, rules)
  with sharding.mesh_context(mesh, rules):
    got = jax.jit(lambda v, x: model.apply(v, x)["pooled"])(variables, batch)
  assert got.sharding.spec[0] is not None or rules_name == "dp"
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- goldens


def _describe(rules):
  mesh = sharding.make_mesh(MESH_AXES, (1, 2, 2, 2))
  # B/16-shaped, depth 2, with registers and layer scale so every parameter kind appears.
  model = ViT.from_variant("B/16", depth=2, reg_tokens=4, layer_scale_init=1e-5)
  structs, shardings = sharding.abstract_with_shardings(_init_fn(model, 224), mesh, rules,
                                                        jax.random.PRNGKey(0))
  return "\n".join(sharding.describe_shardings(structs, shardings)) + "\n"


@pytest.mark.parametrize("name", sorted(RULE_SETS))
def test_vit_shardings_golden(name):
  _need_8()
  text = _describe(RULE_SETS[name])
  path = GOLDEN_DIR / f"vit_shardings_{name}.txt"
  if os.environ.get("PATHJAX_UPDATE_GOLDENS") == "1":
    GOLDEN_DIR.mkdir(exist_ok=True)
    path.write_text(text)
  if not path.exists():
    pytest.fail(f"{path} is missing; create it with PATHJAX_UPDATE_GOLDENS=1 pytest {__file__}")
  assert text == path.read_text(), (
      f"ViT parameter shardings under the {name} rules changed; if intended, regenerate with "
      f"PATHJAX_UPDATE_GOLDENS=1 pytest tests/test_sharding.py and review the diff")
