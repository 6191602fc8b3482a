"""Ahead-of-time compilation of a config's real train step for a TPU topology.

This machine needs no TPU: libtpu's compiler runs on the CPU (`pip install "libtpu==0.0.42.*"`,
the libtpu matching jax 0.10.2; the `tpu-aot` extra). The flow, as in maxtext's
`train_compile.py`:

    topology ("v5e:16x16", slices) -> TPU device descriptions -> mesh from config.mesh
    -> abstract TrainState (ShapeDtypeStructs carrying shardings) + abstract batch
    -> build_train_step(...).lower(state, batch).compile()
    -> memory_analysis() (per chip), cost_analysis() (FLOPs per chip), fits vs the chip's HBM

Nothing is allocated or run. `max_batch` searches the largest per-chip batch that compiles
within HBM (powers of two, then bisection), which is how a run is sized before paying for it.

Numbers are per chip: XLA compiles one SPMD program per device, and its memory and cost
analyses describe that program. v4 and v5p are compiled as megacore (one device per chip,
as deployed), so "per chip" and "per device" agree on every generation here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pathjax import sharding
from pathjax.models import layers

GiB = 1024 ** 3

# HBM per chip (GiB) and dense bf16 peak per chip (TFLOP/s), from Google Cloud's TPU pages.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
PEAK_BF16_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}

# Cloud names (cores for v4/v5p, chips for v5e/v6e) -> topology names libtpu understands.
ALIASES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4", "v4-256": "v4:4x4x8", "v4-512": "v4:4x8x8", "v4-1024": "v4:8x8x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8", "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}

_OOM_PATTERNS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory", "exceeds the memory")


class AOTError(RuntimeError):
  """libtpu missing, an unknown topology, or a config that cannot be lowered."""


# ----------------------------------------------------------------------------- topology


@dataclasses.dataclass
class Topology:
  name: str                  # libtpu topology name, e.g. "v5e:16x16"
  generation: str            # v4 | v5e | v5p | v6e
  num_slices: int
  devices: list              # one device description per chip (all slices)

  @property
  def num_chips(self) -> int:
    return len(self.devices)

  @property
  def hbm_bytes(self) -> int:
    return HBM_GIB[self.generation] * GiB

  @property
  def peak_flops(self) -> float:
    return PEAK_BF16_TFLOPS[self.generation] * 1e12

  def describe(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return (f"{self.name}{slices}: {self.num_chips} chips, {HBM_GIB[self.generation]} GiB HBM "
            f"and {PEAK_BF16_TFLOPS[self.generation]:g} bf16 TFLOP/s per chip")


def parse_topology(spec: str) -> tuple[str, str]:
  """"v5e:16x16" or "v5e-256" -> (generation, libtpu topology name)."""
  name = spec.strip().lower().replace("v5litepod", "v5e")
  name = ALIASES.get(name, name)
  match = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name)
  if not match:
    raise AOTError(f"unknown topology {spec!r}: use GENERATION:AxB[xC] (v5e:16x16, v4:4x4x4, "
                   f"v5p:4x4x8, v6e:8x8) or a Cloud name ({', '.join(sorted(ALIASES)[:6])}, ...)")
  gen = match.group(1)
  dims = match.group(2)
  expected = 3 if gen in ("v4", "v5p") else 2
  if dims.count("x") + 1 != expected:
    raise AOTError(f"topology {spec!r}: {gen} needs {expected} dimensions (e.g. "
                   f"{'v4:4x4x4' if expected == 3 else 'v5e:16x16'})")
  return gen, f"{gen}:{dims}"


def _ensure_libtpu() -> None:
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise AOTError('AOT compilation needs libtpu: pip install "libtpu==0.0.42.*" '
                   "(or `pip install -e '.[tpu-aot]'`, `make setup-tpu`)") from None
  # Several compiling processes on one machine would otherwise contend for libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_available() -> bool:
  try:
    _ensure_libtpu()
  except AOTError:
    return False
  return True


def get_topology(spec: str, num_slices: int = 1) -> Topology:
  """Device descriptions for a TPU topology (no TPU needed; libtpu must be installed)."""
  gen, name = parse_topology(spec)
  _ensure_libtpu()
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  chip_config = "megacore" if gen in ("v4", "v5p") else "default"
  host_bounds = (2, 2, 1)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        chip_config_name=chip_config,
                                        chips_per_host_bounds=host_bounds,
                                        num_slices=int(num_slices))
  except Exception as e:  # pylint: disable=broad-except
    raise AOTError(f"libtpu cannot describe topology {name!r} ({num_slices} slices): {e}") from e
  return Topology(name=name, generation=gen, num_slices=int(num_slices), devices=list(desc.devices))


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class CompileResult:
  topology: Topology
  global_batch: int
  per_chip_batch: float
  mesh: dict
  memory: dict               # bytes per chip: argument, output, alias, temp, code, total
  flops: float | None        # per chip per step, XLA cost analysis (loop bodies counted once!)
  compile_seconds: float
  largest: list[str]         # the largest arrays per chip with their shardings
  error: str | None = None   # compiler error (out of memory, or anything else)
  oom: bool = False
  model_flops: float | None = None  # whole step, all chips, from the jaxpr, without remat
  step_flops: float | None = None   # whole step, all chips, from the jaxpr, as traced (remat)
  attention: dict = dataclasses.field(default_factory=dict)  # "impl q_len x k_len" -> call sites

  @property
  def model_flops_per_chip(self) -> float | None:
    return self.model_flops / self.topology.num_chips if self.model_flops else None

  @property
  def total_bytes(self) -> int:
    return int(self.memory.get("total", 0))

  @property
  def fits(self) -> bool:
    return self.error is None and self.total_bytes <= self.topology.hbm_bytes

  def mfu_step_seconds(self, mfu: float = 0.5) -> float | None:
    """Step time at `mfu` model FLOPs utilisation (model FLOPs: no remat recompute)."""
    flops = self.model_flops_per_chip or self.flops
    if not flops:
      return None
    return flops / (mfu * self.topology.peak_flops)

  def table_row(self, mfu: float = 0.5) -> dict:
    step = self.mfu_step_seconds(mfu)
    return dict(topology=self.topology.name + (f"x{self.topology.num_slices}"
                                               if self.topology.num_slices > 1 else ""),
                chips=self.topology.num_chips, global_batch=self.global_batch,
                per_chip_batch=self.per_chip_batch,
                memory_gib=self.total_bytes / GiB if self.memory else None,
                hbm_gib=HBM_GIB[self.topology.generation],
                tflops_per_chip=(self.model_flops_per_chip / 1e12
                                 if self.model_flops_per_chip else None),
                xla_tflops_per_chip=self.flops / 1e12 if self.flops else None,
                step_s_at_mfu=step,
                bags_per_s_per_chip=(self.per_chip_batch / step) if step else None,
                fits=self.fits)


def memory_stats(compiled) -> dict:
  """Per-chip bytes from `compiled.memory_analysis()`; total = args + outputs - aliased + temps + code."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
             alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
             code=int(m.generated_code_size_in_bytes))
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return out


