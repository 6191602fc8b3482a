"""LoRA adapters on linen Dense / DenseGeneral kernels chosen by regex over parameter paths.

Adapters are added by a flax method interceptor, so any module (an LLM under `nn.scan`
and `nn.remat` included) gets them without a code change: while `adapters(config)` is
active, every `nn.Dense` / `nn.DenseGeneral` whose kernel path ("layers/attn/query/kernel")
fully matches one of `config.targets` computes

    y = x W (+ b) + scale * (dropout(x) A) B,      scale = alpha / rank

with `lora_a` [*in, rank] and `lora_b` [rank, *out] created next to the kernel
("layers/attn/query/lora_a"). They carry the kernel's logical axis names (the rank axis
unsharded), so `nn.scan` stacks them on "layers" and the mesh rules shard them like the
kernel. B starts at zero: at initialisation the adapted model equals the base exactly.

Training: freeze everything but adapters with `FREEZE_BASE` in `config.optimizer.freeze`
(the trainer's regex freezing over parameter paths). Export: `merge(base, adapters)` folds
them into the kernels, `unmerge` takes them out again.

Why not qwix (0.1.8, checked): it intercepts `jax.lax.dot_general` / einsum calls and
matches module paths, which works for linen, but it has no merge/unmerge, and it would be a
new dependency for what is here ~200 lines that the tests hold to the formulas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

# Attention q/k/v/o and SwiGLU gate/up/down, as named by layers.Attention / layers.Mlp.
DEFAULT_TARGETS = (r".*/(query|key|value|out)/kernel", r".*/(fc1_gate|fc1_up|fc2)/kernel")
ADAPTER_NAMES = ("lora_a", "lora_b")
ADAPTER_PATTERN = r".*/lora_[ab]"
# For config.optimizer.freeze: every parameter except the adapters.
FREEZE_BASE = r"(?!.*/lora_[ab]$).*"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if isinstance(self.targets, str):
      raise ValueError("LoRA targets must be a tuple of regexes, not one string")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"invalid LoRA target regex {pattern!r}: {e}") from None

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | Any) -> "LoraConfig":
    """From a dict or ml_collections ConfigDict with rank / alpha / targets / dropout."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    return cls(rank=int(get("rank", 8)), alpha=float(get("alpha", 16.0)),
               targets=tuple(get("targets", DEFAULT_TARGETS)),
               dropout=float(get("dropout", 0.0)))


def _axes(module, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(contracting axes of the input, output feature shape) of a Dense / DenseGeneral."""
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"LoRA does not support DenseGeneral with batch_dims ({module.path})")
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    features = module.features if isinstance(module.features, tuple) else (module.features,)
  else:
    axis, features = (-1,), (module.features,)
  return tuple(a % ndim for a in axis), tuple(features)


def _kernel_names(module) -> tuple[tuple | None, ...] | None:
  """The kernel's logical axis names (known at init, where the stored kernel is boxed)."""
  if not module.has_variable("params", "kernel"):
    return None
  boxed = module.scope.get_variable("params", "kernel")
  return getattr(boxed, "names", None)


def _interceptor(config: LoraConfig, deterministic: bool, created: list[str] | None):
  targets = [re.compile(p) for p in config.targets]

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in module.path) + "/kernel"
    if not any(t.fullmatch(path) for t in targets):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    axis, features = _axes(module, x.ndim)
    in_shape = tuple(x.shape[a] for a in axis)
    names = _kernel_names(module)
    n_in = len(axis)
    a_init = nn.initializers.variance_scaling(  # PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
    b_init = nn.initializers.zeros
    if names is not None:
      a_init = nn.with_logical_partitioning(a_init, tuple(names[:n_in]) + (None,))
      b_init = nn.with_logical_partitioning(b_init, (None,) + tuple(names[n_in:]))
    a = module.param("lora_a", a_init, in_shape + (config.rank,), module.param_dtype)
    b = module.param("lora_b", b_init, (config.rank,) + features, module.param_dtype)
    if created is not None:
      created.append(path)
    dtype = module.dtype or jnp.result_type(x, a)
    h = x.astype(dtype)
    if config.dropout > 0.0 and not deterministic:
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - config.dropout), 0).astype(dtype)
    h = jax.lax.dot_general(h, a.astype(dtype), ((axis, tuple(range(n_in))), ((), ())))
    delta = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return y + (delta * jnp.asarray(config.scale, dtype)).astype(y.dtype)

  return intercept


@contextlib.contextmanager
def adapters(config: LoraConfig, *, deterministic: bool = True,
             created: list[str] | None = None) -> Iterator[None]:
  """Within this context, module init/apply creates and uses LoRA adapters on the targets.

  `deterministic=False` with `config.dropout > 0` needs a "dropout" rng. `created`, if
  given, collects the adapted kernel paths (to check that the targets matched).
  """
  with nn.intercept_methods(_interceptor(config, deterministic, created)):
    yield


def init(module: nn.Module, config: LoraConfig, rngs, *args, **kwargs):
  """`module.init` with adapters; raises when the targets match no kernel."""
  created: list[str] = []
  with adapters(config, created=created):
    variables = module.init(rngs, *args, **kwargs)
  if not created:
    raise ValueError(f"LoRA targets {list(config.targets)} match no Dense kernel of "
                     f"{type(module).__name__}; parameter paths look like "
                     f"{', '.join(list(_flat(nn.unbox(variables).get('params', {})))[:6])}")
  return variables


