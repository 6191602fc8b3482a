"""Shared helpers for the trainer tests (toy recipe)."""

import os

from pathjax import config_lib
from pathjax.metrics_log import TIMING_KEYS, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_devices(n: int) -> str:
  """XLA_FLAGS for a subprocess with n CPU devices (conftest.SERIAL_COLLECTIVES: collectives in
  program order, no rendezvous deadlocks)."""
  return (f"--xla_force_host_platform_device_count={n} "
          "--xla_cpu_enable_concurrency_optimized_scheduler=false")
TOY = os.path.join(ROOT, "configs", "toy.py")


def toy_config(variant="", **overrides):
  items = [f"{k}={v}" for k, v in overrides.items()]
  return config_lib.load_config(TOY + (f":{variant}" if variant else ""), items)


def comparable(workdir):
  """metrics.jsonl records without timing fields, keyed by step."""
  return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in read_metrics(str(workdir))}


class Crash(RuntimeError):
  """Raised by `crash_at`'s evaluator: a run dying mid-training."""


def crash_at(step: int):
  """An evaluator that raises Crash at `step` (after that step, before its checkpoint)."""
  from pathjax.train import Evaluator

  def boom(params, at):
    if at == step:
      raise Crash()
    return {}
  return Evaluator("boom", every=step, fn=boom)


def use_compilation_cache():
  """Persistent XLA cache for the trainer tests (compiles take seconds each on a small CPU).

  Also exported to the environment so `pathjax train` subprocesses share it.
  """
  import jax
  cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax_tests"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


use_compilation_cache()


def assert_crash_resumes_exactly(config, root, crash_step: int = 5):
  """Trains `config` straight, and again crashed after `crash_step` then rerun in the same
  workdir; the rerun's logged metrics (timing aside) equal the uninterrupted run's."""
  import pytest
  from pathjax.train import train
  total = int(config.total_steps)
  train(config, root / "straight")
  with pytest.raises(Crash):
    train(config, root / "crashed", evaluators=[crash_at(crash_step)])
  assert max(comparable(root / "crashed")) == crash_step - 1
  train(config, root / "crashed")
  straight, resumed = comparable(root / "straight"), comparable(root / "crashed")
  assert sorted(resumed) == sorted(straight) == list(range(1, total + 1))
  assert resumed == straight
