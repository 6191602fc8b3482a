"""Slides -> multi-resolution bag records (one ArrayRecord shard pair per slide) + manifest.

`tile_slides(slide_paths, captions_path, out_dir, ...)` is the library entry point behind
`pathjax tile`. Per slide (in a worker process when workers > 1; slides are opened inside
the worker): open and validate the slide, check that it reaches the highest requested
magnification, build a thumbnail tissue mask, and make a bag of every root patch (lowest
magnification) whose tissue fraction reaches the threshold. Each bag is read one
magnification at a time (the whole root region at once from the best pyramid level, then
cut into its patches), JPEG-encoded, joined with its captions, and written as one
`pathjax.input.schema.Bag` record plus one JPEG record per patch.

Resumable and atomic: a slide's shard pair `bags-<slide>.array_record` and
`pixels-<slide>.array_record` (records.write_slide_shards) is written under temporary names
and renamed, then a done marker `.tile/done/<slide>.json` records its counts and sizes. A
rerun with the same --out skips slides with a valid marker and does the rest;
`manifest.json` is removed at the start of a run and written last, so a reader
(`records.open_records`) refuses a directory whose run has not finished.

Nothing is lost silently: every skipped slide and bag is counted with its reason in the
manifest, as are patches without a caption and caption-file issues (all of them, with line
numbers, in `caption_issues.jsonl`).

Why ArrayRecord directly rather than a TFDS builder (`pathjax bench tiling --serialization`
measures it): serializing one 85-patch bag of JPEG bytes took about 0.3-6 ms with msgpack
(schema.encode_bag) against 8-16 ms through a TFDS FeaturesDict, and 5-8 s when the bag
holds raw uint8 pixels (measured on the 2-core build machine, November 2026); records.py
writes msgpack records with array_record directly and needs no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import io
import json
import os
import re
import sys
import time
import traceback
from concurrent import futures
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

import pathjax
from pathjax.input import captions as captions_lib
from pathjax.input import keywords as keywords_lib
from pathjax.input import records, schema
from pathjax.wsi import grid as grid_lib
from pathjax.wsi import slide as slide_lib
from pathjax.wsi import tissue as tissue_lib

STATE_DIR = ".tile"
CAPTION_ISSUES = "caption_issues.jsonl"


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


def expand_slides(pattern_or_paths: str | Sequence[str]) -> list[str]:
  """A glob (or several, comma-free list) -> sorted unique slide files."""
  patterns = [pattern_or_paths] if isinstance(pattern_or_paths, str) else list(pattern_or_paths)
  paths: list[str] = []
  for p in patterns:
    matches = glob_lib.glob(os.path.expanduser(p), recursive=True)
    paths += matches if matches or glob_lib.has_magic(p) else [p]
  return sorted(dict.fromkeys(os.path.abspath(p) for p in paths if not os.path.isdir(p)))


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


def tile_one_slide(path: str, out_dir: str, opts: TileOptions, captions: dict) -> dict[str, Any]:
  """Tiles one slide into its shard and writes its done marker; returns the marker dict.

  Never raises for a bad slide: the marker then says `status: skipped` with the reason.
  """
  t0 = time.perf_counter()
  slide_id = slide_lib.slide_id_from_path(path)
  mags = opts.magnifications
  stats: dict[str, Any] = {
      "slide_id": slide_id, "path": path, "status": "done", "shard": None, "bags": 0,
      "patches_per_magnification": {f"{m:g}": 0 for m in mags},
      "captions_missing": 0, "captions_missing_per_magnification": {f"{m:g}": 0 for m in mags},
      "captions_matched": 0, "captions_for_slide": len(captions), "bags_skipped": {},
      "roots": 0, "roots_below_threshold": 0, "options": opts.to_json(),
  }
  try:
    slide = slide_lib.open_slide(path, magnification_override=opts.magnification_override)
  except slide_lib.SlideError as e:
    return _finish_skipped(out_dir, stats, e.reason, str(e), t0)
  except Exception as e:  # anything unexpected still only skips this slide
    return _finish_skipped(out_dir, stats, "error", f"{type(e).__name__}: {e}", t0)
  with slide:
    stats.update(magnification=slide.magnification, magnification_source=slide.magnification_source,
                 mpp=slide.mpp, mpp_known=slide.mpp_known, dimensions=list(slide.dimensions))
    try:
      slide.check_magnification(max(mags))
      extent = grid_lib.root_extent(slide.magnification, mags, opts.patch_size)
      leaf = extent / np.prod(grid_lib.split_factors(mags)) if len(mags) > 1 else extent
      tmap = tissue_lib.slide_tissue_map(slide, leaf, pixels_per_leaf=opts.mask_pixels_per_leaf)
    except slide_lib.SlideError as e:
      return _finish_skipped(out_dir, stats, e.reason, str(e), t0)
    except Exception as e:
      return _finish_skipped(out_dir, stats, "error", f"{type(e).__name__}: {e}", t0)
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
          bag_errors.append(f"bag at ({x}, {y}): {e}")
          continue
        stats["bags"] += 1
        stats["captions_missing"] += bag_stats["captions_missing"]
        stats["captions_matched"] += bag_stats["captions_matched"]
        for m, c in bag_stats["captions_missing_per_magnification"].items():
          stats["captions_missing_per_magnification"][m] += c
        for p in bag.patches:
          stats["patches_per_magnification"][f"{p.magnification:g}"] += 1
        yield bag

    shard = os.path.join(out_dir, shard_name(slide_id))
    gen = bags()
    first = next(gen, None)
    if first is None:
      return _finish_skipped(out_dir, stats, "all_bags_unreadable",
                             f"{path}: every bag failed: {bag_errors[:3]}", t0)

    def chain():
      yield first
      yield from gen

    written = records.write_slide_shards(shard, chain())
    stats["shard"] = os.path.basename(shard)
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


def _marker_path(out_dir: str, slide_id: str) -> str:
  return os.path.join(out_dir, STATE_DIR, "done", f"{safe_name(slide_id)}.json")


def _write_marker(out_dir: str, stats: dict) -> None:
  os.makedirs(os.path.dirname(_marker_path(out_dir, stats["slide_id"])), exist_ok=True)
  records.atomic_write_text(_marker_path(out_dir, stats["slide_id"]), json.dumps(stats, indent=1))


def _read_valid_marker(out_dir: str, slide_id: str, path: str, opts: TileOptions) -> dict | None:
  """A finished slide's marker, or None if the slide must be (re)done."""
  mp = _marker_path(out_dir, slide_id)
  try:
    with open(mp, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if marker.get("options") != opts.to_json() or marker.get("path") != path:
    return None
  if marker.get("status") == "done":
    shard = os.path.join(out_dir, marker.get("shard") or "")
    for path_, size in ((shard, marker.get("shard_bytes")),
                        (records.pixels_path(shard), marker.get("pixel_bytes"))):
      if not os.path.isfile(path_) or os.path.getsize(path_) != size:
        return None
  return marker


def _worker(args):
  path, out_dir, opts, captions = args
  try:
    return tile_one_slide(path, out_dir, opts, captions)
  except Exception as e:  # a bug, not a bad slide: report it as a skip with the traceback
    stats = {"slide_id": slide_lib.slide_id_from_path(path), "path": path, "status": "skipped",
             "reason": "error", "message": f"{type(e).__name__}: {e}",
             "traceback": traceback.format_exc(), "options": opts.to_json()}
    return stats


# ---------------------------------------------------------------------------------------
# Many slides


def tile_slides(slide_paths: Sequence[str] | str, captions_path: str | None, out_dir: str, *,
                magnifications: Sequence[float] | str = (5, 10, 20, 40), patch_size: int = 224,
                tissue_threshold: float = 0.5, workers: int = 1,
                magnification_override: float | None = None, jpeg_quality: int = 90,
                progress: bool = True) -> dict[str, Any]:
  """Tiles slides into `out_dir` and returns the manifest (also written as manifest.json).

  `slide_paths` is a list of files or a glob. `captions_path` may be None (every caption is
  then missing, and counted). Resumable: see the module doc.
  """
  t0 = time.perf_counter()
  mags = grid_lib.parse_magnifications(magnifications)
  if patch_size < 8:
    raise ValueError(f"patch size must be >= 8, got {patch_size}")
  if not 0 <= tissue_threshold <= 1:
    raise ValueError(f"tissue threshold must be in [0, 1], got {tissue_threshold}")
  opts = TileOptions(magnifications=mags, patch_size=int(patch_size),
                     tissue_threshold=float(tissue_threshold),
                     magnification_override=None if magnification_override is None else float(magnification_override),
                     jpeg_quality=int(jpeg_quality))
  paths = expand_slides(slide_paths) if isinstance(slide_paths, str) else sorted(
      dict.fromkeys(os.path.abspath(p) for p in slide_paths))
  os.makedirs(out_dir, exist_ok=True)
  # The manifest goes first and comes back last: readers refuse the directory meanwhile.
  manifest_path = os.path.join(out_dir, records.MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  for prefix in (records.BAG_PREFIX, records.PIXEL_PREFIX):
    for stale in glob_lib.glob(os.path.join(out_dir, f"{prefix}*.array_record.tmp-*")):
      os.remove(stale)  # half-written shards of a killed run

  caption_index = captions_lib.load_captions(captions_path) if captions_path else captions_lib.empty_index()
  with open(os.path.join(out_dir, CAPTION_ISSUES + ".tmp"), "w", encoding="utf-8") as f:
    for issue in caption_index.issues:
      f.write(json.dumps(issue.to_json()) + "\n")
  os.replace(os.path.join(out_dir, CAPTION_ISSUES + ".tmp"), os.path.join(out_dir, CAPTION_ISSUES))
  if caption_index.issues:
    print(f"pathjax tile: {len(caption_index.issues)} caption line(s) not used "
          f"({caption_index.issue_counts()}); first: line {caption_index.issues[0].line}: "
          f"{caption_index.issues[0].message}; all in {os.path.join(out_dir, CAPTION_ISSUES)}",
          file=sys.stderr)

  results: dict[str, dict] = {}
  todo: list[str] = []
  seen_ids: dict[str, str] = {}
  for p in paths:
    sid = slide_lib.slide_id_from_path(p)
    if sid in seen_ids:
      results[p] = {"slide_id": sid, "path": p, "status": "skipped", "reason": "duplicate_slide_id",
                    "message": f"{p}: slide id {sid!r} is also {seen_ids[sid]}; captions and shards "
                               "are keyed by slide id, so ids must be unique"}
      continue
    seen_ids[sid] = p
    marker = _read_valid_marker(out_dir, sid, p, opts)
    if marker is not None:
      results[p] = marker
    else:
      todo.append(p)
  resumed = len(paths) - len(todo)

  by_id = {}
  for sid in seen_ids:
    by_id[sid] = {}
  for key, entry in caption_index.entries.items():
    if key[0] in by_id:
      by_id[key[0]][key] = entry
  jobs = [(p, out_dir, opts, by_id[slide_lib.slide_id_from_path(p)]) for p in todo]

  bar = None
  if progress and jobs:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="tiling slides", unit="slide", file=sys.stderr)
  try:
    if workers <= 1 or len(jobs) <= 1:
      for job in jobs:
        results[job[0]] = _worker(job)
        if bar:
          bar.update(1)
    else:
      import multiprocessing as mp
      ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (jax, zarr)
      with futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        pending = {pool.submit(_worker, job): job[0] for job in jobs}
        for fut in futures.as_completed(pending):
          path = pending[fut]
          try:
            results[path] = fut.result()
          except Exception as e:  # a worker died (e.g. killed by the OOM killer)
            results[path] = {"slide_id": slide_lib.slide_id_from_path(path), "path": path,
                             "status": "skipped", "reason": "worker_died",
                             "message": f"{type(e).__name__}: {e}", "options": opts.to_json()}
          if bar:
            bar.update(1)
  finally:
    if bar:
      bar.close()

  manifest = _build_manifest(paths, results, opts, caption_index, resumed, time.perf_counter() - t0)
  if isinstance(slide_paths, str):
    manifest["options"]["slides"] = slide_paths
  manifest["options"]["captions"] = captions_path
  records.write_manifest(out_dir, manifest)
  return manifest


def _build_manifest(paths, results, opts, caption_index, resumed, seconds) -> dict[str, Any]:
  mags = [f"{m:g}" for m in opts.magnifications]
  counts = {
      "slides": len(paths), "slides_tiled": 0, "slides_skipped": 0, "slides_resumed": resumed,
      "bags": 0, "patches": 0, "patches_per_magnification": {m: 0 for m in mags},
      "captions_missing": 0, "captions_missing_per_magnification": {m: 0 for m in mags},
      "captions_matched": 0, "captions_unmatched": 0, "bags_skipped": 0,
      "roots_below_threshold": 0,
  }
  skipped_slides, skipped_by_reason, bags_skipped_by_reason = [], {}, {}
  slides, shards = [], []
  for p in paths:
    r = results[p]
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
      skipped_by_reason[reason] = skipped_by_reason.get(reason, 0) + 1
      skipped_slides.append({"slide": r.get("slide_id"), "path": p, "reason": reason,
                             "message": r.get("message", "")})
    slides.append({k: r.get(k) for k in ("slide_id", "path", "status", "reason", "shard", "bags",
                                         "magnification", "magnification_source", "mpp",
                                         "dimensions", "roots", "seconds") if k in r})
  counts["patches"] = sum(counts["patches_per_magnification"].values())
  return {
      "pathjax_version": pathjax.__version__,
      "schema_version": schema.SCHEMA_VERSION,
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "options": opts.to_json(),
      "counts": counts,
      "skipped": {"slides": skipped_slides, "slides_by_reason": skipped_by_reason,
                  "bags_by_reason": bags_skipped_by_reason},
      "captions": {**caption_index.summary(), "issues_file": CAPTION_ISSUES},
      "slides": slides,
      "shards": sorted(shards),
      "seconds": round(seconds, 3),
  }
