"""Tiling under faults: dead workers, dead parents, concurrent and killed attempts, transient
errors, full disks, changed files and captions, colliding ids, and the messages users see."""

import errno
import functools
import glob
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from slide_fixtures import TINY_MAGS, TINY_PATCH
from tile_helpers import assert_failed_run_then_rerun_finishes, flaky_slide_opens, shard_bytes, tile_tiny

from pathjax import cli
from pathjax.input import records, storage, tile
from pathjax.wsi import slide as slide_lib

KILL_ONCE_FLAG = "PATHJAX_TEST_KILL_ONCE_FLAG"


def _opts():
  return tile.make_options(TINY_MAGS, TINY_PATCH)


@pytest.fixture(scope="module")
def reference(tiny_slides, tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  manifest = tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, out)
  return out, manifest


# -- slide functions run in pool workers (module level, so spawned workers can import them)

def kill_always(ref, *args, **kwargs):
  if ref.slide_id == "synth-001":
    os.kill(os.getpid(), signal.SIGKILL)
  return tile.tile_slide_with_retries(ref, *args, **kwargs)


def kill_once(ref, *args, **kwargs):
  flag = os.environ[KILL_ONCE_FLAG]
  if ref.slide_id == "synth-001" and not os.path.exists(flag):
    open(flag, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
  return tile.tile_slide_with_retries(ref, *args, **kwargs)


def test_killed_worker_is_replaced_and_its_slide_retried(tiny_slides, reference, tmp_path, monkeypatch):
  monkeypatch.setenv(KILL_ONCE_FLAG, str(tmp_path / "killed"))
  m = tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, tmp_path / "out", workers=2, slide_fn=kill_once)
  assert os.path.exists(tmp_path / "killed")  # the worker really died once
  assert m["counts"] == reference[1]["counts"] and m["counts"]["slides_worker_died"] == 0
  assert shard_bytes(tmp_path / "out") == shard_bytes(reference[0])


