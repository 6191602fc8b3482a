"""Slides -> multi-resolution bag records (one ArrayRecord shard pair per slide) + manifest.

`tile_slides(slide_paths, captions_path, out_dir, ...)` is the library entry point behind
`pathjax tile`. It is three steps that every runner shares:

1. **plan** (`plan_slides`): list the slides, give each its id (file name without
   extension) and refuse ids that collide, raw or after sanitising to a file name;
2. **tile** (`tile_slide`, the idempotent per-slide unit): a slide with a valid done marker
   is returned as it is; otherwise open and validate the slide, check that it reaches the
   highest requested magnification, build a thumbnail tissue mask, and make a bag of every
   root patch (lowest magnification) whose tissue fraction reaches the threshold. Each bag
   is read one magnification at a time (the whole root region at once from the best
   pyramid level, then cut into its patches), JPEG-encoded, joined with its captions, and
   written as one `pathjax.input.schema.Bag` record plus one JPEG record per patch. The
   local process pool runs it here; `pathjax.input.tile_beam` runs it on Apache Beam.
3. **finalise** (`finalise`): gather the markers, remove stale temporaries, write
   `caption_issues.jsonl` and `manifest.json`.

Idempotent and safe when two attempts of one slide run at once on different hosts: a
slide's shard pair `bags-<slide>.array_record` and `pixels-<slide>.array_record`
(records.write_slide_shards) is written under temporary names unique to host, process and
attempt (storage.unique_tmp) and renamed; the content is the same whoever wins; the done
marker `.tile/done/<slide>.json` comes last and names the slide by its id and file name,
never by an absolute path. For an object store (`gs://`, `s3://`: pathjax.input.storage)
shards are written to local scratch and uploaded, the marker last.

Errors: a problem that belongs to the slide (corrupt or truncated file, no tissue,
unsupported format, missing magnification, permission denied, missing file) is a counted
skip with its reason; transient I/O errors (EIO, timeouts, a full disk) are retried in
place (`RETRY_ATTEMPTS`) and then raised, so a runner can retry the slide and a local run
reports it as failed and exits non-zero without writing a manifest. A worker process that
dies (out-of-memory kill) is replaced; the slides it held are retried, each alone, and only
a slide that kills a worker twice is skipped (`worker_died`).

Reruns: a slide with a valid marker is not redone unless the options, its file (name,
size, mtime) or its captions changed (captions are applied, never kept stale); skipped
slides are retried when the file changed, always for `permission_denied`, `missing_file`
and `worker_died`, and all of them with `retry_skipped=True`. `manifest.json` is removed
at the start of a run and written last, so a reader (`records.open_records`) refuses a
directory whose run has not finished.

Nothing is lost silently: every skipped slide and bag is counted with its reason in the
manifest, as are patches without a caption, captions naming no slide and caption-file
issues (all of them, with line numbers, in `caption_issues.jsonl`).

Why ArrayRecord directly rather than a TFDS builder (`pathjax bench tiling --serialization`
measures it): serializing one 85-patch bag of JPEG bytes took about 0.3-6 ms with msgpack
(schema.encode_bag) against 8-16 ms through a TFDS FeaturesDict, and 5-8 s when the bag
holds raw uint8 pixels (measured on the 2-core build machine, November 2026); records.py
writes msgpack records with array_record directly and needs no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from concurrent import futures
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

import pathjax
from pathjax.input import captions as captions_lib
from pathjax.input import keywords as keywords_lib
from pathjax.input import records, schema, storage
from pathjax.wsi import grid as grid_lib
from pathjax.wsi import slide as slide_lib
from pathjax.wsi import tissue as tissue_lib

STATE_DIR = ".tile"
CAPTION_ISSUES = "caption_issues.jsonl"
# Transient errors are retried in place this many times in all (with backoff), then raised.
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0
# Skips that are not about the file's content: retried on every rerun.
ALWAYS_RETRY = frozenset({"permission_denied", "missing_file", "worker_died"})


class TileError(ValueError):
  """Arguments or slide lists that cannot be tiled as given (the CLI exits 2)."""


class TileIncompleteError(RuntimeError):
  """Slides failed for reasons outside the slide (I/O, a full disk); no manifest was written.

  `failed` lists {"slide_id", "path", "reason", "message"}; `results` holds the slides that
  finished (their markers are on disk), so a rerun with the same --out only does the rest.
  """

  def __init__(self, message: str, failed: list[dict], results: dict[str, dict]):
    super().__init__(message)
    self.failed = failed
    self.results = results


@dataclasses.dataclass(frozen=True)
class SlideRef:
  """A slide as the plan names it: its id (the key of captions, shards and markers) and path
  (a local path or a URL)."""
  slide_id: str
  path: str


@dataclasses.dataclass(frozen=True)
class TileOptions:
  magnifications: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
  patch_size: int = 224
  tissue_threshold: float = 0.5
  magnification_override: float | None = None
  jpeg_quality: int = 90
  mask_pixels_per_leaf: int = 4

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["magnifications"] = list(self.magnifications)
    return d


def safe_name(slide_id: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", slide_id)


def shard_name(slide_id: str) -> str:
  return f"{records.BAG_PREFIX}{safe_name(slide_id)}.array_record"


def _normalise(path: str) -> str:
  return path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(storage.local_path(path)))


def expand_slides(pattern_or_paths: str | Sequence[str]) -> list[str]:
  """A glob (or several) -> sorted unique slide files; URLs (gs://, s3://) are globbed too."""
  patterns = [pattern_or_paths] if isinstance(pattern_or_paths, str) else list(pattern_or_paths)
  paths: list[str] = []
  for p in patterns:
    if storage.has_magic(p):
      paths += storage.glob_files(p)
    elif not storage.isdir(p):
      paths.append(p)  # a named file, even a missing one: it is then a counted skip
  return sorted(dict.fromkeys(_normalise(p) for p in paths))


def plan_slides(paths: Sequence[str]) -> list[SlideRef]:
  """Slides -> refs, sorted by path; refuses two slides whose ids (or file names) collide.

  Shards and markers are named by the sanitised id, captions are keyed by the raw id: two
  slides sharing either would overwrite each other's records, so both paths are named.
  """
  refs = [SlideRef(slide_lib.slide_id_from_path(storage.basename(p)), p)
          for p in sorted(dict.fromkeys(_normalise(p) for p in paths))]
  seen: dict[str, SlideRef] = {}
  for r in refs:
    name = safe_name(r.slide_id)
    if name in seen:
      other = seen[name]
      how = ("the same slide id" if other.slide_id == r.slide_id
             else f"slide ids {other.slide_id!r} and {r.slide_id!r}, which map to the same file name {name!r}")
      raise TileError(
          f"{other.path} and {r.path} have {how}: captions, shards and markers are keyed by "
          "slide id, so one would overwrite the other; rename one of the files (or tile them "
          "into different --out directories)")
    seen[name] = r
  return refs


# ---------------------------------------------------------------------------------------
# One slide (runs in a worker)


def _encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _make_bag(slide, tmap, x, y, extent, opts: TileOptions, captions: dict, bag_index: int,
              stats: dict) -> schema.Bag:
  layout = grid_lib.bag_layout(x, y, extent, opts.magnifications)
  patches: list[schema.Patch] = []
  ps = opts.patch_size
  # Read each level's whole root region once at that magnification, then cut it up.
  level_arrays = {}
  for level, mag in enumerate(opts.magnifications):
    n = int(round(np.sqrt(grid_lib.bags_per_level(opts.magnifications)[level])))
    level_arrays[level] = (n, slide.read_region(x, y, extent, ps * n))
  level_origin = {}
  for i, gp in enumerate(layout):
    level_origin.setdefault(gp.level, i)
  for i, gp in enumerate(layout):
    n, arr = level_arrays[gp.level]
    j = i - level_origin[gp.level]
    r, c = divmod(j, n)
    pix = np.ascontiguousarray(arr[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps])
    entry = captions.get(captions_lib.make_key(slide.slide_id, gp.magnification, gp.x, gp.y))
    if entry is None:
      stats["captions_missing"] += 1
      stats["captions_missing_per_magnification"][f"{gp.magnification:g}"] += 1
      caption, has, kws, label = "", False, [], ""
    else:
      caption, has = entry.caption, True
      kws = list(entry.keywords) if entry.keywords is not None else keywords_lib.extract_keywords(caption)
      label = entry.label or ""
      stats["captions_matched"] += 1
    patches.append(schema.Patch(
        level=gp.level, magnification=gp.magnification, x=gp.x, y=gp.y, extent=gp.extent,
        tissue=round(tmap.fraction(gp.x, gp.y, gp.extent), 4), jpeg=_encode_jpeg(pix, opts.jpeg_quality),
        parent=gp.parent, caption=caption, has_caption=has, keywords=kws, label=label))
  return schema.Bag(
      slide_id=slide.slide_id, bag_index=bag_index, mpp=float(slide.mpp), patch_size=ps,
      magnifications=list(opts.magnifications), patches=patches,
      keywords=keywords_lib.bag_keywords([p.keywords for p in patches]))


def _marker_path(out_dir: str, slide_id: str) -> str:
  return storage.join(out_dir, STATE_DIR, "done", f"{safe_name(slide_id)}.json")


def _write_marker(out_dir: str, stats: dict) -> None:
  path = _marker_path(out_dir, stats["slide_id"])
  storage.makedirs(path.rsplit("/", 1)[0] if storage.is_remote(path) else os.path.dirname(path))
  storage.write_text_atomic(path, json.dumps(stats, indent=1, sort_keys=True))


def read_marker(out_dir: str, slide_id: str) -> dict | None:
  try:
    return json.loads(storage.read_text(_marker_path(out_dir, slide_id)))
  except (OSError, ValueError):
    return None


def _source_info(path: str) -> dict[str, Any] | None:
  info = storage.info(path)
  return None if info is None else {"file": storage.basename(path), **info}


def _marker_is_current(out_dir: str, marker: dict | None, ref: SlideRef, opts: TileOptions,
                       source: dict | None, captions_digest: str, retry_skipped: bool) -> bool:
  """Whether `marker` still describes what tiling `ref` now would produce (see module doc)."""
  if not marker or marker.get("options") != opts.to_json() or marker.get("slide_id") != ref.slide_id:
    return False
  if marker.get("source") != source:  # another file, or the file changed (size, mtime)
    return False
  if marker.get("status") == "skipped":
    return not retry_skipped and marker.get("reason") not in ALWAYS_RETRY
  if marker.get("status") != "done" or marker.get("captions_digest") != captions_digest:
    return False
  shard = storage.join(out_dir, marker.get("shard") or "")
  for path_, size in ((shard, marker.get("shard_bytes")), (records.pixels_path(shard), marker.get("pixel_bytes"))):
    info = storage.info(path_)
    if info is None or info["size"] != size:
      return False
  return True


def tile_slide(ref: SlideRef, out_dir: str, opts: TileOptions, captions: dict, *,
               retry_skipped: bool = False) -> dict[str, Any]:
  """The idempotent per-slide unit: the slide's current marker, or a fresh tiling of it.

  Returns the marker dict with `resumed` set. Skips (bad slides) return a skipped marker;
  transient errors raise (see `tile_slide_with_retries`).
  """
  source = _source_info(ref.path)
  digest = captions_lib.digest(captions)
  marker = read_marker(out_dir, ref.slide_id)
  if _marker_is_current(out_dir, marker, ref, opts, source, digest, retry_skipped):
    return {**marker, "resumed": True}
  stats = tile_one_slide(ref, out_dir, opts, captions, source=source, captions_digest=digest)
  return {**stats, "resumed": False}


def tile_slide_with_retries(ref: SlideRef, out_dir: str, opts: TileOptions, captions: dict, *,
                            retry_skipped: bool = False, attempts: int | None = None) -> dict[str, Any]:
  """`tile_slide`, retrying transient errors (I/O, timeouts) with backoff, then raising."""
  attempts = RETRY_ATTEMPTS if attempts is None else attempts
  for attempt in range(attempts):
    try:
      return tile_slide(ref, out_dir, opts, captions, retry_skipped=retry_skipped)
    except Exception as e:
      if not slide_lib.is_transient(e) or attempt + 1 >= attempts:
        raise
      print(f"pathjax tile: {ref.path}: {type(e).__name__}: {e}; retrying ({attempt + 2}/{attempts})",
            file=sys.stderr)
      time.sleep(RETRY_BACKOFF_S * 2 ** attempt)
  raise AssertionError("unreachable")


def _local_slide(path: str, scratch: str) -> str:
  """A local path for the slide: itself, or a copy in `scratch` of a remote one."""
  if not storage.is_remote(path):
    return storage.local_path(path)
  local = os.path.join(scratch, storage.basename(path))
  storage.get_file(path, local)
  return local


def tile_one_slide(ref: SlideRef | str, out_dir: str, opts: TileOptions, captions: dict, *,
                   source: dict | None = None, captions_digest: str | None = None) -> dict[str, Any]:
  """Tiles one slide into its shard pair and writes its done marker; returns the marker dict.

  A bad slide is a `status: skipped` marker with the reason; transient errors raise.
  """
  if isinstance(ref, str):
    ref = SlideRef(slide_lib.slide_id_from_path(storage.basename(ref)), _normalise(ref))
  source = _source_info(ref.path) if source is None else source
  captions_digest = captions_lib.digest(captions) if captions_digest is None else captions_digest
  t0 = time.perf_counter()
  mags = opts.magnifications
  stats: dict[str, Any] = {
      "slide_id": ref.slide_id, "source": source, "captions_digest": captions_digest,
      "status": "done", "shard": None, "bags": 0,
      "patches_per_magnification": {f"{m:g}": 0 for m in mags},
      "captions_missing": 0, "captions_missing_per_magnification": {f"{m:g}": 0 for m in mags},
      "captions_matched": 0, "captions_for_slide": len(captions), "bags_skipped": {},
      "roots": 0, "roots_below_threshold": 0, "options": opts.to_json(),
  }
  if source is None:
    return _finish_skipped(out_dir, stats, "missing_file",
                           f"{ref.path}: no such file (moved or deleted after the slide list was made?)", t0)
  scratch = tempfile.mkdtemp(prefix="pathjax-tile-")
  try:
    return _tile_opened(ref, _local_slide(ref.path, scratch), out_dir, opts, captions, stats, t0, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _skip_for(e: Exception, path: str) -> tuple[str, str]:
  """(reason, message) for an error that belongs to the slide; transient errors re-raise."""
  if isinstance(e, slide_lib.SlideError):
    return e.reason, str(e)
  if slide_lib.is_transient(e):
    raise e
  return "error", f"{path}: {type(e).__name__}: {e}"


def _tile_opened(ref, local, out_dir, opts, captions, stats, t0, scratch):
  mags = opts.magnifications
  path = ref.path
  try:
    slide = slide_lib.open_slide(local, magnification_override=opts.magnification_override)
  except Exception as e:  # anything unexpected still only skips this slide
    reason, message = _skip_for(e, path)
    return _finish_skipped(out_dir, stats, reason, message.replace(local, path), t0)
  with slide:
    stats.update(magnification=slide.magnification, magnification_source=slide.magnification_source,
                 mpp=slide.mpp, mpp_known=slide.mpp_known, dimensions=list(slide.dimensions))
    try:
      slide.check_magnification(max(mags))
      extent = grid_lib.root_extent(slide.magnification, mags, opts.patch_size)
      leaf = extent / np.prod(grid_lib.split_factors(mags)) if len(mags) > 1 else extent
      tmap = tissue_lib.slide_tissue_map(slide, leaf, pixels_per_leaf=opts.mask_pixels_per_leaf)
    except Exception as e:
      reason, message = _skip_for(e, path)
      return _finish_skipped(out_dir, stats, reason, message.replace(local, path), t0)
    roots = grid_lib.root_positions(*slide.dimensions, extent)
    stats["roots"] = len(roots)
    stats["root_extent"] = extent
    chosen = []
    for x, y in roots:
      if tmap.fraction(x, y, extent) >= opts.tissue_threshold:
        chosen.append((x, y))
    stats["roots_below_threshold"] = len(roots) - len(chosen)
    if not roots:
      return _finish_skipped(out_dir, stats, "smaller_than_one_bag",
                             f"{path}: slide {slide.dimensions} is smaller than one root patch "
                             f"({extent} level-0 px)", t0)
    if not chosen:
      return _finish_skipped(out_dir, stats, "no_tissue",
                             f"{path}: no root patch reaches tissue fraction {opts.tissue_threshold} "
                             f"({len(roots)} roots; the slide is background)", t0)
    bag_errors: list[str] = []

    def bags() -> Iterable[schema.Bag]:
      for x, y in chosen:
        bag_stats = {"captions_missing": 0, "captions_matched": 0,
                     "captions_missing_per_magnification": {f"{m:g}": 0 for m in mags}}
        try:
          bag = _make_bag(slide, tmap, x, y, extent, opts, captions, stats["bags"], bag_stats)
        except slide_lib.SlideError as e:
          stats["bags_skipped"][e.reason] = stats["bags_skipped"].get(e.reason, 0) + 1
          bag_errors.append(f"bag at ({x}, {y}): {str(e).replace(local, path)}")
          continue
        stats["bags"] += 1
        stats["captions_missing"] += bag_stats["captions_missing"]
        stats["captions_matched"] += bag_stats["captions_matched"]
        for m, c in bag_stats["captions_missing_per_magnification"].items():
          stats["captions_missing_per_magnification"][m] += c
        for p in bag.patches:
          stats["patches_per_magnification"][f"{p.magnification:g}"] += 1
        yield bag

    gen = bags()
    first = next(gen, None)
    if first is None:
      return _finish_skipped(out_dir, stats, "all_bags_unreadable",
                             f"{path}: every bag failed: {bag_errors[:3]}", t0)

    def chain():
      yield first
      yield from gen

    name = shard_name(ref.slide_id)
    if storage.is_remote(out_dir):  # local scratch, then upload: pixels, bags, marker last
      local_shard = os.path.join(scratch, name)
      written = records.write_slide_shards(local_shard, chain())
      storage.put_file(records.pixels_path(local_shard), records.pixels_path(storage.join(out_dir, name)))
      storage.put_file(local_shard, storage.join(out_dir, name))
    else:
      written = records.write_slide_shards(os.path.join(storage.local_path(out_dir), name), chain())
    stats["shard"] = name
    stats["shard_bytes"] = written["bag_bytes"]
    stats["pixel_bytes"] = written["pixel_bytes"]
    stats["records"] = written["bags"]
    stats["bag_errors"] = bag_errors[:20]
  stats["seconds"] = round(time.perf_counter() - t0, 3)
  _write_marker(out_dir, stats)
  return stats


def _finish_skipped(out_dir, stats, reason, message, t0):
  stats.update(status="skipped", reason=reason, message=message,
               seconds=round(time.perf_counter() - t0, 3))
  _write_marker(out_dir, stats)
  return stats


# ---------------------------------------------------------------------------------------
# The local process pool


def _watch_parent(parent_pid: int) -> None:
  """Worker initializer: exit as soon as the parent dies (kill -9 leaves no orphans working)."""

  def watch():
    while True:
      if os.getppid() != parent_pid:
        os._exit(1)
      time.sleep(0.5)

  threading.Thread(target=watch, daemon=True, name="pathjax-parent-watch").start()


def make_pool(workers: int) -> futures.ProcessPoolExecutor:
  import multiprocessing as mp
  ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (jax, zarr)
  return futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=_watch_parent, initargs=(os.getpid(),))


def _job(args) -> dict[str, Any]:
  """What a pool worker runs for one slide. Transient errors come back as exceptions."""
  ref, out_dir, opts, captions, retry_skipped, slide_fn = args
  try:
    return slide_fn(ref, out_dir, opts, captions, retry_skipped=retry_skipped)
  except Exception as e:
    if slide_lib.is_transient(e):
      raise
    # A bug, not a bad slide: report it as a skip with the traceback.
    return {"slide_id": ref.slide_id, "status": "skipped", "reason": "error",
            "message": f"{ref.path}: {type(e).__name__}: {e}", "traceback": traceback.format_exc(),
            "options": opts.to_json(), "resumed": False}


def _failure(ref: SlideRef, e: BaseException) -> dict[str, Any]:
  import errno as errno_lib
  reason = "disk_full" if getattr(e, "errno", None) == errno_lib.ENOSPC else "io_error"
  return {"slide_id": ref.slide_id, "path": ref.path, "status": "failed", "reason": reason,
          "message": f"{type(e).__name__}: {e}"}


def _worker_died(ref: SlideRef, out_dir: str, opts: TileOptions) -> dict[str, Any]:
  stats = {"slide_id": ref.slide_id, "source": _source_info(ref.path), "status": "skipped",
           "reason": "worker_died", "options": opts.to_json(), "resumed": False,
           "message": f"{ref.path}: the worker process tiling this slide died twice (killed, e.g. "
                      "by the out-of-memory killer); rerun with fewer --workers or more memory: "
                      "the slide is retried"}
  _write_marker(out_dir, stats)
  return stats


def _run_pool(jobs: list[tuple], workers: int, on_result: Callable[[SlideRef, dict], None]) -> None:
  """Runs jobs on `workers` processes, at most one slide in flight per worker.

  A dead worker breaks the pool: the pool is replaced and the slides then in flight become
  suspects, each retried alone in a fresh process; a suspect that dies again is skipped.
  """
  pending = list(jobs)
  suspects: list[tuple] = []
  while pending:
    pool = make_pool(min(workers, len(pending)))
    inflight: dict[futures.Future, tuple] = {}
    broken = False
    try:
      while (pending or inflight) and not broken:
        while pending and len(inflight) < workers:
          try:
            inflight[pool.submit(_job, pending[0])] = pending[0]
          except futures.process.BrokenProcessPool:
            break  # a worker died meanwhile; the futures in flight say which
          pending.pop(0)
        done, _ = futures.wait(inflight, return_when=futures.FIRST_COMPLETED)
        for fut in done:
          job = inflight.pop(fut)
          try:
            on_result(job[0], fut.result())
          except futures.process.BrokenProcessPool:
            broken = True
            suspects.append(job)
          except Exception as e:  # a transient error that outlived its retries
            on_result(job[0], _failure(job[0], e))
      for fut, job in inflight.items():  # broken: whatever was still in flight is suspect
        suspects.append(job)
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
  for job in suspects:
    pool = make_pool(1)
    try:
      on_result(job[0], pool.submit(_job, job).result())
    except futures.process.BrokenProcessPool:
      on_result(job[0], _worker_died(job[0], job[1], job[2]))
    except Exception as e:
      on_result(job[0], _failure(job[0], e))
    finally:
      pool.shutdown(wait=True, cancel_futures=True)


def _run_local(refs, out_dir, opts, caption_index, workers, retry_skipped, progress,
               slide_fn) -> dict[str, dict]:
  by_id: dict[str, dict] = {r.slide_id: {} for r in refs}
  for key, entry in caption_index.entries.items():
    if key[0] in by_id:
      by_id[key[0]][key] = entry
  jobs = [(r, out_dir, opts, by_id[r.slide_id], retry_skipped, slide_fn) for r in refs]
  results: dict[str, dict] = {}
  bar = None
  if progress and jobs:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="tiling slides", unit="slide", file=sys.stderr)

  def on_result(ref, result):
    results[ref.slide_id] = result
    if bar:
      bar.update(1)

  try:
    if workers <= 1 or len(jobs) <= 1:
      for job in jobs:
        try:
          on_result(job[0], _job(job))
        except Exception as e:
          if not slide_lib.is_transient(e):
            raise
          on_result(job[0], _failure(job[0], e))
    else:
      _run_pool(jobs, workers, on_result)
  finally:
    if bar:
      bar.close()
  return results


