"""`pathjax inspect DIR`: the manifest, records as JSON lines (no pixels), a contact sheet PNG.

    pathjax inspect DIR                       # manifest + the first 5 records
    pathjax inspect DIR --records 20          # more records (-1: all)
    pathjax inspect DIR --png bag.png --bag 3 # contact sheet of bag 3

The contact sheet has one row per magnification: the root, then its descendants in the
record's order, each with its caption (or "[caption missing]"), position and tissue.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap

from pathjax.input import records, schema


def register(parser):
  parser.add_argument("dir", help="records directory written by `pathjax tile`")
  parser.add_argument("--records", type=int, default=5, help="records to dump as JSON lines (-1: all)")
  parser.add_argument("--png", default=None, help="write a contact sheet of one bag to this PNG")
  parser.add_argument("--bag", type=int, default=0, help="record index of the bag for --png")
  parser.add_argument("--max-per-level", type=int, default=16,
                      help="patches shown per magnification on the contact sheet")


def bag_to_json(bag: schema.Bag) -> dict:
  """The bag record as JSON (`pixel`: where each patch's JPEG is in the slide's pixel shard)."""
  d = {k: getattr(bag, k) for k in ("slide_id", "bag_index", "mpp", "patch_size", "magnifications", "keywords")}
  d["patches"] = [{
      "level": p.level, "magnification": p.magnification, "x": p.x, "y": p.y, "extent": p.extent,
      "tissue": p.tissue, "parent": p.parent, "caption": p.caption, "has_caption": p.has_caption,
      "keywords": p.keywords, "label": p.label, "pixel": p.pixel} for p in bag.patches]
  return d


def contact_sheet(bag: schema.Bag, out_png: str, *, max_per_level: int = 16, thumb: int = 160) -> None:
  """Writes a PNG: per magnification row, patches with captions underneath."""
  from PIL import Image, ImageDraw, ImageFont

  levels = sorted({p.level for p in bag.patches})
  font = ImageFont.load_default()
  text_h, pad = 64, 6
  cols = min(max_per_level, max(len(bag.level_indices(l)) for l in levels))
  label_w = 90
  W = label_w + cols * (thumb + pad) + pad
  H = pad + len(levels) * (thumb + text_h + pad) + 24
  sheet = Image.new("RGB", (W, H), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  draw.text((pad, 4), f"{bag.slide_id} bag {bag.bag_index}  mpp {bag.mpp:.3f}  keywords: "
            f"{', '.join(bag.keywords[:8])}", fill=(0, 0, 0), font=font)
  for row, level in enumerate(levels):
    idx = bag.level_indices(level)
    y0 = 24 + row * (thumb + text_h + pad)
    mag = bag.patches[idx[0]].magnification
    draw.text((pad, y0 + thumb // 2), f"{mag:g}x\n{len(idx)} patches", fill=(0, 0, 0), font=font)
    for col, i in enumerate(idx[:cols]):
      p = bag.patches[i]
      x0 = label_w + col * (thumb + pad)
      img = Image.open(io.BytesIO(p.jpeg)).convert("RGB").resize((thumb, thumb))
      sheet.paste(img, (x0, y0))
      caption = p.caption if p.has_caption else "[caption missing]"
      lines = textwrap.wrap(f"({p.x},{p.y}) t={p.tissue:.2f} {p.label}", 26)[:1]
      lines += textwrap.wrap(caption, 26)[:3]
      draw.multiline_text((x0, y0 + thumb + 2), "\n".join(lines), fill=(20, 20, 20), font=font, spacing=1)
  sheet.save(out_png)


def main(args) -> int:
  try:
    source, manifest = records.open_records(args.dir)
  except records.IncompleteRecordsError as e:
    print(f"pathjax inspect: {e}", file=sys.stderr)
    return 1
  print(json.dumps(manifest, indent=2, sort_keys=True))
  n = len(source) if args.records < 0 else min(args.records, len(source))
  for i in range(n):
    print(json.dumps(bag_to_json(source.bag(i))))
  if args.png:
    import os
    folder = os.path.dirname(os.path.abspath(args.png))
    if not os.path.isdir(folder):
      print(f"pathjax inspect: --png {args.png}: the folder {folder} does not exist; create it "
            "or choose another path", file=sys.stderr)
      return 2
    if os.path.isdir(args.png):
      print(f"pathjax inspect: --png {args.png} is a folder; give a file name ending in .png",
            file=sys.stderr)
      return 2
    if not 0 <= args.bag < len(source):
      print(f"pathjax inspect: --bag {args.bag} out of range (0..{len(source) - 1})", file=sys.stderr)
      return 2
    try:
      contact_sheet(source.full_bag(args.bag), args.png, max_per_level=args.max_per_level)
    except OSError as e:
      print(f"pathjax inspect: cannot write {args.png}: {e.strerror or e}", file=sys.stderr)
      return 2
    print(f"wrote contact sheet of bag {args.bag} to {args.png}", file=sys.stderr)
  return 0
