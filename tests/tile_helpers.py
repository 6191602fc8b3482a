"""Shared helpers for the tiling tests (local pool and Beam): the tiny grid, shard bytes, and
the fault-then-rerun check every tiling runner must pass."""

import errno
import glob
import os

import pytest
from slide_fixtures import TINY_MAGS, TINY_PATCH

from pathjax.input import tile
from pathjax.wsi import slide as slide_lib


def tile_tiny(paths, captions, out, **kw):
  """`tile.tile_slides` on the tiny fixtures' grid, without a progress bar."""
  kw.setdefault("magnifications", TINY_MAGS)
  kw.setdefault("patch_size", TINY_PATCH)
  kw.setdefault("progress", False)
  return tile.tile_slides(paths, captions, str(out), **kw)


def shard_bytes(out):
  """{file name: bytes} of every record shard (bags and pixels) in `out`, temporaries included."""
  return {os.path.basename(p): open(p, "rb").read()
          for p in sorted(glob.glob(os.path.join(str(out), "*.array_record*")))}


def flaky_slide_opens(monkeypatch, failures: dict[str, int]) -> dict[str, int]:
  """Makes opening slide `id` raise EIO while `failures[id] > 0` (each failure counts down);
  retries get no backoff. Returns `failures`, which the test changes to switch faults on/off.
  Seen by in-process runners only (the local pool's threads/forks, Beam's in-memory runner)."""
  monkeypatch.setattr(tile, "RETRY_BACKOFF_S", 0.0)
  original = slide_lib.open_slide

  def flaky(path, **kw):
    sid = slide_lib.slide_id_from_path(path)
    if failures.get(sid, 0) > 0:
      failures[sid] -= 1
      raise OSError(errno.EIO, "Input/output error", path)
    return original(path, **kw)

  monkeypatch.setattr(slide_lib, "open_slide", flaky)
  return failures


def assert_failed_run_then_rerun_finishes(run, out, failures: dict[str, int], slide_id: str,
                                          match: str):
  """A slide that keeps failing past every retry fails the run (TileIncompleteError matching
  `match`) and leaves no manifest; once the fault clears, the same run finishes and resumes
  the slides the failed run completed. Returns (the error, attempts made, rerun manifest)."""
  failures[slide_id] = 10_000
  with pytest.raises(tile.TileIncompleteError, match=match) as e:
    run(out)
  assert not os.path.exists(os.path.join(str(out), "manifest.json"))
  attempts = 10_000 - failures[slide_id]
  failures[slide_id] = 0
  manifest = run(out)
  assert manifest["counts"]["slides_resumed"] >= 1, manifest["counts"]  # finished work is kept
  assert os.path.exists(os.path.join(str(out), "manifest.json"))
  return e.value, attempts, manifest
