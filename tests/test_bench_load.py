"""`pathjax bench load` end to end on a tiny checkpoint: it prints every figure and cleans up."""

import os
import re
import subprocess
import sys

import pytest

from pathjax.bench import load


def test_shard_limit_packs_into_the_requested_number_of_files():
  sizes = [256, 32, 32, 32, 32, 112, 112, 112] * 3 + [256]
  limit = load._shard_limit(sizes, 4)
  files, used = 1, 0
  for s in sizes:
    if used and used + s > limit:
      files, used = files + 1, 0
    used += s
  assert files == 4 and limit < sum(sizes)


@pytest.mark.slow
def test_bench_load_runs_and_cleans_up(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-m", "pathjax", "bench", "load", "--layers", "1",
                        "--hidden", "256", "--mlp", "512", "--vocab", "1024", "--dir",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert re.search(r"checkpoint: .* in 4 shards \+ index, largest tensor", text)
  assert re.search(r"disk read rate: [\d.]+ GB/s", text)
  assert re.search(r"onto 8 CPU devices .* [\d.]+x the disk read rate", text)
  assert re.search(r"repeated in the same process .* [\d.]+ GB/s, [\d.]+x", text)
  assert re.search(r"= [\d.]+x the largest tensor \(goal <= 2\)", text)
  assert os.listdir(tmp_path) == []
