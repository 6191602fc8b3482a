"""Device mesh, logical axis rules, sharded initialisation and global batches.

Modules name their parameter and activation axes logically ("embed", "mlp", "heads",
"act_batch", ...). The config maps those names to mesh axes, so data parallel, FSDP and
tensor parallel are a config change. No module knows the mesh.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axis order: slowest-varying (across slices, over DCN) to fastest (within a chip group).
DEFAULT_MESH_AXES = ("slice", "data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters: "embed" is the FSDP axis, "mlp"/"heads"/"vocab" the
# tensor-parallel ones. Activations ("act_*"): the batch is split over every data-like axis.
FSDP_TENSOR_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("slice", "data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("channels", None),
    ("pos", None),
    ("classes", None),
    # KV cache of decoding (layers.Attention): batch as the activations, heads as tensor.
    ("cache_batch", ("slice", "data", "fsdp")),
    ("cache_heads", "tensor"),
    ("cache_len", None),
    ("cache_kv", None),
)


class ShardingError(ValueError):
  """A mesh or rule set that does not fit the devices or the arrays."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the single -1 entry of `shape` so the product equals `num_devices`."""
  shape = tuple(int(s) for s in shape)
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1:
    raise ShardingError(f"mesh shape {shape} has more than one -1")
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ShardingError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ShardingError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape


def make_mesh(axes: Sequence[str] = DEFAULT_MESH_AXES,
              shape: Sequence[int] = (1, -1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all). A leading "slice" axis > 1 spans slices."""
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(axes)
  if len(axes) != len(shape):
    raise ShardingError(f"mesh axes {axes} and shape {tuple(shape)} differ in length")
  shape = resolve_mesh_shape(shape, len(devices))
  num_slices = shape[axes.index("slice")] if "slice" in axes else 1
  has_slices = num_slices > 1 and hasattr(devices[0], "slice_index")
  if has_slices:
    # Multi-slice TPU: the slice axis goes over DCN, everything else within a slice (ICI).
    dcn = tuple(s if a == "slice" else 1 for a, s in zip(axes, shape))
    ici = tuple(1 if a == "slice" else s for a, s in zip(axes, shape))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)
  # Auto axis types: with_sharding_constraint needs them (jax.make_mesh defaults to explicit).
  return Mesh(grid, axes)


def mesh_from_config(config, devices=None) -> Mesh:
  """Mesh from `config.mesh.axes` and `config.mesh.shape`."""
  return make_mesh(config.mesh.axes, config.mesh.shape, devices)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """Logical axis rules from `config.axis_rules` (a sequence of (logical, mesh axes))."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.axis_rules)


def rules_for_mesh(rules, mesh: Mesh):
  """Removes mesh axes the mesh lacks, so one rule set serves meshes of any rank."""
  out = []
  for name, axes in rules:
    if axes is None:
      out.append((name, None))
      continue
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
    out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
  return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """Where modules' logical constraints take effect: the abstract mesh and the rules.

  flax applies `nn.with_logical_constraint` only under an abstract mesh
  (`use_abstract_mesh`, which unlike `jax.set_mesh` may be entered inside `jax.jit`);
  without it every activation constraint is silently skipped. Enter it inside traced
  functions (train step, init) so lowering needs no outer context.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      nn.logical_axis_rules(rules_for_mesh(rules, mesh)):
    yield


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (boxed) abstract tree; unboxed leaves are replicated."""
  rules = rules_for_mesh(rules, mesh)
  logical_specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
  """Raises naming the array whose dimension does not divide over its mesh axes."""
  def check(path, leaf, sharding):
    shape = getattr(leaf, "shape", ())
    for dim, axes in zip(shape, sharding.spec):
      if axes is None:
        continue
      size = math.prod(sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if dim % size:
        raise ShardingError(
            f"{jax.tree_util.keystr(path)} shape {shape}: dimension {dim} is not divisible by "
            f"mesh axes {axes} of size {size}; change config.axis_rules or config.mesh")
  jax.tree_util.tree_map_with_path(check, nn.unbox(abstract_tree), shardings)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
  """Builds the output of `init_fn(*args)` already sharded; returns (unboxed tree, shardings).

  eval_shape -> logical partition specs -> named shardings -> jit(init, out_shardings), so no
  array is ever materialised on one device first.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  check_divisible(abstract, shardings)
  def init(*a):
    with mesh_context(mesh, rules):
      return nn.unbox(init_fn(*a))

  tree = jax.jit(init, out_shardings=shardings)(*args)
  return tree, shardings


def abstract_with_shardings(init_fn: Callable[..., Any], mesh: Mesh, rules, *args):
  """ShapeDtypeStructs carrying shardings, for AOT lowering without allocating anything."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  check_divisible(abstract, shardings)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         nn.unbox(abstract), shardings)
  return structs, shardings


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...] | str | None:
  """The mesh axes the batch dimension is split over (the "act_batch" rule)."""
  for name, axes in rules_for_mesh(rules, mesh):
    if name == "act_batch":
      return axes
  return None


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a batch array: leading dimension over the data axes, rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh, rules)))


def num_batch_shards(mesh: Mesh, rules) -> int:
  axes = batch_axes(mesh, rules)
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def make_global_batch(local_batch: Any, mesh: Mesh, rules) -> Any:
  """Assembles global jax.Arrays from this process's slice of the batch.

  Each process passes `global_batch / process_count` examples; the result is one array per
  leaf whose leading dimension is the global batch, split over the data axes.
  """
  sharding = batch_sharding(mesh, rules)

  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(to_global, local_batch)


def describe_shardings(tree: Any, shardings: Any) -> list[str]:
  """One line per array: path, shape, dtype and partition spec (for goldens and plans)."""
  lines = []
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
  specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  for (path, leaf), sharding in zip(leaves, specs):
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else sharding
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {leaf.dtype} {spec}")
  return lines
