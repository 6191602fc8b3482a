"""`pathjax tile --slides GLOB --captions FILE --out DIR`: slides -> bag records + manifest."""

from __future__ import annotations

import json
import sys

from pathjax.input import tile
from pathjax.wsi import grid as grid_lib


def register(parser):
  parser.add_argument("--slides", required=True, action="append",
                      help="glob of slide files (quote it; may be given more than once)")
  parser.add_argument("--captions", default=None, help="captions JSON-lines file (see pathjax.input.captions)")
  parser.add_argument("--out", required=True, help="records directory (rerun with the same --out to resume)")
  parser.add_argument("--workers", type=int, default=1, help="processes, one slide each at a time")
  parser.add_argument("--magnifications", default="5,10,20,40")
  parser.add_argument("--patch-size", type=int, default=224)
  parser.add_argument("--tissue-threshold", type=float, default=0.5)
  parser.add_argument("--magnification-override", type=float, default=None,
                      help="objective power of level 0 for every slide, replacing its metadata")
  parser.add_argument("--jpeg-quality", type=int, default=90)
  parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
  try:
    mags = grid_lib.parse_magnifications(args.magnifications)
  except grid_lib.GridError as e:
    print(f"pathjax tile: error: {e}", file=sys.stderr)
    return 2
  paths = tile.expand_slides(args.slides)
  if not paths:
    print(f"pathjax tile: error: no slide matches {args.slides}", file=sys.stderr)
    return 2
  try:
    manifest = tile.tile_slides(
        paths, args.captions, args.out, magnifications=mags, patch_size=args.patch_size,
        tissue_threshold=args.tissue_threshold, workers=args.workers,
        magnification_override=args.magnification_override, jpeg_quality=args.jpeg_quality,
        progress=not args.no_progress)
  except (FileNotFoundError, ValueError) as e:
    print(f"pathjax tile: error: {e}", file=sys.stderr)
    return 2
  c = manifest["counts"]
  print(json.dumps(c, indent=1))
  for s in manifest["skipped"]["slides"]:
    print(f"skipped {s['path']}: [{s['reason']}] {s['message']}", file=sys.stderr)
  print(f"{c['slides_tiled']}/{c['slides']} slides tiled ({c['slides_resumed']} already done), "
        f"{c['bags']} bags, {c['patches']} patches, {c['captions_missing']} captions missing, "
        f"{c['slides_skipped']} slides skipped -> {args.out}/manifest.json")
  return 0 if c["slides_tiled"] > 0 else 1
