"""Checkpoints: keep-N, exact resume (in process, after SIGKILL), corrupted fallback, SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pathjax.checkpoint import CorruptCheckpointWarning
from pathjax.metrics_log import read_metrics
from pathjax.train import train
from train_helpers import ROOT, TOY, Crash, comparable, crash_at, toy_config


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_keep_last_n_and_exact_resume_after_a_crash(tmp_path):
  config = toy_config(total_steps=8, log_every=1, checkpoint_every=2, keep_checkpoints=2)
  train(config, tmp_path / "straight")
  assert _steps(tmp_path / "straight") == [6, 8]

  with pytest.raises(Crash):
    train(config, tmp_path / "crashed", evaluators=[crash_at(7)])
  assert _steps(tmp_path / "crashed") == [4, 6]
  assert max(comparable(tmp_path / "crashed")) == 6
  train(config, tmp_path / "crashed")  # same command again: resumes from step 6
  assert comparable(tmp_path / "crashed") == comparable(tmp_path / "straight")
  again = train(config, tmp_path / "crashed")  # a finished run: nothing to do
  assert again["step"] == 8 and max(comparable(tmp_path / "crashed")) == 8


def _corrupt(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")


def test_corrupted_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  config = toy_config(total_steps=6, log_every=1, checkpoint_every=3)
  train(config, tmp_path)
  reference = comparable(tmp_path)
  _corrupt(tmp_path / "checkpoints" / "6")
  with pytest.warns(CorruptCheckpointWarning, match="step 6"):
    train(config, tmp_path)
  assert "resumed from checkpoint step 3" in capsys.readouterr().out
  assert os.listdir(tmp_path / "corrupt_checkpoints")
  assert _steps(tmp_path) == [3, 6]
  assert comparable(tmp_path) == reference


def _command(workdir, *overrides):
  return [sys.executable, "-m", "pathjax", "train", f"--config={TOY}", "--workdir", str(workdir),
          *[f"--config.{o}" for o in overrides]]


def _wait_for_step(workdir, proc, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    records = read_metrics(str(workdir)) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
    if records and records[-1]["step"] >= step:
      return records[-1]["step"]
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.02)
  raise TimeoutError(f"no step {step} in {workdir}")


@pytest.mark.slow
def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path):
  overrides = ("total_steps=150", "log_every=1", "checkpoint_every=20")
  straight = subprocess.run(_command(tmp_path / "straight", *overrides), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_command(killed, *overrides), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  at = _wait_for_step(killed, proc, 73)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert at < 150
  rerun = subprocess.run(_command(killed, *overrides), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from checkpoint step" in rerun.stdout
  resumed_from = int(rerun.stdout.split("resumed from checkpoint step ")[1].split(";")[0])
  assert 20 <= resumed_from <= at
  expected, got = comparable(tmp_path / "straight"), comparable(killed)
  assert sorted(got) == list(range(1, 151))
  assert got == expected  # every step, bit for bit


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(
      _command(tmp_path, "total_steps=100000", "log_every=1", "checkpoint_every=100000"),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(tmp_path, proc, 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-3000:]  # EXIT_PREEMPTED: a scheduler can tell it apart
  assert "preempted (SIGTERM); saved step" in out
  saved = int(out.split("saved step ")[1].split()[0])
  assert _steps(tmp_path) == [saved] and saved >= 5
