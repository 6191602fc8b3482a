"""Orbax checkpoints of the whole training state plus the Grain iterator state.

A checkpoint step directory holds two items: `state` (the TrainState pytree: step, params,
optimizer state, rng; written asynchronously, each process its own shards) and `data` (the
Grain iterator state, one JSON file per process, via grain.checkpoint.CheckpointSave).
Restoring both puts a run exactly where it stopped: same parameters, same rng, same next batch.

A third item, `digests`, holds a position-weighted uint32 checksum of every saved array,
computed on device (so it works for arrays sharded over many hosts) and verified after a
restore: a file changed in place restores to different numbers and is caught.

`restore_latest` first compares the newest step's stored tree (names, shapes, dtypes, read
from Orbax's metadata without restoring) with the state the config builds: a difference is
a changed config, not damage, and raises `CheckpointMismatchError` (a ConfigError naming the
fields; nothing is moved). Only a step that cannot be read, or whose digests differ, is
moved aside to WORKDIR/corrupt_checkpoints/ with a warning and the next older one is tried.

A save that fails (disk full, permissions) raises `CheckpointSaveError` naming the step
directory and the free space, and its temporary directory is removed.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import time
import warnings
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from pathjax.config_lib import ConfigError

log = logging.getLogger(__name__)


class CorruptCheckpointWarning(UserWarning):
  pass


class CheckpointMismatchError(ConfigError):
  """The stored checkpoint tree differs from the state the current config builds."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (the message names the path and the free space)."""


class DigestMismatchError(ValueError):
  """Restored arrays differ from the digests stored at save time."""


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """'/'-joined tree path: the same string for the abstract state and Orbax's metadata tree."""
  return "/".join(_key_name(k) for k in path)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {path_name(p): leaf for p, leaf in leaves if leaf is not None}


def _shape_dtype(leaf) -> tuple[tuple[int, ...], str]:
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    dtype = "key"
  return tuple(getattr(leaf, "shape", ()) or ()), str(np.dtype(dtype) if dtype not in (None, "key")
                                                       else dtype)


def tree_differences(stored: Any, expected: Any, limit: int = 12) -> list[str]:
  """Human-readable differences between a stored metadata tree and an abstract state."""
  old, new = _flat(stored), _flat(expected)
  out = []
  for name in sorted(old.keys() - new.keys()):
    out.append(f"{name} is in the checkpoint but not in the current model")
  for name in sorted(new.keys() - old.keys()):
    out.append(f"{name} is new (not in the checkpoint)")
  for name in sorted(old.keys() & new.keys()):
    (s_old, d_old), (s_new, d_new) = _shape_dtype(old[name]), _shape_dtype(new[name])
    if s_old != s_new:
      out.append(f"{name} shape {s_old} -> {s_new}")
    elif d_old != d_new and "key" not in (d_old, d_new):
      out.append(f"{name} dtype {d_old} -> {d_new}")
  # Optimizer moments repeat every parameter change: name each parameter once, params first.
  params = {line.split(" ", 1)[0][len("params/"):] for line in out if line.startswith("params/")}
  out = sorted(out, key=lambda line: not line.startswith("params/"))
  out = [line for line in out if line.startswith("params/")
         or not any(line.split(" ", 1)[0].endswith("/" + p) for p in params)]
  if len(out) > limit:
    out = out[:limit] + [f"... and {len(out) - limit} more"]
  return out


