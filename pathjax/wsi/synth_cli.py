"""`pathjax synth-slides --out DIR --n N`: synthetic pyramidal slides, labels, captions and
one report per slide (reports.jsonl; --report-parts K groups K slides into multi-part cases),
and the ground truth (truth.npz: every slide's class map, the masks localization is scored on);
--instructions adds slide chat data (instructions.jsonl) made from that ground truth."""

from __future__ import annotations

import time

from pathjax.wsi import grid as grid_lib
from pathjax.wsi import synth


def register(parser):
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--n", type=int, default=4, help="number of slides")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=4096, help="level-0 side in pixels (40x)")
  parser.add_argument("--magnifications", default="5,10,20,40",
                      help="grid the captions are written for (must match `pathjax tile`)")
  parser.add_argument("--patch-size", type=int, default=224, help="grid patch size (must match `pathjax tile`)")
  parser.add_argument("--tissue-fraction", type=float, default=0.7)
  parser.add_argument("--caption-drop-fraction", type=float, default=0.0,
                      help="leave out this fraction of captions (to exercise missing captions)")
  parser.add_argument("--report-parts", type=int, default=1,
                      help="slides per case: >1 writes multi-part case reports with a part label per slide")
  parser.add_argument("--instructions", action="store_true",
                      help="also write instructions.jsonl: captioning, A-D and open questions from "
                           "the ground truth (pathjax.input.instructions; slide chat training data)")


def main(args) -> int:
  t0 = time.perf_counter()
  result = synth.write_synthetic_slides(
      args.out, args.n, seed=args.seed, size=args.size,
      magnifications=grid_lib.parse_magnifications(args.magnifications), patch_size=args.patch_size,
      tissue_fraction=args.tissue_fraction, caption_drop_fraction=args.caption_drop_fraction,
      report_parts=args.report_parts)
  with open(result.captions_path, encoding="utf-8") as f:
    n_captions = sum(1 for _ in f)
  print(f"wrote {len(result.slide_paths)} slides ({args.size}x{args.size} px, 40x, classes: "
        f"{', '.join(synth.TISSUE_CLASSES)}) and {n_captions} captions to {result.captions_path} "
        f"in {time.perf_counter() - t0:.1f}s")
  print(f"reports: {result.reports_path}")
  print(f"class maps: {result.truth_path}")
  if args.instructions:
    from pathjax.input.instructions import write_synthetic_instructions
    print(f"instructions: {write_synthetic_instructions(args.out, seed=args.seed)}")
  for p in result.slide_paths:
    print(p)
  return 0
