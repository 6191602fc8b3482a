"""`pathjax localize`: where on a slide a PathFLIP model finds a text.

    pathjax localize --model runs/pathflip/model --slide S-001 --text "tumor" \
        [--embeddings emb/] [--slides slides/] --out heatmaps/S-001_tumor

Writes PREFIX.npy (the raw per-patch map [N], float32, in the stored patch order of the
slide's embeddings: region attention x within-region patch attention scaled to mean 1 per
region, so a patch shows its region's weight modulated by the attention within it; with
grid regions, averaged over the grid's translations by 0..k-1 patches so that the map
resolves single patches, unless --no-shifts) and
PREFIX.png (the map over the slide's thumbnail, read from the slide file when it is found:
--slides DIR, or the path in the embeddings manifest; otherwise the map alone on the patch
grid, and the output says so). Neither file is overwritten unless --overwrite. The
embeddings default to the ones the model was trained on (model.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

THUMBNAIL_SIDE = 1024


class LocalizeError(ValueError):
  """Bad input (the message names the file or slide and the fix)."""


def register(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__
  parser.add_argument("--model", required=True, help="a PathFLIP model directory (the trainer's export)")
  parser.add_argument("--slide", required=True, help="slide id (as in the embeddings manifest)")
  parser.add_argument("--text", required=True, help='what to find, e.g. "tumor"')
  parser.add_argument("--embeddings", help="a `pathjax embed-slides` directory (default: the model's "
                                           "training embeddings)")
  parser.add_argument("--slides", help="folder with the slide files (for the thumbnail)")
  parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.npy")
  parser.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.png / .npy")
  parser.add_argument("--no-shifts", dest="shifts", action="store_false",
                      help="grid regions: the map of one block partition, not the mean over its "
                           "translations")


def _atomic(path: str, write) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
  os.close(fd)
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def find_slide_file(entry: dict, slides_dir: str | None, embeddings_dir: str) -> str | None:
  """The slide file of a manifest entry: in --slides (by file name, or id + any extension),
  else the manifest's path (absolute, or relative to the embeddings directory)."""
  path = str(entry.get("path") or "")
  if slides_dir:
    cand = os.path.join(slides_dir, os.path.basename(path)) if path else ""
    if cand and os.path.isfile(cand):
      return cand
    for name in sorted(os.listdir(slides_dir)):
      if os.path.splitext(name)[0] == entry["slide_id"] and os.path.isfile(os.path.join(slides_dir, name)):
        return os.path.join(slides_dir, name)
    return None
  for cand in (path, os.path.join(embeddings_dir, path)):
    if cand and os.path.isfile(cand):
      return cand
  return None


def _colour(scores: np.ndarray) -> np.ndarray:
  """Colours [N, 4] in [0, 1], the map stretched to its own range (the .npy keeps the values)."""
  import matplotlib
  lo, hi = (float(np.min(scores)), float(np.max(scores))) if scores.size else (0.0, 0.0)
  return matplotlib.colormaps["inferno"]((scores - lo) / (hi - lo) if hi > lo else scores * 0)


