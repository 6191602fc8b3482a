"""A training workdir's safety rails: one writer at a time, writable before step 1, history kept.

    WORKDIR/.lock               held (flock) by process 0 of the run using the workdir
    WORKDIR/config.json         the config of the latest run
    WORKDIR/config_history/     earlier runs' config.json, one file per change (never deleted)
    WORKDIR/restarted-<UTC>/    what `--config.restart=true` moved aside (checkpoints, metrics)

The lock is an advisory `fcntl.flock` on WORKDIR/.lock: the kernel drops it when the holder
dies (kill -9, OOM kill), so a stale lock never blocks a rerun; the file itself only tells
the next process who holds it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time

from pathjax.config_lib import ConfigError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CONFIG_HISTORY = "config_history"


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def free_bytes(path: str) -> int | None:
  """Free bytes on the file system holding `path` (its nearest existing parent), or None."""
  path = os.path.abspath(path)
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def format_bytes(n: int | None) -> str:
  if n is None:
    return "unknown"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def check_writable_dir(path: str, what: str, *, create: bool = True) -> None:
  """Creates directory `path` (if `create`) and proves it writable with a probe file;
  ConfigError naming `what` and the path otherwise."""
  try:
    if create:
      os.makedirs(path, exist_ok=True)
    elif not os.path.isdir(path):
      raise ConfigError(f"{what}: the folder {path} does not exist; create it first or choose "
                        "another path")
    fd, probe = tempfile.mkstemp(prefix=".pathjax-write-test-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
      reason += f" ({format_bytes(free_bytes(path))} free)"
    raise ConfigError(f"{what} {path} is not writable: {reason}; choose a path you can write "
                      "to, or fix its permissions") from None


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` (and checkpoints/) and proves both writable; ConfigError otherwise.

  A read-only checkpoints/ otherwise shows up minutes later as an Orbax timeout.
  """
  for path in (workdir, os.path.join(workdir, "checkpoints")):
    check_writable_dir(path, "workdir")


class WorkdirLock:
  """Exclusive lock on a workdir for the lifetime of a run (process 0 takes it)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = ""
      try:
        with open(self.path) as f:
          info = json.load(f)
        holder = (f" by pid {info.get('pid')} on {info.get('host')} since "
                  f"{info.get('started')}")
      except (OSError, ValueError):
        pass
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise ConfigError(
            f"workdir {os.path.dirname(self.path)} is in use{holder} (lock {self.path}); wait "
            "for that run to finish or stop it, or train in another --workdir") from None
      raise
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def keep_config_history(workdir: str, current: dict) -> str | None:
  """Copies WORKDIR/config.json into config_history/ before a different config replaces it.

  Returns the history file written, or None when there was no earlier or no different config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      previous = json.load(f)
  except (OSError, ValueError):
    previous = None
  if previous == current:
    return None
  history = os.path.join(workdir, CONFIG_HISTORY)
  os.makedirs(history, exist_ok=True)
  target = os.path.join(history, f"config-{_utc_stamp()}.json")
  shutil.copy2(path, target)
  return target


def move_aside_for_restart(workdir: str) -> str | None:
  """`--config.restart=true`: moves checkpoints/, metrics.jsonl and tb/ into
  WORKDIR/restarted-<UTC time>/ (nothing is deleted). Returns that folder, or None if empty."""
  names = [n for n in ("checkpoints", "metrics.jsonl", "tb", "corrupt_checkpoints")
           if os.path.exists(os.path.join(workdir, n))]
  ckpt = os.path.join(workdir, "checkpoints")
  if names == ["checkpoints"] and not os.listdir(ckpt):
    return None
  if not names:
    return None
  target = os.path.join(workdir, f"restarted-{_utc_stamp()}")
  os.makedirs(target)
  for name in names:
    os.rename(os.path.join(workdir, name), os.path.join(target, name))
  return target


def _agree(ok: bool, error: BaseException | None) -> None:
  """Multi-process: every process raises when process 0 failed (instead of hanging later)."""
  import jax
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(0 if ok else 1)))
    if failed and error is None:
      raise ConfigError("process 0 could not prepare the workdir (see its log)")
  if error is not None:
    raise error


@contextlib.contextmanager
def guard(config, workdir: str):
  """Everything a run checks and holds around training in `workdir`.

  Validates the trainer fields, proves the workdir writable, takes the workdir lock (process
  0), applies `config.restart`, and keeps the previous config.json in config_history/ when
  the config changed. Yields; releases the lock on the way out.
  """
  import jax

  from pathjax import config_lib
  from pathjax.train_config import check_train_config
  check_train_config(config)
  is_main = jax.process_index() == 0
  lock = WorkdirLock(workdir) if is_main else None
  error = kept = None
  if is_main:
    try:
      ensure_writable(workdir)
      lock.acquire()
      current = json.loads(json.dumps(config_lib.to_json_dict(config), default=str))
      if bool(config.get("restart", False)):
        previous = _read_json(os.path.join(workdir, CONFIG_FILE))
        if previous != current:  # the same restart command rerun resumes its own run
          moved = move_aside_for_restart(workdir)
          if moved:
            print(f"pathjax train: restart: moved the previous run's checkpoints and metrics "
                  f"to {moved}", flush=True)
      kept = keep_config_history(workdir, current)
    except (ConfigError, OSError) as e:
      if lock is not None:
        lock.release()
      error = e if isinstance(e, ConfigError) else ConfigError(
          f"cannot prepare workdir {workdir}: {e.strerror or e}")
  _agree(error is None, error)
  try:
    yield
  except ConfigError as e:
    # The checkpoints belong to the previous config: config.json goes back to it, so the
    # message's "rerun with WORKDIR/config.json" holds (the refused one is not recorded).
    from pathjax.checkpoint import CheckpointMismatchError
    if isinstance(e, CheckpointMismatchError) and kept and is_main:
      tmp = os.path.join(workdir, CONFIG_FILE + ".restore.tmp")
      shutil.copy2(kept, tmp)
      os.replace(tmp, os.path.join(workdir, CONFIG_FILE))
      os.remove(kept)
    raise
  finally:
    if lock is not None:
      lock.release()


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