def _leaf_digest(x: jax.Array) -> jax.Array:
  """uint32 sum of the array's bits times odd position weights (wrapping): order-independent
  to compute (any sharding, any host count gives the same number) yet position-sensitive."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    bits = jnp.ravel(jax.lax.bitcast_convert_type(x, unsigned)).astype(jnp.uint32)
  weights = (jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761)) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _digest_tree(tree):
  return jax.tree.map(_leaf_digest, tree)


def state_digests(state: Any) -> dict[str, int]:
  """{path: uint32 digest} of every array leaf of `state` (computed on device)."""
  arrays = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), state)
  digests = jax.device_get(_digest_tree(arrays))
  return {name: int(np.asarray(value)) for name, value in _flat(digests).items()}


def _state_bytes(state: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state) if hasattr(x, "shape") and hasattr(x, "dtype")
             and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def has_iterator_state(iterator) -> bool:
  return iterator is not None and hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


class Checkpointer:
  """Keep-last-N orbax checkpoints in `directory` (WORKDIR/checkpoints); N >= 1."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    if int(keep) < 1:
      raise ConfigError(f"keep_checkpoints={keep}: at least the newest checkpoint must be kept; "
                        "set --config.keep_checkpoints=1 or more")
    self.directory = os.path.abspath(directory)
    self.keep = int(keep)
    self.async_save = async_save
    self._pending: tuple[int, int] | None = None  # (step, state bytes) of a save in flight
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

  # ------------------------------------------------------------------------------ save
  def save(self, step: int, state: Any, iterator=None) -> None:
    """Starts saving `state` (and the iterator position) as `step`; returns once arrays are copied.

    Raises CheckpointSaveError if this save, or the previous one still in flight, failed.
    """
    self.check_saved(wait=True)
    items = {"state": ocp.args.StandardSave(state),
             "digests": ocp.args.JsonSave({"digests": state_digests(state)})}
    if has_iterator_state(iterator):
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    size = _state_bytes(state)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # the synchronous part (directories, metadata) failed
      raise self._save_error(step, size, e) from None
    self._pending = (step, size)
    if not self.async_save:
      self.check_saved(wait=True)

  def check_saved(self, wait: bool = False) -> None:
    """Raises CheckpointSaveError once the save in flight has ended without a committed step.

    Cheap when nothing is pending; the trainer calls it every step so a failed background
    save stops training at once instead of at the next checkpoint.
    """
    if self._pending is None:
      return
    if wait:
      try:
        self._manager.wait_until_finished()
      except Exception as e:
        step, size = self._pending
        self._pending = None
        raise self._save_error(step, size, e) from None
    elif self._manager.is_saving_in_progress():
      return
    step, size = self._pending
    self._pending = None
    error = None
    try:
      self._manager.check_for_errors()
    except Exception as e:
      error = e
    # Process 0 commits the step directory; other hosts may not see it yet on a shared file
    # system, so only process 0 checks it (its failure ends the job through the coordinator).
    missing = (jax.process_index() == 0
               and not os.path.isdir(os.path.join(self.directory, str(step))))
    if error is not None or missing:
      raise self._save_error(step, size, error)

  def _save_error(self, step: int, size: int, error: BaseException | None) -> CheckpointSaveError:
    from pathjax.workdir import format_bytes, free_bytes
    for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
      shutil.rmtree(tmp, ignore_errors=True)
    reason = "the step directory was not committed"
    if error is not None:
      reason = (getattr(error, "strerror", None) or str(error).strip().splitlines()[0][:300]
                if str(error).strip() else type(error).__name__)
      if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        reason = "no space left on device"
    path = os.path.join(self.directory, str(step))
    return CheckpointSaveError(
        f"could not save checkpoint {path}: {reason}; {format_bytes(free_bytes(self.directory))} "
        f"free, the state needs about {format_bytes(size)} per checkpoint (keep_checkpoints="
        f"{self.keep}); free space or move the workdir, then rerun the same command to resume "
        f"from step {self.latest_step() if self.latest_step() is not None else 0}")

  # --------------------------------------------------------------------------- restore
  def stored_tree(self, step: int) -> Any:
    """The metadata tree (names, shapes, dtypes) of a step's `state`, read without restoring."""
    handler = ocp.StandardCheckpointHandler()
    metadata = handler.metadata(epath.Path(self.directory) / str(step) / "state")
    return getattr(metadata, "tree", metadata)

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError if the step's stored tree differs from `abstract_state`."""
    differences = tree_differences(self.stored_tree(step), abstract_state)
    if differences:
      workdir = os.path.dirname(self.directory)
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} was written for a different model or "
          f"optimizer than the current config builds: {'; '.join(differences)}. Nothing was "
          f"changed. To continue that run, rerun with its config ({workdir}/config.json); "
          "to start fresh, use a new --workdir or add "
          "--config.restart=true (moves the old checkpoints and metrics into "
          f"{workdir}/restarted-<time>/, deleting nothing)")

  def _stored_digests(self, step: int) -> dict[str, int] | None:
    if not os.path.isdir(os.path.join(self.directory, str(step), "digests")):
      return None  # written before digests existed
    restored = self._manager.restore(step, args=ocp.args.Composite(digests=ocp.args.JsonRestore()))
    return {k: int(v) for k, v in restored["digests"]["digests"].items()}

  def restore(self, step: int, abstract_state: Any, iterator=None) -> Any:
    """Restores `step`, verifying the stored digests (DigestMismatchError on a difference)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if has_iterator_state(iterator):
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    state = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
    expected = self._stored_digests(step)
    if expected is not None:
      got = state_digests(state)
      bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
      if bad:
        raise DigestMismatchError(f"arrays differ from their saved digests: {', '.join(bad[:8])}"
                                  + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
    return state

  def restore_latest(self, abstract_state: Any, iterator=None) -> tuple[Any, int] | None:
    """(state, step) from the newest checkpoint that restores, or None if there is none.

    A stored tree that differs from `abstract_state` raises CheckpointMismatchError (the
    config changed; nothing is moved). Steps that cannot be read or fail their digests are
    moved to <workdir>/corrupt_checkpoints/<step>.<time> with a warning.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        stored = self.stored_tree(step)
      except Exception as e:  # unreadable metadata: damage, not a config change
        self._warn_corrupt(step, e)
        continue
      if tree_differences(stored, abstract_state):
        self.check_compatible(step, abstract_state)
      try:
        return self.restore(step, abstract_state, iterator), step
      except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
        self._warn_corrupt(step, e)
    return None

  def _warn_corrupt(self, step: int, e: BaseException) -> None:
    message = (f"checkpoint step {step} in {self.directory} could not be restored "
               f"({type(e).__name__}: {str(e)[:300]}); moved to corrupt_checkpoints/, "
               "falling back to the previous one")
    warnings.warn(message, CorruptCheckpointWarning, stacklevel=3)
    log.warning(message)
    self._quarantine(step)

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
    self.check_saved(wait=True)

  def close(self) -> None:
    """Waits for the last save; raises CheckpointSaveError if it failed."""
    try:
      self.check_saved(wait=True)
    finally:
      self._manager.close()
