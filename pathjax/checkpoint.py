"""Orbax checkpoints of the whole training state plus the Grain iterator state.

A checkpoint step directory holds two items: `state` (the TrainState pytree: step, params,
optimizer state, rng; written asynchronously, each process its own shards) and `data` (the
Grain iterator state, one JSON file per process, via grain.checkpoint.CheckpointSave).
Restoring both puts a run exactly where it stopped: same parameters, same rng, same next batch.

`restore_latest` walks the steps newest first; a step that fails to restore (corrupted or
truncated files) is moved aside to WORKDIR/corrupt_checkpoints/ with a warning and the next
older one is tried, so training goes on from the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CorruptCheckpointWarning(UserWarning):
  pass


def has_iterator_state(iterator) -> bool:
  return iterator is not None and hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


class Checkpointer:
  """Keep-last-N orbax checkpoints in `directory` (WORKDIR/checkpoints)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.async_save = async_save
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=self.async_save)
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, iterator=None) -> None:
    """Starts saving `state` (and the iterator position) as `step`; returns once arrays are copied."""
    items = {"state": ocp.args.StandardSave(state)}
    if has_iterator_state(iterator):
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, iterator=None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if has_iterator_state(iterator):
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_latest(self, abstract_state: Any, iterator=None) -> tuple[Any, int] | None:
    """(state, step) from the newest checkpoint that restores, or None if there is none.

    Corrupted steps are moved to <workdir>/corrupt_checkpoints/<step> with a warning.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore(step, abstract_state, iterator), step
      except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
        message = (f"checkpoint step {step} in {self.directory} could not be restored "
                   f"({type(e).__name__}: {str(e)[:300]}); falling back to the previous one")
        warnings.warn(message, CorruptCheckpointWarning, stacklevel=2)
        log.warning(message)
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a damaged step out of the checkpoint directory so later saves can reuse its number."""
    multihost_utils.sync_global_devices(f"pathjax_quarantine_{step}_start")
    if jax.process_index() == 0:
      target = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints",
                            f"{step}.{int(time.time())}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    multihost_utils.sync_global_devices(f"pathjax_quarantine_{step}_done")
    self._manager.close()
    self._manager = self._make_manager()

  def reached_preemption(self, step: int) -> bool:
    """True on every process once JAX's distributed preemption notice reached this step."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