# ---------------------------------------------------------------------------------------
# Plan, run, finalise


def make_options(magnifications: Sequence[float] | str = (5, 10, 20, 40), patch_size: int = 224,
                 tissue_threshold: float = 0.5, magnification_override: float | None = None,
                 jpeg_quality: int = 90) -> TileOptions:
  """Validated options; a bad value raises TileError naming the argument."""
  try:
    mags = grid_lib.parse_magnifications(magnifications)
  except grid_lib.GridError as e:
    raise TileError(f"--magnifications: {e}") from e
  if patch_size < 8:
    raise TileError(f"--patch-size must be >= 8, got {patch_size}")
  if not 0 <= tissue_threshold <= 1:
    raise TileError(f"--tissue-threshold must be in [0, 1], got {tissue_threshold}")
  if not 1 <= int(jpeg_quality) <= 100 or int(jpeg_quality) != jpeg_quality:
    raise TileError(f"--jpeg-quality must be an integer from 1 to 100 (PIL's JPEG scale), got {jpeg_quality}")
  if magnification_override is not None and not (np.isfinite(magnification_override) and magnification_override > 0):
    raise TileError(f"--magnification-override must be a positive objective power (e.g. 40), "
                    f"got {magnification_override}")
  return TileOptions(magnifications=mags, patch_size=int(patch_size), tissue_threshold=float(tissue_threshold),
                     magnification_override=None if magnification_override is None else float(magnification_override),
                     jpeg_quality=int(jpeg_quality))