def render(scores: np.ndarray, grid: np.ndarray, coords: np.ndarray, extent: int,
           slide_path: str | None, out_png: str, title: str) -> str:
  """Writes the PNG; returns what it was painted over ("thumbnail ..." or "patch grid")."""
  from PIL import Image
  rgba = (_colour(np.asarray(scores, np.float64)) * 255).astype(np.uint8)
  if slide_path is not None:
    from pathjax.wsi.slide import open_slide
    slide = open_slide(slide_path)
    try:
      w, h = slide.dimensions
      arr, down = slide.overview(max(w, h) / THUMBNAIL_SIDE)
    finally:
      slide.close()
    base = Image.fromarray(arr).convert("RGBA")
    scale = max(w, h) / THUMBNAIL_SIDE
    base = base.resize((max(1, round(w / scale)), max(1, round(h / scale))))
    overlay = np.zeros((base.height, base.width, 4), np.uint8)
    for (x, y), c in zip(np.asarray(coords, np.int64), rgba):
      x0, y0 = int(x / scale), int(y / scale)
      x1, y1 = max(x0 + 1, int((x + extent) / scale)), max(y0 + 1, int((y + extent) / scale))
      overlay[y0:y1, x0:x1] = (*c[:3], 150)
    image = Image.alpha_composite(base, Image.fromarray(overlay)).convert("RGB")
    what = f"the thumbnail of {slide_path}"
  else:
    grid = np.asarray(grid, np.int64)
    cell = max(1, THUMBNAIL_SIDE // max(int(grid.max()) + 1, 1))
    hgt, wid = (int(grid[:, 1].max()) + 1) * cell, (int(grid[:, 0].max()) + 1) * cell
    canvas = np.full((hgt, wid, 3), 255, np.uint8)
    for (cx, cy), c in zip(grid, rgba):
      canvas[cy * cell:(cy + 1) * cell, cx * cell:(cx + 1) * cell] = c[:3]
    image = Image.fromarray(canvas)
    what = "the patch grid (no slide file found: pass --slides DIR for the thumbnail)"
  image.info["title"] = title
  _atomic(out_png, lambda p: image.save(p, format="PNG"))
  return what


def localize(model_dir: str, slide_id: str, text: str, out: str, *, embeddings: str | None = None,
             slides: str | None = None, overwrite: bool = False, model=None,
             shifts: bool = True) -> dict:
  """Library form of the command; returns {"png", "npy", "painted_over", "patches", "top_patch"}."""
  from pathjax.embed_slides import EmbedSlidesError, open_slide_embeddings
  from pathjax.evaluate.slide_localization import slide_extent
  from pathjax.recipes.pathflip import load_model
  if not text.strip():
    raise LocalizeError("--text is empty; give the words to localize, e.g. --text tumor")
  png, npy = out + ".png", out + ".npy"
  existing = [p for p in (png, npy) if os.path.exists(p)]
  if existing and not overwrite:
    raise LocalizeError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or "
                        "choose another --out prefix (nothing was written)")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise LocalizeError(f"--out {out}: folder {folder} does not exist; create it first")
  if not os.access(folder, os.W_OK):
    raise LocalizeError(f"--out {out}: folder {folder} is not writable")
  model = model or load_model(model_dir)
  emb_dir = embeddings or model.layout.get("embeddings")
  if not emb_dir:
    raise LocalizeError("--embeddings DIR is needed (the model does not name its training embeddings)")
  try:
    emb = open_slide_embeddings(emb_dir, dim=model.encoder_width,
                                encoder=f"the model {model_dir} (encoder_width)")
  except EmbedSlidesError as e:
    raise LocalizeError(f"--embeddings: {e}") from None
  if slide_id not in emb:
    some = ", ".join(emb.slide_ids[:5])
    raise LocalizeError(f"slide {slide_id!r} is not in {emb_dir} ({len(emb)} slides, e.g. {some}; "
                        "skipped slides are listed in its manifest.json)")
  sf = emb[slide_id]
  entry = next(s for s in emb.manifest["slides"] if s.get("slide_id") == slide_id)
  scores = model.heatmaps(np.asarray(sf.features, np.float32), np.asarray(sf.grid), [text],
                          shifts=shifts)[0]
  scores = scores.astype(np.float32)
  if slides and not os.path.isdir(slides):
    raise LocalizeError(f"--slides {slides} is not a folder")
  slide_path = find_slide_file(entry, slides, emb_dir)
  coords = np.asarray(sf.coords, np.int64)
  extent = slide_extent(emb, slide_id, coords, np.asarray(sf.grid))
  def save_npy(p):
    with open(p, "wb") as f:
      np.save(f, scores)
  _atomic(npy, save_npy)
  what = render(scores, sf.grid, coords, extent, slide_path, png, f"{slide_id}: {text}")
  top = int(np.argmax(scores))
  return {"png": png, "npy": npy, "painted_over": what, "patches": int(len(scores)),
          "top_patch": {"index": top, "grid": [int(v) for v in sf.grid[top]],
                        "level0": [int(v) for v in coords[top]], "score": float(scores[top])}}


def main(args) -> int:
  from pathjax.models.model_dir import ModelDirError
  try:
    out = localize(args.model, args.slide, args.text, args.out, embeddings=args.embeddings,
                   slides=args.slides, overwrite=args.overwrite, shifts=args.shifts)
  except (LocalizeError, ModelDirError) as e:
    print(f"pathjax localize: error: {e}", file=sys.stderr)
    return 2
  t = out["top_patch"]
  print(f"{args.slide}: '{args.text}' over {out['patches']} patches; top patch #{t['index']} at grid "
        f"{tuple(t['grid'])} (level-0 {tuple(t['level0'])}), score {t['score']:.4f}")
  print(f"wrote {out['npy']} (per-patch map, embeddings order) and {out['png']} (over "
        f"{out['painted_over']})")
  return 0