def flops_per_chip(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = cost.get("flops")
  return float(flops) if flops is not None else None


def largest_arrays(tree: Any, limit: int = 10, prefix: str = "") -> list[str]:
  """The `limit` largest arrays of a tree of ShapeDtypeStructs by bytes per chip."""
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shard = leaf.sharding
    shape = tuple(leaf.shape)
    local = shard.shard_shape(shape) if shard is not None else shape
    nbytes = math.prod(local) * np.dtype(leaf.dtype).itemsize
    spec = tuple(shard.spec) if isinstance(shard, NamedSharding) else None
    rows.append((nbytes, f"{prefix}{jax.tree_util.keystr(path)} {shape} {np.dtype(leaf.dtype).name} "
                         f"spec={spec} per-chip={_fmt_bytes(nbytes)}"))
  rows.sort(key=lambda r: -r[0])
  return [text for _, text in rows[:limit]]


def _fmt_bytes(n: float) -> str:
  if n >= GiB:
    return f"{n / GiB:.2f} GiB"
  if n >= 1024 ** 2:
    return f"{n / 1024 ** 2:.1f} MiB"
  return f"{n / 1024:.1f} KiB"


def _is_oom(message: str) -> bool:
  return any(p.lower() in message.lower() for p in _OOM_PATTERNS)


# ----------------------------------------------------------------------------- FLOPs


def jaxpr_flops(fn: Callable, *args) -> float:
  """Matmul and convolution FLOPs of `fn(*args)` for the whole (global) program.

  XLA's cost analysis counts the body of a loop once, so a step that scans over 24 layers
  is undercounted about 24-fold; this walks the jaxpr instead, multiplying scan bodies by
  their length and shard_map bodies by the number of shards. Elementwise work is left out
  (a few percent for transformers). Rematerialised forward passes are counted as traced.
  """
  closed = jax.make_jaxpr(fn)(*args)
  return _count(closed.jaxpr)


def _count(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
      continue
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
      kernel = math.prod(rhs[d] for d in spec[2:]) * rhs[spec[1]]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * kernel
      continue
    mult = 1.0
    if name == "scan":
      mult = float(eqn.params["length"])
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      mult = float(math.prod(mesh.shape.values()))
    subs = []
    for value in eqn.params.values():
      for item in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
          subs.append(_count(inner))
    if name == "cond":
      total += max(subs, default=0.0)
    else:
      total += mult * sum(subs)
  return total


# ----------------------------------------------------------------------------- compile


def abstract_batch(recipe, mesh, rules, global_batch: int) -> dict:
  """ShapeDtypeStructs of a global batch (leading dim over the batch axes); allocates nothing."""
  batch_sharding = sharding.batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                      recipe.example_batch(global_batch))


def compile_train_step(config, topology: Topology, *, recipe=None, count_flops: bool = True,
                       log: Callable[[str], None] | None = None) -> CompileResult:
  """Lowers and compiles the config's real train step for `topology`; never runs it.

  An out-of-memory (or any other) compiler error is returned in `.error`, not raised; a
  config that cannot be set up (mesh, divisibility, batch) raises.
  """
  from pathjax import train  # pylint: disable=import-outside-toplevel
  from pathjax.recipes.base import make_recipe  # pylint: disable=import-outside-toplevel
  log = log or (lambda s: None)
  mesh = sharding.mesh_from_config(config, topology.devices)
  recipe = make_recipe(config, mesh=mesh) if recipe is None else recipe
  rules = sharding.rules_from_config(config)
  train.check_batch(config, mesh)
  global_batch = int(config.batch_size)
  layout = train.abstract_train_state(config, recipe, mesh)
  state, frozen = layout.state, layout.frozen
  batch = abstract_batch(recipe, mesh, rules, global_batch)
  step = train.build_train_step(config, recipe, mesh, layout)
  largest = (largest_arrays(state, 6, "state") + largest_arrays(frozen, 4, "frozen")
             + largest_arrays(batch, 4, "batch"))
  largest = sorted(largest, key=_per_chip_key, reverse=True)[:8]
  start = time.time()
  log(f"lowering the train step (global batch {global_batch}, mesh {dict(mesh.shape)})")
  # The step enters sharding.mesh_context while tracing, so activation constraints apply.
  # Trace for the TPU: attention "auto" picks the TPU kernel, not the CPU host's einsum.
  with layers.target_platform("tpu"), layers.record_attention_picks() as picks:
    lowered = step.lower(state, frozen, batch)
  attention = {f"{impl} {q}x{k}": n for (impl, q, k), n in sorted(picks.items())}
  log(f"lowered in {time.time() - start:.0f} s; compiling for {topology.name}")
  error, memory, flops = None, {}, None
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError and friends
    error = str(e)
  else:
    memory, flops = memory_stats(compiled), flops_per_chip(compiled)
  seconds = time.time() - start
  model_flops = step_flops = None
  if count_flops:
    with layers.target_platform("tpu"):
      step_flops = jaxpr_flops(step, state, frozen, batch)
    model_flops = step_flops
    if "model" in config and config.model.get("remat", "none") != "none":
      plain = config.copy_and_resolve_references()
      with plain.unlocked():
        plain.model.remat = "none"
      from pathjax.recipes.base import make_recipe as _make  # pylint: disable=import-outside-toplevel
      with layers.target_platform("tpu"):
        model_flops = jaxpr_flops(train.build_train_step(plain, _make(plain, mesh=mesh), mesh,
                                                         layout), state, frozen, batch)
  return CompileResult(topology=topology, global_batch=global_batch,
                       per_chip_batch=global_batch / topology.num_chips,
                       mesh=dict(mesh.shape), memory=memory, flops=flops,
                       compile_seconds=seconds, largest=largest,
                       error=error, oom=bool(error) and _is_oom(error or ""),
                       model_flops=model_flops, step_flops=step_flops, attention=attention)


_UNITS = {"KiB": 1024, "MiB": 1024 ** 2, "GiB": GiB}


def _per_chip_key(line: str) -> float:
  m = re.search(r"per-chip=([\d.]+) (KiB|MiB|GiB)", line)
  return float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0


def with_batch(config, global_batch: int):
  """A copy of `config` with `batch_size` (the global batch) set."""
  new = config.copy_and_resolve_references()
  with new.unlocked():
    new.batch_size = int(global_batch)
  return new


def max_batch(config, topology: Topology, *, start: int = 1, limit: int = 4096,
              recipe=None, log: Callable[[str], None] | None = None):
  """Largest integer per-chip batch whose train step compiles within the chip's HBM.

  Doubles the per-chip batch from `start` until a compile does not fit (or `limit`), then
  bisects between the last fit and the first failure. Returns (best CompileResult or None,
  [every CompileResult tried]).
  """
  log = log or (lambda s: None)
  chips = topology.num_chips
  tried: dict[int, CompileResult] = {}

  def attempt(per_chip: int) -> CompileResult:
    if per_chip not in tried:
      result = compile_train_step(with_batch(config, per_chip * chips), topology, recipe=recipe)
      tried[per_chip] = result
      state = "fits" if result.fits else ("out of memory" if result.oom or result.memory
                                          else "error")
      log(f"per-chip batch {per_chip}: {state}"
          + (f", {result.total_bytes / GiB:.2f} GiB" if result.memory else "")
          + f" ({result.compile_seconds:.0f} s)")
      if result.error and not result.oom:
        raise AOTError(f"compile failed at per-chip batch {per_chip}: {result.error[:2000]}")
    return tried[per_chip]

  lo, hi = 0, None
  b = max(int(start), 1)
  while b <= limit:
    if attempt(b).fits:
      lo = b
      b *= 2
    else:
      hi = b
      break
  if hi is None:
    hi = limit + 1
  while hi - lo > 1:
    mid = _interpolate(lo, tried.get(lo), hi, tried.get(hi), topology.hbm_bytes)
    if attempt(mid).fits:
      lo = mid
    else:
      hi = mid
  results = [tried[k] for k in sorted(tried)]
  return (tried.get(lo) if lo else None), results


_SIZE = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")


def _needed_bytes(result: CompileResult | None) -> float | None:
  """Per-chip bytes a compile needed: its total, or for an OOM the temporaries it reports."""
  if result is None:
    return None
  if result.memory:
    return float(result.total_bytes)
  match = _SIZE.search(result.error or "")
  if match:
    return float(match.group(1)) * 1024 ** " KMGT".index(match.group(2))
  return None


def _interpolate(lo: int, lo_result, hi: int, hi_result, hbm: int) -> int:
  """Next per-chip batch in (lo, hi): where memory, linear in the batch, reaches HBM.

  Falls back to the midpoint when a memory figure is missing (a bisection step).
  """
  mid = (lo + hi) // 2
  m_lo, m_hi = _needed_bytes(lo_result), _needed_bytes(hi_result)
  if lo == 0 or m_lo is None or m_hi is None or m_hi <= m_lo:
    return mid
  guess = int(lo + (hi - lo) * (hbm - m_lo) / (m_hi - m_lo))
  return min(max(guess, lo + 1), hi - 1)


# ----------------------------------------------------------------------------- contrastive loss


def compile_contrastive_loss(topology: Topology, global_pairs: int, *, embed_dim: int = 512,
                             chunked: bool = True, mesh_shape: Sequence[int] = (1, -1, 1, 1),
                             rules=sharding.FSDP_TENSOR_RULES, dtype=jax.numpy.float32) -> CompileResult:
  """Compiles value_and_grad of the sigmoid image-text loss over `global_pairs` pairs.

  `chunked=True` is pathjax.losses.chunked_sigmoid_contrastive (a ppermute ring over the
  batch axes: per-chip memory O(b*D + b^2) for b pairs per chip); `chunked=False` the plain
  loss on the gathered [B, B] logits, for comparison.
  """
  from pathjax import losses  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(sharding.DEFAULT_MESH_AXES, mesh_shape, topology.devices)
  axes = sharding.batch_axes(mesh, rules)
  row = NamedSharding(mesh, P(axes, None))
  rep = NamedSharding(mesh, P())

  def loss(img, txt, scale, bias):
    if chunked:
      return losses.chunked_sigmoid_contrastive(img, txt, scale, bias, mesh=mesh, batch_axes=axes)
    return losses.sigmoid_contrastive(img, txt, scale, bias)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
               in_shardings=(row, row, rep, rep), out_shardings=(rep, (row, row, rep, rep)))
  args = (jax.ShapeDtypeStruct((global_pairs, embed_dim), dtype, sharding=row),
          jax.ShapeDtypeStruct((global_pairs, embed_dim), dtype, sharding=row),
          jax.ShapeDtypeStruct((), jax.numpy.float32, sharding=rep),
          jax.ShapeDtypeStruct((), jax.numpy.float32, sharding=rep))
  start = time.time()
  error, memory, flops = None, {}, None
  try:
    compiled = fn.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    error = str(e)
  else:
    memory, flops = memory_stats(compiled), flops_per_chip(compiled)
  seconds = time.time() - start
  model_flops = jaxpr_flops(fn, *args)
  return CompileResult(topology=topology, global_batch=global_pairs,
                       per_chip_batch=global_pairs / topology.num_chips, mesh=dict(mesh.shape),
                       memory=memory, flops=flops, compile_seconds=seconds,
                       largest=largest_arrays(dict(img=args[0], txt=args[1]), 2),
                       error=error, oom=bool(error) and _is_oom(error or ""),
                       model_flops=model_flops, step_flops=model_flops)