def apply(module: nn.Module, config: LoraConfig, variables, *args, deterministic: bool = True,
          **kwargs):
  """`module.apply` with adapters."""
  with adapters(config, deterministic=deterministic):
    return module.apply(variables, *args, **kwargs)


# ------------------------------------------------------------------------ trees of params
def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: Mapping[str, Any]):
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ADAPTER_NAMES


def split(params) -> tuple[dict, dict]:
  """params -> (base params, adapters), both nested dicts with the original paths."""
  flat = _flat(params)
  base = {k: v for k, v in flat.items() if not is_adapter(k)}
  ada = {k: v for k, v in flat.items() if is_adapter(k)}
  return _unflat(base), _unflat(ada)


def combine(base, adapters_tree) -> dict:
  """The inverse of `split`."""
  return _unflat({**_flat(base), **_flat(adapters_tree)})


def delta(kernel, lora_a, lora_b, scale: float) -> jax.Array:
  """scale * A B reshaped to the kernel (leading stacked axes such as "layers" kept), f32."""
  p = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim   # leading (scan) axes
  if p < 0 or lora_a.shape[:p] != kernel.shape[:p] or lora_b.shape[:p] != kernel.shape[:p] or \
      lora_a.shape[-1] != lora_b.shape[p]:
    raise ValueError(f"adapter shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not "
                     f"fit kernel {tuple(kernel.shape)}")
  lead = math.prod(kernel.shape[:p])
  rank = lora_a.shape[-1]
  a = jnp.reshape(lora_a, (lead, -1, rank)).astype(jnp.float32)
  b = jnp.reshape(lora_b, (lead, rank, -1)).astype(jnp.float32)
  d = jnp.einsum("lir,lro->lio", a, b, precision=jax.lax.Precision.HIGHEST)
  return (d * scale).reshape(kernel.shape)


def _fold(base, adapters_tree, scale: float, sign: float) -> dict:
  flat = _flat(base)
  ada = _flat(adapters_tree)
  parents = {k.rsplit("/", 1)[0] for k in ada}
  out = dict(flat)
  for parent in sorted(parents):
    kernel_key = f"{parent}/kernel"
    a, b = ada.get(f"{parent}/lora_a"), ada.get(f"{parent}/lora_b")
    if a is None or b is None:
      raise ValueError(f"adapters of {parent} are incomplete (need lora_a and lora_b)")
    if kernel_key not in flat:
      raise ValueError(f"adapter {parent}/lora_a has no kernel {kernel_key} in the base params")
    w = flat[kernel_key]
    d = delta(w, a, b, scale)
    # Where the adapter adds nothing the kernel keeps its exact bits (also -0.0).
    out[kernel_key] = jnp.where(d == 0, w, (w.astype(jnp.float32) + sign * d).astype(w.dtype))
  return _unflat(out)


def merge(base, adapters_tree, scale: float | LoraConfig) -> dict:
  """Base params with each adapted kernel replaced by W + scale * A B (adapters dropped).

  Exact where A B is zero (at initialisation: merged == base bit for bit); elsewhere one
  float rounding per element of the kernel's dtype.
  """
  scale = scale.scale if isinstance(scale, LoraConfig) else float(scale)
  return _fold(base, adapters_tree, scale, 1.0)


def unmerge(merged, adapters_tree, scale: float | LoraConfig) -> dict:
  """Merged params back to the base: W - scale * A B. Exact where A B is zero; elsewhere
  within a rounding of the kernel's dtype (W + d - d need not round back to W's bits)."""
  scale = scale.scale if isinstance(scale, LoraConfig) else float(scale)
  return _fold(merged, adapters_tree, scale, -1.0)


def save_merged(params, config: LoraConfig, path: str, *,
                to_tensors: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
                max_shard_bytes: int | None = 5 * 10 ** 9) -> list[str]:
  """Merges adapters into the base and writes safetensors (sharded with an index above
  `max_shard_bytes`). `to_tensors` maps the flat "a/b/c" merged tree to the stored names
  and layouts (e.g. a Hugging Face converter's inverse); by default the flat tree is stored.
  """
  from pathjax.convert.safetensors_io import save_safetensors
  base, ada = split(nn.unbox(params))
  merged = _flat(merge(base, ada, config))
  tensors = to_tensors(merged) if to_tensors is not None else merged
  return save_safetensors(tensors, path, metadata={"format": "pathjax-lora-merged",
                                                   "lora_rank": str(config.rank),
                                                   "lora_alpha": str(config.alpha)},
                          max_shard_bytes=max_shard_bytes)


def adapter_paths(params) -> list[str]:
  return [k for k in _flat(params) if is_adapter(k)]


def trainable_mask(params, patterns: Sequence[str] = (ADAPTER_PATTERN,)):
  """A bool tree (True = train) for optax masking: adapters only by default."""
  compiled = [re.compile(p) for p in patterns]
  return _unflat({k: any(c.fullmatch(k) for c in compiled) for k in _flat(params)})
