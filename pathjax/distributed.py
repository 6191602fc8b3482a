"""Joining a multi-process JAX run: local processes, TPU pods and SLURM GPU clusters.

Entry points that train, benchmark or compile call `initialize()` before touching devices.
Explicit arguments (the `--coordinator_address/--num_processes/--process_id` and
`--distributed` flags) win; otherwise the launchers' environment decides:

- launch/local_multiprocess.sh: PATHJAX_COORDINATOR, PATHJAX_NUM_PROCESSES,
  PATHJAX_PROCESS_ID (CPU processes on one machine, gloo collectives).
- launch/tpu_pod.sh, launch/slurm_gpu.sbatch: PATHJAX_DISTRIBUTED=auto, and JAX detects the
  TPU pod or the SLURM allocation itself.

One process with nothing set is a no-op.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  global _initialized
  if _initialized:
    return
  env = os.environ
  coordinator_address = coordinator_address or env.get("PATHJAX_COORDINATOR")
  if num_processes is None and env.get("PATHJAX_NUM_PROCESSES"):
    num_processes = int(env["PATHJAX_NUM_PROCESSES"])
  if process_id is None and env.get("PATHJAX_PROCESS_ID"):
    process_id = int(env["PATHJAX_PROCESS_ID"])
  if coordinator_address and (num_processes or 1) > 1:
    if process_id is None:
      raise RuntimeError("a coordinator address and process count are set but no process id: "
                         "pass --process_id or start processes with launch/local_multiprocess.sh")
    platforms = jax.config.jax_platforms or ""
    if platforms in ("", "cpu") or platforms.startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto or env.get("PATHJAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize()  # TPU pod / SLURM / Kubernetes auto-detection
  _initialized = True