# ----------------------------------------------------------------------------- printing


def format_result(result: CompileResult, *, mfu: float = 0.5) -> str:
  topo = result.topology
  lines = [f"topology      {topo.describe()}",
           f"mesh          {result.mesh}",
           f"global batch  {result.global_batch} ({result.per_chip_batch:g} per chip)",
           f"compile time  {result.compile_seconds:.0f} s"]
  if result.attention:  # splash needs query and key lengths in multiples of 128, else xla
    lines.append("attention     " + ", ".join(f"{k} ({n} traced call site{'s' * (n > 1)})"
                                              for k, n in result.attention.items())
                 + " (implementation, query x key length)")
  if result.memory:
    m = result.memory
    lines += ["memory per chip (XLA memory_analysis):",
              f"  arguments    {_fmt_bytes(m['argument'])}",
              f"  outputs      {_fmt_bytes(m['output'])}",
              f"  aliased      {_fmt_bytes(m['alias'])} (donated state reused for outputs)",
              f"  temporaries  {_fmt_bytes(m['temp'])}",
              f"  code         {_fmt_bytes(m['code'])}",
              f"  total        {_fmt_bytes(m['total'])} of {HBM_GIB[topo.generation]} GiB HBM "
              f"({100 * m['total'] / topo.hbm_bytes:.0f}%)"]
  if result.model_flops:
    lines.append(f"FLOPs/step    {result.model_flops_per_chip / 1e12:.4g} TFLOP per chip, "
                 f"{result.model_flops / 1e15:.4g} PFLOP in all (model FLOPs: matmuls and "
                 f"convolutions of the traced step, no remat)")
  if result.step_flops and result.step_flops != result.model_flops:
    lines.append(f"              {result.step_flops / topo.num_chips / 1e12:.4g} TFLOP per chip "
                 f"with the remat recompute")
  if result.flops:
    lines.append(f"              {result.flops / 1e12:.4g} TFLOP per chip by XLA cost_analysis "
                 f"(counts a scanned layer once: a lower bound)")
  step = result.mfu_step_seconds(mfu)
  if step:
    lines.append(f"at {100 * mfu:.0f}% MFU    {step * 1e3:.1f} ms/step, "
                 f"{result.per_chip_batch / step:.1f} examples/s per chip, "
                 f"{result.global_batch / step:.0f} examples/s in all "
                 f"(peak {PEAK_BF16_TFLOPS[topo.generation]:g} TFLOP/s bf16)")
  if result.largest:
    lines.append("largest arrays per chip:")
    lines += [f"  {line}" for line in result.largest]
  if result.error:
    lines.append(("OUT OF MEMORY: " if result.oom else "COMPILE ERROR: ") + _short(result.error))
  elif result.memory:
    lines.append("FITS" if result.fits else
                 f"DOES NOT FIT: {_fmt_bytes(result.total_bytes)} > {HBM_GIB[topo.generation]} GiB")
  return "\n".join(lines)