def tile_slides(slide_paths: Sequence[str] | str, captions_path: str | None, out_dir: str, *,
                magnifications: Sequence[float] | str = (5, 10, 20, 40), patch_size: int = 224,
                tissue_threshold: float = 0.5, workers: int = 1,
                magnification_override: float | None = None, jpeg_quality: int = 90,
                progress: bool = True, runner: str = "local", beam_args: Sequence[str] = (),
                retry_skipped: bool = False, slide_fn: Callable[..., dict] | None = None) -> dict[str, Any]:
  """Tiles slides into `out_dir` and returns the manifest (also written as manifest.json).

  `slide_paths` is a list of files or a glob (local paths or URLs). `captions_path` may be
  None (every caption is then missing, and counted). `runner` is "local" (a process pool of
  `workers`) or "beam" (pathjax.input.tile_beam; `beam_args` are Beam pipeline options).
  Raises TileError for bad arguments and TileIncompleteError when slides failed for
  transient reasons (rerun to finish them). Resumable: see the module doc.
  """
  t0 = time.perf_counter()
  opts = make_options(magnifications, patch_size, tissue_threshold, magnification_override, jpeg_quality)
  if runner not in ("local", "beam"):
    raise TileError(f"--runner must be 'local' or 'beam', got {runner!r}")
  paths = expand_slides(slide_paths) if isinstance(slide_paths, str) else list(slide_paths)
  refs = plan_slides(paths)
  if storage.exists(out_dir) and not storage.isdir(out_dir):
    raise TileError(f"--out {out_dir} is an existing file, not a directory; choose another --out")
  if captions_path is not None and storage.isdir(captions_path):
    raise TileError(f"--captions {captions_path} is a directory; pass the captions JSON-lines file")
  if captions_path is not None and not storage.exists(captions_path):
    raise TileError(f"--captions {captions_path} does not exist")
  storage.makedirs(out_dir)
  # The manifest goes first and comes back last: readers refuse the directory meanwhile.
  manifest_path = storage.join(out_dir, records.MANIFEST)
  if storage.exists(manifest_path):
    storage.remove(manifest_path)

  if runner == "beam":
    from pathjax.input import tile_beam
    if slide_fn is not None:
      raise TileError("slide_fn is for the local runner")
    try:
      run = tile_beam.run(refs, captions_path, out_dir, opts, workers=workers, beam_args=beam_args,
                          retry_skipped=retry_skipped)
    except TileError:
      raise
    except Exception as e:  # the runner gave up on a slide (its retries are spent) or its setup failed
      lines = [l for l in str(e).strip().splitlines() if l.strip()] or [type(e).__name__]
      raise TileIncompleteError(
          f"the Beam pipeline failed: {lines[-1][:800]}. Slides that finished are kept: rerun with "
          "the same --out to finish", [], {}) from e
    results, captions = run["results"], run["captions"]
  else:
    caption_index = captions_lib.load_captions(captions_path) if captions_path else captions_lib.empty_index()
    results = _run_local(refs, out_dir, opts, caption_index, workers, retry_skipped, progress,
                         slide_fn or tile_slide_with_retries)
    ids = {r.slide_id for r in refs}
    unknown = sorted({k[0] for k in caption_index.entries if k[0] not in ids})
    captions = {"path": captions_path, "lines": caption_index.lines, "entries": len(caption_index.entries),
                "issues": [i.to_json() for i in caption_index.issues],
                "unknown_slide_entries": sum(1 for k in caption_index.entries if k[0] not in ids),
                "unknown_slides": unknown}
  return finalise(out_dir, refs, results, opts, captions, seconds=time.perf_counter() - t0,
                  slides_pattern=slide_paths if isinstance(slide_paths, str) else None)


