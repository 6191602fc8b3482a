"""Joining a multi-process JAX run: local processes, TPU pods and SLURM GPU clusters.

The launchers in launch/ set the environment; every entry point that trains or compiles
calls `initialize()` before touching devices. One process with nothing set is a no-op.

- launch/local_multiprocess.sh: PATHJAX_COORDINATOR, PATHJAX_NUM_PROCESSES,
  PATHJAX_PROCESS_ID (CPU processes on one machine, gloo collectives).
- launch/tpu_pod.sh, launch/slurm_gpu.sbatch: PATHJAX_DISTRIBUTED=auto, and JAX detects the
  TPU pod or the SLURM allocation itself.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def initialize() -> None:
  global _initialized
  if _initialized:
    return
  num = os.environ.get("PATHJAX_NUM_PROCESSES")
  if num is not None and int(num) > 1:
    coordinator = os.environ.get("PATHJAX_COORDINATOR")
    process_id = os.environ.get("PATHJAX_PROCESS_ID")
    if not coordinator or process_id is None:
      raise RuntimeError("PATHJAX_NUM_PROCESSES is set but PATHJAX_COORDINATOR or "
                         "PATHJAX_PROCESS_ID is not; start processes with launch/local_multiprocess.sh")
    if jax.config.jax_platforms in (None, "", "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num),
                               process_id=int(process_id))
  elif os.environ.get("PATHJAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize()  # TPU pod / SLURM / Kubernetes auto-detection
  _initialized = True