def _short(message: str, limit: int = 1500) -> str:
  message = message.strip()
  return message if len(message) <= limit else message[:limit] + " ..."


def format_table(results: Sequence[CompileResult], mfu: float = 0.5) -> str:
  return format_rows([r.table_row(mfu) for r in results], mfu)


def format_rows(rows: Sequence[Mapping[str, Any]], mfu: float = 0.5) -> str:
  """The markdown table of `CompileResult.table_row`s (or the rows `pathjax compile --json`
  saved), as README prints it."""
  head = ("| topology | chips | global batch | per-chip batch | memory/chip (GiB) | TFLOP/step/chip "
          f"| step at {100 * mfu:.0f}% MFU (ms) | examples/s/chip | fits |")
  lines = [head, "|" + "---|" * 9]
  for row in rows:
    fmt = lambda v, f: (f.format(v) if v is not None else "-")
    lines.append(f"| {row['topology']} | {row['chips']} | {row['global_batch']} | "
                 f"{row['per_chip_batch']:g} | {fmt(row['memory_gib'], '{:.2f}')} / {row['hbm_gib']} | "
                 f"{fmt(row['tflops_per_chip'], '{:.4g}')} | "
                 f"{fmt(row['step_s_at_mfu'] and row['step_s_at_mfu'] * 1e3, '{:.0f}')} | "
                 f"{fmt(row['bags_per_s_per_chip'], '{:.1f}')} | {'yes' if row['fits'] else 'no'} |")
  return "\n".join(lines)