def _remove_stale_temporaries(out_dir: str) -> None:
  """Temporaries of killed attempts; called when every attempt of this run has ended."""
  for d in (out_dir, storage.join(out_dir, STATE_DIR, "done")):
    for name in storage.listdir(d):
      if storage.TMP_MARK in name:
        try:
          storage.remove(storage.join(d, name))
        except FileNotFoundError:
          pass


def finalise(out_dir: str, refs: Sequence[SlideRef], results: dict[str, dict], opts: TileOptions,
             captions: dict[str, Any], seconds: float, slides_pattern: str | None = None) -> dict[str, Any]:
  """Cleans temporaries, writes caption_issues.jsonl and (if no slide failed) manifest.json.

  `results` maps slide id -> marker (or a `failed` record); `captions` holds the caption
  file's path, line and entry counts, issues, and the entries naming no slide.
  """
  _remove_stale_temporaries(out_dir)
  issues = sorted(captions["issues"], key=lambda i: i["line"])
  storage.write_text_atomic(storage.join(out_dir, CAPTION_ISSUES), "".join(json.dumps(i) + "\n" for i in issues))
  failed = [{"slide_id": r.slide_id, "path": r.path, "reason": results[r.slide_id].get("reason"),
             "message": results[r.slide_id].get("message", "")}
            for r in refs if results.get(r.slide_id, {}).get("status") not in ("done", "skipped")]
  done = {sid: r for sid, r in results.items() if r.get("status") in ("done", "skipped")}
  if failed:
    raise TileIncompleteError(
        f"{len(failed)} of {len(refs)} slide(s) failed for reasons outside the slide "
        f"({', '.join(sorted({f['reason'] for f in failed}))}); first: {failed[0]['path']}: "
        f"{failed[0]['message']}. The other slides are kept: rerun with the same --out to finish",
        failed, done)
  manifest = _build_manifest(refs, results, opts, captions, seconds)
  if slides_pattern is not None:
    manifest["options"]["slides"] = slides_pattern
  records.write_manifest(out_dir, manifest)
  return manifest


