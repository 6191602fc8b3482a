"""`pathjax tile --slides GLOB --captions FILE --out DIR [--runner beam -- BEAM_OPTIONS]`.

Exit codes: 0 every slide tiled or skipped for its own reasons; 1 nothing tiled, a worker
died twice on a slide (`worker_died` skips), or slides failed for reasons outside the slide
(I/O, a full disk: no manifest is written, rerun with the same --out to finish); 2 bad
arguments or slide lists (one line naming the input and the fix).
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

from pathjax.input import tile


def register(parser):
  parser.add_argument("--slides", required=True, action="append",
                      help="glob of slide files, local or gs:// / s3:// (quote it; may be given more than once)")
  parser.add_argument("--captions", default=None, help="captions JSON-lines file (see pathjax.input.captions)")
  parser.add_argument("--out", required=True, help="records directory, local or gs:// / s3:// "
                      "(rerun with the same --out to resume)")
  parser.add_argument("--workers", type=int, default=1, help="processes, one slide each at a time")
  parser.add_argument("--runner", choices=("local", "beam"), default="local",
                      help="local: a process pool here; beam: an Apache Beam pipeline (DirectRunner "
                      "with --workers processes unless Beam options after `--` say otherwise, e.g. "
                      "-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://...)")
  parser.add_argument("--retry-skipped", action="store_true",
                      help="retry every slide skipped by an earlier run (by default only those whose "
                      "file changed, or that were skipped for permission, a missing file or a dead worker)")
  parser.add_argument("--magnifications", default="5,10,20,40")
  parser.add_argument("--patch-size", type=int, default=224)
  parser.add_argument("--tissue-threshold", type=float, default=0.5)
  parser.add_argument("--magnification-override", type=float, default=None,
                      help="objective power of level 0 for every slide, replacing its metadata")
  parser.add_argument("--jpeg-quality", type=int, default=90, help="1-100")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("beam_options", nargs=argparse.REMAINDER,
                      help="after `--`: Apache Beam pipeline options (with --runner beam)")


def _error(message: str, code: int) -> int:
  print(f"pathjax tile: error: {message}", file=sys.stderr)
  return code


def main(args) -> int:
  beam_options = [a for a in (args.beam_options or []) if a != "--"]
  if beam_options and args.runner != "beam":
    return _error(f"Beam options {beam_options} were given but --runner is {args.runner!r}; "
                  "add --runner beam", 2)
  if args.workers < 1:
    return _error(f"--workers must be >= 1, got {args.workers}", 2)
  try:
    opts = tile.make_options(args.magnifications, args.patch_size, args.tissue_threshold,
                             args.magnification_override, args.jpeg_quality)
    paths = tile.expand_slides(args.slides)
    if not paths:
      return _error(f"no slide matches {args.slides}", 2)
    manifest = tile.tile_slides(
        paths, args.captions, args.out, magnifications=opts.magnifications, patch_size=opts.patch_size,
        tissue_threshold=opts.tissue_threshold, workers=args.workers,
        magnification_override=opts.magnification_override, jpeg_quality=opts.jpeg_quality,
        progress=not args.no_progress, runner=args.runner, beam_args=beam_options,
        retry_skipped=args.retry_skipped)
  except tile.TileError as e:
    return _error(str(e), 2)
  except tile.TileIncompleteError as e:
    for f in e.failed:
      print(f"failed {f['path']}: [{f['reason']}] {f['message']}", file=sys.stderr)
    for r in e.results.values():
      if r.get("status") == "skipped":
        print(f"skipped {r['slide_id']}: [{r.get('reason')}] {r.get('message', '')}", file=sys.stderr)
    return _error(str(e), 1)
  except OSError as e:  # writing the records directory itself failed (a full disk, permissions)
    hint = ("the disk is full: free space" if e.errno == errno.ENOSPC else "check the path and its permissions")
    return _error(f"{e.filename or args.out}: {e.strerror or e}; {hint} and rerun with the same --out "
                  "(finished slides are kept)", 1)
  c = manifest["counts"]
  print(json.dumps(c, indent=1))
  for s in manifest["skipped"]["slides"]:
    print(f"skipped {s['path']}: [{s['reason']}] {s['message']}", file=sys.stderr)
  if c["captions_unknown_slide"]:
    unknown = manifest["captions"]["unknown_slides"]
    print(f"pathjax tile: {c['captions_unknown_slide']} caption(s) name slides that are not in --slides "
          f"(e.g. {unknown[:3]}); they are counted in captions_unmatched", file=sys.stderr)
  if manifest["captions"]["issues"]:
    first = manifest["captions"]["first_issues"][0]
    print(f"pathjax tile: {manifest['captions']['issues']} caption line(s) not used "
          f"({manifest['captions']['issues_by_kind']}); first: line {first['line']}: {first['message']}; "
          f"all in {args.out}/{tile.CAPTION_ISSUES}", file=sys.stderr)
  print(f"{c['slides_tiled']}/{c['slides']} slides tiled ({c['slides_resumed']} already done), "
        f"{c['bags']} bags, {c['patches']} patches, {c['captions_missing']} captions missing, "
        f"{c['slides_skipped']} slides skipped -> {args.out}/manifest.json")
  if c["slides_worker_died"]:
    return _error(f"{c['slides_worker_died']} slide(s) killed their worker twice (out of memory?); "
                  "rerun with fewer --workers: they are retried", 1)
  return 0 if c["slides_tiled"] > 0 else 1
