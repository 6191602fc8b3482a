"""`pathjax embed`: features of images or texts from a model directory.

  pathjax embed --model models/uni --images tiles/ --out feats.npy        # + feats.parquet
  pathjax embed --model models/uni --images a.png b.jpg --out feats.npy
  pathjax embed --model models/uni --images batch.npy --out feats.npy     # NHWC, normalised float32 (or uint8)
  pathjax embed --model models/plip --text "tumor" "stroma" --out text.npy
  pathjax embed --model models/plip --text-ids ids.npy --out text.npy

Images are decoded on host threads, resized (shorter side to the model's image size,
centre crop) and normalised on the device. For a folder, ids are the paths relative to it;
for files and folders a Parquet file (columns id, features) is written beside the .npy.
An image that cannot be decoded stops the run with its name, or with --skip-bad is left
out, counted and reported.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class ImageDecodeError(ValueError):
  """An image file that cannot be decoded (the message names it)."""


def register(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__
  parser.add_argument("--model", required=True, metavar="DIR", help="a pathjax model directory")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--images", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively) or one .npy [N,H,W,3]")
  src.add_argument("--text", nargs="+", metavar="TEXT", help="strings to embed")
  src.add_argument("--text-ids", metavar="NPY", help=".npy of int token ids [N, T]")
  src.add_argument("--data", metavar="SPEC",
                   help="a whole dataset (an evaluation data spec: imagefolder:DIR, csv:FILE, "
                   "records:DIR@MAG, tfds:NAME:SPLIT, ...; see `pathjax eval --help-data`); writes "
                   "features with ids and labels for multiple-instance learning")
  parser.add_argument("--out", required=True, metavar="FILE.npy")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--output", default="pooled", choices=["pooled", "tokens", "patch_tokens"],
                      help="image features to write (default: pooled, projected if the "
                      "model has a projection)")
  parser.add_argument("--skip-bad", action="store_true",
                      help="skip images that cannot be decoded (counted and reported)")
  parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="image decoding threads")
  parser.add_argument("--no-progress", dest="progress", action="store_false")


# --------------------------------------------------------------------------------- images


def list_images(paths: Sequence[str]) -> list[tuple[str, str]]:
  """(id, file) pairs: a folder's images sorted, with ids relative to the folder."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in files:
          if f.lower().endswith(IMAGE_SUFFIXES):
            full = os.path.join(root, f)
            found.append((os.path.relpath(full, path), full))
      if not found:
        raise FileNotFoundError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
      out += sorted(found)
    elif os.path.isfile(path):
      out.append((path, path))
    else:
      raise FileNotFoundError(f"{path} does not exist")
  return out


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: decoded, RGB, shorter side resized to `size`, centre-cropped."""
  from PIL import Image, UnidentifiedImageError

  from pathjax.input.images import to_rgb8
  try:
    with Image.open(path) as im:
      im = to_rgb8(im, path)
      w, h = im.size
      if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
      return np.asarray(im, np.uint8)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise ImageDecodeError(f"cannot decode image {path}: {e}") from e


def _decoded_chunks(items, size, chunk, workers, skip_bad, bad) -> Iterator[tuple[list, np.ndarray]]:
  def load(item):
    try:
      return item, load_image(item[1], size)
    except ImageDecodeError as e:
      if not skip_bad:
        raise
      bad.append((item[1], str(e)))
      return item, None
  with ThreadPoolExecutor(max(1, workers)) as pool:
    for start in range(0, len(items), chunk):
      results = [r for r in pool.map(load, items[start:start + chunk]) if r[1] is not None]
      if results:
        yield [r[0] for r in results], np.stack([r[1] for r in results])


def embed_image_files(model, paths: Sequence[str], *, batch_size: int = 64, output: str = "pooled",
                      skip_bad: bool = False, workers: int = 4, progress: bool = True):
  """(ids, features, bad) for image files / folders; `bad` lists (file, error) skipped."""
  items = list_images(paths)
  size = model.image_size
  bad: list[tuple[str, str]] = []
  ids, feats = [], []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(items), unit="img", desc="embed")
  chunk = max(batch_size, 1) * 4
  seen_bad = 0
  for chunk_items, images in _decoded_chunks(items, size, chunk, workers, skip_bad, bad):
    feats.append(model.encode_image(images, batch_size=batch_size, output=output))
    ids += [i for i, _ in chunk_items]
    if bar is not None:
      bar.update(min(len(chunk_items) + len(bad) - seen_bad, len(items) - bar.n))
      seen_bad = len(bad)
  if bar is not None:
    bar.update(len(items) - bar.n)
    bar.close()
  if not feats:
    raise ImageDecodeError(f"none of the {len(items)} images could be decoded")
  return ids, np.concatenate(feats), bad


def embed_npy_images(model, path: str, *, batch_size: int = 64, output: str = "pooled",
                     progress: bool = True) -> np.ndarray:
  arr = np.load(path, mmap_mode="r")
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise ValueError(f"{path}: expected NHWC images [N, H, W, 3], got shape {arr.shape}")
  if arr.dtype != np.uint8 and arr.dtype != np.float32:
    raise ValueError(f"{path}: expected float32 (normalised) or uint8 images, got {arr.dtype}")
  chunk = max(batch_size, 1) * 8
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(arr), unit="img", desc="embed")
  outs = []
  for start in range(0, len(arr), chunk):
    outs.append(model.encode_image(np.asarray(arr[start:start + chunk]), batch_size=batch_size,
                                   output=output))
    if bar is not None:
      bar.update(min(chunk, len(arr) - start))
  if bar is not None:
    bar.close()
  return np.concatenate(outs)


def write_parquet(path: str, ids: Sequence[str], feats: np.ndarray) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  flat = feats.reshape(len(feats), -1).astype(np.float32)
  values = pa.array(flat.reshape(-1), pa.float32())
  column = pa.FixedSizeListArray.from_arrays(values, flat.shape[1])
  table = pa.table({"id": pa.array(list(ids), pa.string()), "features": column})
  tmp = path + ".tmp"
  pq.write_table(table, tmp)
  os.replace(tmp, path)


def _save_npy(path: str, feats: np.ndarray) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npy"
  np.save(tmp, feats)
  os.replace(tmp, path)


def _embed_dataset(args, out: str) -> int:
  """Features of every example of an evaluation data source, with ids, labels and an index."""
  from pathjax.evaluate import data, features
  dataset = data.load_dataset(args.data)
  for warning in dataset.warnings:
    print(f"warning: {warning}", file=sys.stderr)
  embedder = features.Embedder.from_model_dir(args.model)
  feats = features.extract_features(dataset, embedder, batch_size=args.batch_size,
                                    workers=args.workers, progress=args.progress)
  written = features.save_features(feats, out)
  print(f"wrote {', '.join(written)} ({len(feats.ids)} examples)")
  if feats.skipped:
    print(f"skipped {len(feats.skipped)} unreadable example(s):", file=sys.stderr)
    for ident, reason in feats.skipped[:20]:
      print(f"  {ident}: {reason}", file=sys.stderr)
  return 0


def main(args) -> int:
  from pathjax.models.model_dir import ModelDirError, load_model_dir
  from pathjax.convert.safetensors_io import WeightsError
  out = args.out if args.out.endswith(".npy") else args.out + ".npy"
  for path in (args.out, out):
    if os.path.isdir(path):
      print(f"pathjax embed: error: --out {path} is a folder; give a file name (FILE.npy)",
            file=sys.stderr)
      return 2
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.exists(folder) and not os.path.isdir(folder):
    print(f"pathjax embed: error: --out {out}: {folder} is a file, not a folder", file=sys.stderr)
    return 2
  try:
    if args.data:
      return _embed_dataset(args, args.out)
    want = ["vision"] if args.images else ["text"]
    model = load_model_dir(args.model, towers=want)
    if args.images:
      if not model.has_vision:
        raise ModelDirError(f"the model in {args.model} has no vision tower")
      if len(args.images) == 1 and args.images[0].endswith(".npy"):
        feats = embed_npy_images(model, args.images[0], batch_size=args.batch_size,
                                 output=args.output, progress=args.progress)
        _save_npy(out, feats)
        print(f"wrote {out} {feats.shape}")
        return 0
      ids, feats, bad = embed_image_files(model, args.images, batch_size=args.batch_size,
                                          output=args.output, skip_bad=args.skip_bad,
                                          workers=args.workers, progress=args.progress)
      _save_npy(out, feats)
      parquet = out[:-len(".npy")] + ".parquet"
      write_parquet(parquet, ids, feats)
      print(f"wrote {out} {feats.shape} and {parquet}")
      if bad:
        print(f"skipped {len(bad)} image(s) that could not be decoded:", file=sys.stderr)
        for file, err in bad[:20]:
          print(f"  {err}", file=sys.stderr)
        if len(bad) > 20:
          print(f"  ... and {len(bad) - 20} more", file=sys.stderr)
      return 0
    if not model.has_text:
      raise ModelDirError(f"the model in {args.model} has no text tower; it cannot embed text")
    if args.text:
      feats = model.encode_text(list(args.text), batch_size=args.batch_size,
                                progress=args.progress and len(args.text) > args.batch_size)
    else:
      ids = np.load(args.text_ids)
      feats = model.encode_text(ids, batch_size=args.batch_size, progress=args.progress)
    _save_npy(out, feats)
    print(f"wrote {out} {feats.shape}")
    return 0
  except (ImageDecodeError, ModelDirError, WeightsError, ValueError, FileNotFoundError) as e:
    print(f"pathjax embed: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # the output cannot be written (permissions, a full disk)
    print(f"pathjax embed: error: cannot write {e.filename or out}: {e.strerror or e}",
          file=sys.stderr)
    return 2