def test_slide_that_kills_its_worker_twice_is_skipped_and_exit_nonzero(tiny_slides, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(tile, "tile_slides", functools.partial(tile.tile_slides, slide_fn=kill_always))
  out = str(tmp_path / "out")
  code = cli.main(["tile", "--slides", os.path.dirname(tiny_slides.slide_paths[0]) + "/*.svs",
                   "--captions", tiny_slides.captions_path, "--out", out, "--workers", "2",
                   "--patch-size", str(TINY_PATCH), "--no-progress"])
  err = capsys.readouterr().err
  assert code == 1 and "killed their worker twice" in err and "Traceback" not in err
  m = records.read_manifest(out)
  assert m["counts"]["slides_tiled"] == 2 and m["counts"]["slides_worker_died"] == 1
  assert m["skipped"]["slides"][0]["slide"] == "synth-001"
  assert m["skipped"]["slides"][0]["reason"] == "worker_died"


PARENT_SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from pathjax.input import tile
import test_tile_faults
if __name__ == "__main__":
  pool = tile.make_pool(1)
  pool.submit(test_tile_faults.sleep_and_report, {pid_file!r})
  time.sleep(120)
"""


def sleep_and_report(pid_file):
  with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
  time.sleep(120)


def test_workers_exit_when_the_parent_is_killed(tmp_path):
  pid_file = str(tmp_path / "worker.pid")
  script = tmp_path / "parent.py"
  script.write_text(PARENT_SCRIPT.format(tests=os.path.dirname(__file__), pid_file=pid_file))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  parent = subprocess.Popen([sys.executable, str(script)], env=env)
  try:
    for _ in range(600):
      if os.path.exists(pid_file) and open(pid_file).read():
        break
      time.sleep(0.1)
    worker = int(open(pid_file).read())
    parent.kill()
    parent.wait()
    for _ in range(100):
      try:
        os.kill(worker, 0)
      except ProcessLookupError:
        break
      time.sleep(0.1)
    else:
      os.kill(worker, signal.SIGKILL)
      pytest.fail("the worker outlived its parent by 10 s")
  finally:
    if parent.poll() is None:
      parent.kill()


def test_colliding_slide_ids_refused_naming_both(tiny_slides, tmp_path, capsys):
  d = tmp_path / "slides"
  d.mkdir()
  shutil.copy(tiny_slides.slide_paths[0], d / "case a.svs")
  shutil.copy(tiny_slides.slide_paths[1], d / "case_a.svs")
  with pytest.raises(tile.TileError, match="case a.svs.*case_a.svs|case_a.svs.*case a.svs"):
    tile_tiny(str(d / "*.svs"), None, tmp_path / "out")
  (d / "other").mkdir()
  shutil.copy(tiny_slides.slide_paths[0], d / "other" / "case_a.tif")
  code = cli.main(["tile", "--slides", str(d / "**" / "case_a.*"), "--out", str(tmp_path / "out2"),
                   "--no-progress"])
  err = capsys.readouterr().err
  assert code == 2 and "the same slide id" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "out2" / "manifest.json")


def test_concurrent_attempts_of_one_slide_same_pid(tiny_slides, reference, tmp_path, monkeypatch):
  """Two hosts (same pid, as two machines can have) tiling one slide at once."""
  monkeypatch.setattr(os, "getpid", lambda: 4242)
  out = tmp_path / "out"
  out.mkdir()
  ref = tile.plan_slides(tiny_slides.slide_paths[:1])[0]
  from pathjax.input import captions as captions_lib
  caps = captions_lib.load_captions(tiny_slides.captions_path).for_slide(ref.slide_id)
  results, errors = [], []

  def attempt():
    try:
      results.append(tile.tile_one_slide(ref, str(out), _opts(), caps))
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=attempt) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and [r["status"] for r in results] == ["done", "done"]
  name = tile.shard_name(ref.slide_id)
  ref_bytes = shard_bytes(reference[0])
  got = shard_bytes(out)
  assert set(got) == {name, records.pixels_path(name)}
  assert got[name] == ref_bytes[name] and got[records.pixels_path(name)] == ref_bytes[records.pixels_path(name)]
  marker = tile.read_marker(str(out), ref.slide_id)
  assert tile.tile_slide(ref, str(out), _opts(), caps)["resumed"]  # one consistent, valid marker
  assert marker["shard_bytes"] == len(got[name])


def _killed_attempt(path, out):
  """Tiles one slide and SIGKILLs itself after the second bag (in a child process)."""
  calls = {"n": 0}
  original = tile._make_bag

  def make_bag(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

  tile._make_bag = make_bag
  tile.tile_one_slide(path, out, tile.make_options(TINY_MAGS, TINY_PATCH), {})


def test_attempt_killed_mid_slide_then_retried(tiny_slides, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  path = os.path.abspath(tiny_slides.slide_paths[0])
  proc = mp.get_context("spawn").Process(target=_killed_attempt, args=(path, str(out)))
  proc.start()
  proc.join(120)
  assert proc.exitcode == -signal.SIGKILL
  leftovers = os.listdir(out)
  assert leftovers and all(storage.TMP_MARK in n for n in leftovers)  # half-written, never renamed
  m = tile_tiny([path], None, out)
  assert m["counts"]["slides_tiled"] == 1 and m["counts"]["slides_resumed"] == 0
  clean = tmp_path / "clean"
  tile_tiny([path], None, clean)
  assert shard_bytes(out) == shard_bytes(clean)  # exactly one attempt's shards, no temporaries
  assert not glob.glob(str(out / ".tile" / "done" / f"*{storage.TMP_MARK}*"))


def test_transient_error_is_retried_and_succeeds(tiny_slides, reference, tmp_path, monkeypatch):
  failures = flaky_slide_opens(monkeypatch, {"synth-002": 2})
  m = tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, tmp_path / "out")
  assert failures["synth-002"] == 0 and m["counts"] == reference[1]["counts"]
  # One that keeps failing is not a skip: the run fails naming it, writes no manifest, and
  # a rerun finishes it.
  error, attempts, m = assert_failed_run_then_rerun_finishes(
      lambda out: tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, out),
      tmp_path / "out2", failures, "synth-002", match="synth-002")
  assert [f["reason"] for f in error.failed] == ["io_error"] and attempts == tile.RETRY_ATTEMPTS
  assert m["counts"]["slides_resumed"] == 2 and m["counts"]["slides_tiled"] == 3


def test_disk_full_no_traceback_reasons_kept_no_temporaries(tiny_slides, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(tile, "RETRY_BACKOFF_S", 0.0)
  d = tmp_path / "slides"
  d.mkdir()
  for p in tiny_slides.slide_paths[:2]:
    shutil.copy(p, d)
  (d / "junk.svs").write_bytes(b"II*\x00" + b"\x01" * 3000)
  out = str(tmp_path / "out")
  args = ["tile", "--slides", str(d / "*.svs"), "--out", out, "--patch-size", str(TINY_PATCH), "--no-progress"]
  original_write = records.write_slide_shards

  def full_disk(path, bags):
    if "synth-001" in path:
      raise OSError(errno.ENOSPC, "No space left on device", path)
    return original_write(path, bags)

  monkeypatch.setattr(records, "write_slide_shards", full_disk)
  assert cli.main(args) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err and "[disk_full]" in err and "synth-001" in err
  assert "skipped junk: [corrupt_or_truncated]" in err  # the other slides' reasons are kept
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  monkeypatch.setattr(records, "write_slide_shards", original_write)
  # The disk fills up while the manifest is written.
  real_fsync = os.fsync

  def fsync(fd):
    if "manifest.json" in os.readlink(f"/proc/self/fd/{fd}"):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_fsync(fd)

  monkeypatch.setattr(storage.os, "fsync", fsync)
  assert cli.main(args) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err and "disk is full" in err
  assert not glob.glob(os.path.join(out, "manifest.json*"))
  monkeypatch.setattr(storage.os, "fsync", real_fsync)
  assert cli.main(args) == 0
  m = records.read_manifest(out)
  assert m["counts"]["slides_resumed"] == 3 and m["counts"]["slides_tiled"] == 2
  assert m["skipped"]["slides_by_reason"] == {"corrupt_or_truncated": 1}


def test_skips_retried_when_the_file_changes_or_asked(tiny_slides, tmp_path, monkeypatch):
  d = tmp_path / "slides"
  d.mkdir()
  good = open(tiny_slides.slide_paths[0], "rb").read()
  (d / "copying.svs").write_bytes(good[: len(good) // 3])  # an incomplete copy
  shutil.copy(tiny_slides.slide_paths[1], d / "locked.svs")
  real_open = open

  def no_permission(path, *args, **kwargs):
    if str(path).endswith("locked.svs"):
      raise PermissionError(errno.EACCES, "Permission denied", path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(slide_lib, "open", no_permission, raising=False)
  out = tmp_path / "out"
  m = tile_tiny(str(d / "*.svs"), None, out)
  assert {s["slide"]: s["reason"] for s in m["skipped"]["slides"]} == {
      "copying": "corrupt_or_truncated", "locked": "permission_denied"}
  # Unchanged files: the truncated one stays skipped; the permission error is retried.
  m = tile_tiny(str(d / "*.svs"), None, out)
  assert m["counts"]["slides_resumed"] == 1
  # The copy completes and the permission is fixed: both are tiled.
  (d / "copying.svs").write_bytes(good)
  monkeypatch.undo()
  m = tile_tiny(str(d / "*.svs"), None, out)
  assert m["counts"]["slides_tiled"] == 2 and m["counts"]["slides_resumed"] == 0
  # --retry-skipped retries skips whose file did not change.
  synth_blank = tmp_path / "blank"
  from pathjax.wsi import synth
  synth_blank.mkdir()
  synth.write_synthetic_slide(str(synth_blank / "blank.svs"), width=1024, seed=2, tissue_fraction=0.0)
  m = tile_tiny(str(synth_blank / "*.svs"), None, tmp_path / "out_blank")
  assert m["skipped"]["slides_by_reason"] == {"no_tissue": 1}
  assert tile_tiny(str(synth_blank / "*.svs"), None, tmp_path / "out_blank")["counts"]["slides_resumed"] == 1
  m = tile_tiny(str(synth_blank / "*.svs"), None, tmp_path / "out_blank", retry_skipped=True)
  assert m["counts"]["slides_resumed"] == 0 and m["skipped"]["slides_by_reason"] == {"no_tissue": 1}


def test_missing_file_and_permission_are_not_corrupt(tiny_slides, tmp_path, monkeypatch):
  with pytest.raises(slide_lib.MissingFileError, match="no such file"):
    slide_lib.open_slide(str(tmp_path / "gone.svs"))
  monkeypatch.setattr(slide_lib, "open", lambda *a, **k: (_ for _ in ()).throw(
      PermissionError(errno.EACCES, "Permission denied")), raising=False)
  with pytest.raises(slide_lib.PermissionDeniedError, match="permission denied") as e:
    slide_lib.open_slide(tiny_slides.slide_paths[0])
  assert e.value.reason == "permission_denied"
  monkeypatch.undo()
  # A slide deleted between the listing and its turn.
  path = tmp_path / "vanishing.svs"
  shutil.copy(tiny_slides.slide_paths[0], path)
  refs = tile.plan_slides([str(path)])
  os.remove(path)
  r = tile.tile_slide(refs[0], str(tmp_path / "out"), _opts(), {})
  assert r["status"] == "skipped" and r["reason"] == "missing_file"


def test_changed_captions_are_applied_on_rerun(tiny_slides, tmp_path):
  out = tmp_path / "out"
  tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, out)
  lines = [json.loads(l) for l in open(tiny_slides.captions_path)]
  for l in lines:
    if l["slide"] == "synth-001":
      l["caption"] = "REVISED " + l["caption"]
  new = tmp_path / "captions2.jsonl"
  new.write_text("".join(json.dumps(l) + "\n" for l in lines))
  m = tile_tiny(tiny_slides.slide_paths, str(new), out)
  assert m["counts"]["slides_resumed"] == 2 and m["options"]["captions"] == str(new)
  source, _ = records.open_records(str(out))
  for i in range(len(source)):
    bag = source.bag(i)
    revised = [p.caption.startswith("REVISED ") for p in bag.patches]
    assert all(revised) if bag.slide_id == "synth-001" else not any(revised)


def test_caption_problems_counted(tiny_slides, tmp_path):
  lines = open(tiny_slides.captions_path, "rb").read().splitlines()
  extra = [b'{"slide": "not-a-slide", "magnification": 5, "x": 0, "y": 0, "caption": "orphan"}',
           b'{"slide": "not-a-slide", "magnification": 10, "x": 0, "y": 0, "caption": "orphan"}',
           b'{"slide": "synth-000", "magnification": 5, "x": 99999, "y": 0, "caption": "bad \\ud800 text"}']
  path = tmp_path / "captions.jsonl"
  path.write_bytes(b"\n".join(lines + extra) + b"\n")
  m = tile_tiny(tiny_slides.slide_paths, str(path), tmp_path / "out")
  assert m["counts"]["slides_tiled"] == 3  # the bad line costs only itself
  assert m["counts"]["captions_unknown_slide"] == 2 and m["captions"]["unknown_slides"] == ["not-a-slide"]
  reference = tile_tiny(tiny_slides.slide_paths, tiny_slides.captions_path, tmp_path / "ref")
  assert m["counts"]["captions_unmatched"] == reference["counts"]["captions_unmatched"] + 2
  issues = [json.loads(l) for l in open(tmp_path / "out" / "caption_issues.jsonl")]
  assert [(i["line"], i["kind"]) for i in issues] == [(len(lines) + 3, "invalid_unicode")]
  assert "surrogate" in issues[0]["message"]


def test_records_dir_missing_is_not_an_interrupted_tile(tmp_path, capsys):
  with pytest.raises(records.RecordsDirNotFoundError, match="does not exist"):
    records.open_records(str(tmp_path / "nope"))
  (tmp_path / "half").mkdir()
  with pytest.raises(records.IncompleteRecordsError, match="interrupted"):
    records.open_records(str(tmp_path / "half"))
  assert cli.main(["inspect", str(tmp_path / "nope")]) == 1
  err = capsys.readouterr().err
  assert "does not exist" in err and "interrupted" not in err


@pytest.mark.parametrize("args, message", [
    (["--jpeg-quality", "500"], "--jpeg-quality must be an integer from 1 to 100"),
    (["--magnification-override", "-5"], "--magnification-override must be a positive"),
    (["--magnifications", "5,x"], "--magnifications"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_bad_arguments_exit_2_one_line(tiny_slides, tmp_path, capsys, args, message):
  out = tmp_path / "out"
  code = cli.main(["tile", "--slides", tiny_slides.slide_paths[0], "--out", str(out), "--no-progress", *args])
  err = capsys.readouterr().err
  assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert not out.exists()


def test_bad_paths_exit_2(tiny_slides, tmp_path, capsys):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  for args, message in ((["--out", str(a_file)], "is an existing file"),
                        (["--out", str(tmp_path / "o"), "--captions", str(tmp_path)], "is a directory"),
                        (["--out", str(tmp_path / "o"), "--captions", str(tmp_path / "none.jsonl")], "does not exist")):
    code = cli.main(["tile", "--slides", tiny_slides.slide_paths[0], "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