def _build_manifest(refs, results, opts, captions, seconds) -> dict[str, Any]:
  mags = [f"{m:g}" for m in opts.magnifications]
  counts = {
      "slides": len(refs), "slides_tiled": 0, "slides_skipped": 0,
      "slides_resumed": sum(1 for r in refs if results[r.slide_id].get("resumed")),
      "slides_worker_died": 0,
      "bags": 0, "patches": 0, "patches_per_magnification": {m: 0 for m in mags},
      "captions_missing": 0, "captions_missing_per_magnification": {m: 0 for m in mags},
      "captions_matched": 0, "captions_unmatched": captions["unknown_slide_entries"],
      "captions_unknown_slide": captions["unknown_slide_entries"], "bags_skipped": 0,
      "roots_below_threshold": 0,
  }
  skipped_slides, skipped_by_reason, bags_skipped_by_reason = [], {}, {}
  slides, shards = [], []
  for ref in refs:
    r = results[ref.slide_id]
    if r.get("status") == "done":
      counts["slides_tiled"] += 1
      counts["bags"] += r["bags"]
      for m in mags:
        counts["patches_per_magnification"][m] += r["patches_per_magnification"][m]
        counts["captions_missing_per_magnification"][m] += r["captions_missing_per_magnification"][m]
      counts["captions_missing"] += r["captions_missing"]
      counts["captions_matched"] += r["captions_matched"]
      counts["captions_unmatched"] += max(0, r["captions_for_slide"] - r["captions_matched"])
      counts["roots_below_threshold"] += r.get("roots_below_threshold", 0)
      for reason, c in r.get("bags_skipped", {}).items():
        bags_skipped_by_reason[reason] = bags_skipped_by_reason.get(reason, 0) + c
        counts["bags_skipped"] += c
      shards.append(r["shard"])
    else:
      counts["slides_skipped"] += 1
      reason = r.get("reason", "error")
      counts["slides_worker_died"] += reason == "worker_died"
      skipped_by_reason[reason] = skipped_by_reason.get(reason, 0) + 1
      skipped_slides.append({"slide": ref.slide_id, "path": ref.path, "reason": reason,
                             "message": r.get("message", "")})
    slides.append({"path": ref.path, **{k: r.get(k) for k in (
        "slide_id", "status", "reason", "shard", "bags", "magnification", "magnification_source",
        "mpp", "dimensions", "roots", "seconds") if k in r}})
  counts["patches"] = sum(counts["patches_per_magnification"].values())
  issues = sorted(captions["issues"], key=lambda i: i["line"])
  return {
      "pathjax_version": pathjax.__version__,
      "schema_version": schema.SCHEMA_VERSION,
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "options": {**opts.to_json(), "captions": captions["path"]},
      "counts": counts,
      "skipped": {"slides": skipped_slides, "slides_by_reason": skipped_by_reason,
                  "bags_by_reason": bags_skipped_by_reason},
      "captions": {**captions_lib.summarize(captions["path"], captions["lines"], captions["entries"],
                                            [captions_lib.CaptionIssue(**i) for i in issues]),
                   "unknown_slides": captions["unknown_slides"][:20],
                   "issues_file": CAPTION_ISSUES},
      "slides": slides,
      "shards": sorted(shards),
      "seconds": round(seconds, 3),
  }
