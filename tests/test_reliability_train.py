"""Fault injection against `train` (issue 15 items 2-4, 13 and the train messages; issue 10
item 2): each test failed on the code before the fix."""

import errno
import glob
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pathjax import cli, workdir as workdir_lib
from pathjax.checkpoint import (CheckpointMismatchError, CheckpointSaveError,
                                CorruptCheckpointWarning)
from pathjax.config_lib import ConfigError
from pathjax.metrics_log import read_metrics
from pathjax.train import train
from train_helpers import ROOT, TOY, Crash, comparable, crash_at, toy_config


def _steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "pathjax", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def test_changed_model_config_raises_and_keeps_every_checkpoint_and_metric(tmp_path):
  config = toy_config(total_steps=4, log_every=1, checkpoint_every=2)
  train(config, tmp_path)
  checkpoints = _snapshot(tmp_path / "checkpoints")
  with open(tmp_path / "metrics.jsonl") as f:
    metrics = f.read()
  changed = toy_config(total_steps=6, log_every=1, checkpoint_every=2, **{"model.hidden": 16})
  with pytest.raises(CheckpointMismatchError) as raised:
    train(changed, tmp_path)
  message = str(raised.value)
  assert "params/encoder/kernel shape (8, 32) -> (8, 16)" in message
  assert "opt_state" not in message  # moments of a named parameter are not repeated
  assert "--config.restart=true" in message and "new --workdir" in message
  assert _snapshot(tmp_path / "checkpoints") == checkpoints  # nothing moved or deleted
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")
  with open(tmp_path / "metrics.jsonl") as f:
    assert f.read() == metrics
  # config.json still names the config that wrote the checkpoints (the message says so).
  assert json.load(open(tmp_path / "config.json"))["model"]["hidden"] == 32
  assert "config.json" in message
  train(toy_config(total_steps=6, log_every=1, checkpoint_every=2), tmp_path)  # resumes
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
  history = glob.glob(str(tmp_path / "config_history" / "config-*.json"))
  assert len(history) == 1 and json.load(open(history[0]))["total_steps"] == 4


def test_restart_moves_the_old_run_aside_and_a_rerun_resumes(tmp_path, capsys):
  train(toy_config(total_steps=4, log_every=1, checkpoint_every=2), tmp_path)
  old = _snapshot(tmp_path / "checkpoints")
  restart = toy_config(total_steps=4, log_every=1, checkpoint_every=2, restart=True,
                       **{"model.hidden": 16})
  train(restart, tmp_path)
  moved = glob.glob(str(tmp_path / "restarted-*"))
  assert len(moved) == 1
  assert _snapshot(os.path.join(moved[0], "checkpoints")) == old
  assert [r["step"] for r in read_metrics(moved[0])] == [1, 2, 3, 4]
  assert "starting from scratch" in capsys.readouterr().out
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
  train(restart, tmp_path)  # the same command again resumes its own run
  assert len(glob.glob(str(tmp_path / "restarted-*"))) == 1
  assert "resumed from checkpoint step 4" in capsys.readouterr().out


def test_metrics_are_appended_never_truncated(tmp_path):
  config = toy_config(total_steps=8, log_every=1, checkpoint_every=2)
  train(config, tmp_path / "straight")
  with pytest.raises(Crash):
    train(config, tmp_path / "crashed", evaluators=[crash_at(6)])
  before = read_metrics(tmp_path / "crashed", raw=True)
  assert [r["step"] for r in before] == [1, 2, 3, 4, 5]
  train(config, tmp_path / "crashed")  # resumes from 4: step 5 is trained again
  raw = read_metrics(tmp_path / "crashed", raw=True)
  assert raw[:5] == before  # the first run's lines are all still there
  assert comparable(tmp_path / "crashed") == comparable(tmp_path / "straight")


def test_keep_checkpoints_below_one_is_rejected(tmp_path):
  with pytest.raises(ConfigError, match="keep_checkpoints"):
    train(toy_config(total_steps=2, keep_checkpoints=0), tmp_path)
  assert _steps(tmp_path) == []
  proc = _run_cli("train", f"--config={TOY}", "--workdir", str(tmp_path / "cli"),
                  "--config.keep_checkpoints=0")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "keep_checkpoints" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "cli")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_non_finite_or_negative_learning_rate_is_rejected(tmp_path, value):
  proc = _run_cli("train", f"--config={TOY}", "--workdir", str(tmp_path),
                  f"--config.optimizer.lr={value}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "optimizer.lr" in proc.stderr and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
      train(toy_config(total_steps=2), tmp_path)
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  train(toy_config(total_steps=2, log_every=1), tmp_path)  # released: runs
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from pathjax.workdir import WorkdirLock; "
       "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
       str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(ConfigError, match="in use"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  holder.kill()  # kill -9: the lock file stays, the kernel lock goes
  holder.wait()
  assert os.path.exists(tmp_path / ".lock")
  workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_unwritable_checkpoints_dir_fails_before_the_first_step(tmp_path, monkeypatch):
  real = workdir_lib.tempfile.mkstemp

  def mkstemp(*args, dir=None, **kwargs):
    if dir and os.path.basename(dir) == "checkpoints":
      raise PermissionError(errno.EACCES, "Permission denied", dir)
    return real(*args, dir=dir, **kwargs)
  monkeypatch.setattr(workdir_lib.tempfile, "mkstemp", mkstemp)
  with pytest.raises(ConfigError, match=r"checkpoints is not writable: Permission denied"):
    train(toy_config(total_steps=2), tmp_path)
  assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_workdir_in_a_read_only_directory_is_one_line(tmp_path):
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o500)
  try:
    proc = _run_cli("train", f"--config={TOY}", "--workdir", str(parent / "run"))
  finally:
    parent.chmod(0o700)
  assert proc.returncode == 2 and "not writable" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_workdir_in_a_read_only_directory_is_a_config_error(tmp_path, monkeypatch):
  real = os.makedirs

  def makedirs(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / "ro")):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real(path, *args, **kwargs)
  monkeypatch.setattr(workdir_lib.os, "makedirs", makedirs)
  with pytest.raises(ConfigError, match="ro/run is not writable: Permission denied"):
    train(toy_config(total_steps=2), tmp_path / "ro" / "run")


