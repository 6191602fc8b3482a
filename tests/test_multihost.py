"""Multi-host training with the local launcher: 2 processes x 2 devices == 1 process x 4.

The processes talk over loopback with gloo collectives (launch/local_multiprocess.sh). Each
reads its half of every global batch, and the global batches are identical to one
process's, so the losses must agree step for step.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mrplip_helpers import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_launcher(processes, devices, workdir, records, tokenizer):
  overrides = [o for o in TINY if not o.startswith("model.text.overrides.vocab_size")] + [
      "model.text.overrides.vocab_size=0", f"input.records_dir={records}",
      f"input.tokenizer={tokenizer}", "total_steps=4", "log_every=1", "checkpoint_every=100",
      "input.augment.enabled=false"]
  cmd = ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), str(processes),
         sys.executable, "-m", "pathjax", "train", "--config=configs/mrplip.py:smoke",
         "--workdir", str(workdir)] + [f"--config.{o}" for o in overrides]
  env = dict(os.environ, DEVICES=str(devices), LOGDIR=str(workdir.parent),
             PORT=str(20000 + os.getpid() % 20000 + processes))
  env.pop("XLA_FLAGS", None)  # the launcher sets the device count per process
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one(tiny_training_data, tmp_path):
  records, tokenizer = tiny_training_data
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  multi = run_launcher(2, 2, tmp_path / "a" / "run", records, tokenizer)
  single = run_launcher(1, 4, tmp_path / "b" / "run", records, tokenizer)
  assert [m["step"] for m in multi] == [m["step"] for m in single] == [1, 2, 3, 4]
  np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in single],
                             rtol=2e-4, atol=2e-5)
