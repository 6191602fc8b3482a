"""Shared measuring tools for `pathjax bench`: timing, the matmul peak, compiled FLOPs."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, min_seconds: float = 3.0,
               min_calls: int = 3) -> float:
  """Seconds per call of `fn` (after `warmup` calls), timed for at least `min_seconds`."""
  for _ in range(warmup):
    block(fn())
  calls, t0 = 0, time.perf_counter()
  while calls < min_calls or time.perf_counter() - t0 < min_seconds:
    block(fn())
    calls += 1
  return (time.perf_counter() - t0) / calls


def matmul_peak_flops(dtype=jnp.float32, n: int | None = None, min_seconds: float = 3.0) -> float:
  """Measured FLOP/s of one large square matmul on the default device (the machine's peak)."""
  if n is None:
    n = 4096 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  seconds = time_calls(lambda: matmul(a, b), min_seconds=min_seconds)
  return 2.0 * n ** 3 / seconds


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function, from XLA's cost analysis (None if unknown).

  XLA counts a while loop's body once, not once per trip: for layers under `nn.scan` this
  undercounts by about the depth. Ask it about an unscanned build of the same model
  (`unscanned_config`) when the figure matters.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def machine_line() -> str:
  device = jax.devices()[0]
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"backend {jax.default_backend()}, {jax.device_count()} device(s) "
          f"({device.device_kind}), {os.cpu_count()} CPU cores, load average {load:.2f}")


def unscanned_config(config):
  """A copy of `config` with `model.scan` off, for XLA FLOP counts (see compiled_flops)."""
  config = config.copy_and_resolve_references()
  if "model" in config and "scan" in config.model:
    with config.unlocked():
      config.model.scan = False
  return config