def _fail_save_at(monkeypatch, step, mode):
  """Checkpoint saves fail from `step` on: 'raise' (the synchronous part) or 'lost' (the
  background write never commits, as when the disk fills while it writes)."""
  import orbax.checkpoint as ocp
  real = ocp.CheckpointManager.save

  def save(self, at, *args, **kwargs):
    if at < step:
      return real(self, at, *args, **kwargs)
    if mode == "raise":
      raise OSError(errno.ENOSPC, "No space left on device")
    os.makedirs(os.path.join(self.directory, f"{at}.orbax-checkpoint-tmp-1"))
    return True
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("mode", ["raise", "lost"])
def test_disk_full_at_a_save_stops_training_there(tmp_path, monkeypatch, mode):
  _fail_save_at(monkeypatch, 4, mode)
  config = toy_config(total_steps=10, log_every=1, checkpoint_every=2)
  with pytest.raises(CheckpointSaveError) as raised:
    train(config, tmp_path)
  message = str(raised.value)
  assert str(tmp_path / "checkpoints" / "4") in message and "free" in message
  assert "resume from step 2" in message
  if mode == "raise":
    assert "no space left on device" in message
  assert max(r["step"] for r in read_metrics(tmp_path)) <= 5  # not 10
  assert _steps(tmp_path) == [2]
  assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))  # temporaries removed


def test_disk_full_cli_prints_one_line_and_exits_74(tmp_path, monkeypatch, capsys):
  _fail_save_at(monkeypatch, 2, "raise")
  code = cli.main(["train", f"--config={TOY}", "--workdir", str(tmp_path),
                   "--config.total_steps=4", "--config.checkpoint_every=2"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 74
  assert len(err) == 1 and "could not save checkpoint" in err[0] and "free" in err[0]


def _read_arrays(state_dir, names):
  """Every stored array read straight with tensorstore (a fresh context: no cached chunks),
  as Orbax reads them; None if any read fails."""
  import tensorstore as ts
  context = ts.Context()
  out = []
  try:
    for name in names:
      spec = {"driver": "zarr", "path": name + "/",
              "kvstore": {"driver": "ocdbt", "base": f"file://{state_dir}/"}}
      out.append(ts.open(spec, context=context, open=True).result().read().result())
  except Exception:
    return None
  return out


def _change_in_place(directory, step):
  """Changes 4 bytes of a stored array file (same size) so that the arrays still read without
  an error, but as different numbers (bit rot, a bad copy); returns the file."""
  from pathjax.checkpoint import Checkpointer
  checkpointer = Checkpointer(directory)
  try:
    names = [leaf.name for leaf in _flat_leaves(checkpointer.stored_tree(step))]
  finally:
    checkpointer.close()
  state_dir = os.path.join(directory, str(step), "state")
  original = _read_arrays(state_dir, names)
  files = sorted((f for f in glob.glob(os.path.join(state_dir, "**"), recursive=True)
                  if os.path.isfile(f) and os.sep + "d" + os.sep in f), key=os.path.getsize)
  for path in reversed(files):
    with open(path, "rb") as f:
      content = f.read()
    for offset in range(len(content) // 16, len(content) - 4, max(len(content) // 64, 1)):
      changed = bytearray(content)
      changed[offset:offset + 4] = bytes(b ^ 0x5A for b in content[offset:offset + 4])
      with open(path, "r+b") as f:
        f.write(changed)
      got = _read_arrays(state_dir, names)
      if got is not None and any(not np.array_equal(a, b) for a, b in zip(got, original)):
        return path
      with open(path, "r+b") as f:
        f.write(content)
  raise AssertionError("no in-place change reads back silently")


def _flat_leaves(tree):
  import jax
  return [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "name")]


@pytest.mark.slow
def test_checkpoint_changed_in_place_falls_back_to_the_previous_one(tmp_path):
  import jax  # one device writes one unsharded chunk per array (the layout changed here)
  run, straight = tmp_path / "run", tmp_path / "straight"
  for workdir in (run, straight):
    train(toy_config(total_steps=4, log_every=1, checkpoint_every=2), workdir,
          devices=jax.devices()[:1])
  continued = _run_cli("train", f"--config={TOY}", "--workdir", str(straight),
                       "--config.total_steps=6", "--config.log_every=1",
                       "--config.checkpoint_every=2")
  assert continued.returncode == 0, continued.stderr[-3000:]
  changed = _change_in_place(str(run / "checkpoints"), 4)
  assert os.path.exists(changed)
  # A fresh process, as a rerun is (this one's tensorstore cache still holds the old chunks).
  proc = _run_cli("train", f"--config={TOY}", "--workdir", str(run), "--config.total_steps=6",
                  "--config.log_every=1", "--config.checkpoint_every=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 4" in proc.stderr and "saved digests" in proc.stderr
  assert "resumed from checkpoint step 2" in proc.stdout
  assert os.listdir(run / "corrupt_checkpoints")
  got, expected = comparable(run), comparable(straight)
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
  for step in expected:  # steps 3-4 ran again on 8 devices: float32 reduction order only
    assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7)
