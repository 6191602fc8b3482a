"""Labelled (and captioned) patch datasets for evaluation and embedding export.

`load_dataset(spec)` turns a data spec string into a `Dataset`:

    imagefolder:DIR            one subfolder per class (CRC-100K's layout); a bare DIR works too
    csv:FILE.csv | jsonl:FILE  manifests: columns `path` (relative to the manifest's folder),
                               `label`, optional `id`, `mpp`, `magnification`, `caption`
                               (a bare FILE ending in .csv/.jsonl works too)
    tfds:NAME[:SPLIT]          a TFDS dataset prepared locally in ArrayRecord format, e.g.
                               tfds:patch_camelyon:test, tfds:colorectal_histology:train
    records:DIR[@MAG]          a pathjax records directory (`pathjax tile`): every labelled
                               patch, at MAG only when given (records:/data/rec@20)
    slides:DIR                 slides plus a captions file with ground-truth labels
                               (`pathjax synth-slides` writes one): patches are cut from the
                               slides, so other magnifications are re-cut, not resampled

Options follow a `?`, separated by `&`: `mpp=0.5` (microns per pixel of every image, when
the files do not say), `magnification=20` (same, as objective power), `root=DIR` (manifest
paths' base), `data_dir=DIR` (TFDS), `limit=N`, `exclude=background,empty` (labels to
drop; records and slides drop `background` by default), `ref_mag=20` and `patch_size=224`
(slides: which caption lines and grid they come from), `labels=FILE` (slides: the
captions/labels file, default DIR/captions.jsonl).

Magnification. Every example may carry its MPP (from the manifest, the `mpp=` option or a
known TFDS dataset). `dataset.at_magnification(M)` gives a view whose `image(i, size)` is
at objective power M (MPP 10/M): a file image is rescaled by mpp / (10 / M) and
centre-cropped to `size` (upsampled to `size` when the rescaled image is smaller: the model
then sees the whole field of view at that magnification's resolution); a slide patch is
re-cut around the same centre; a records view holds the patches tiled at M. Without a
magnification an image is only centre-cropped to a square and resized to `size`.

Bad input is named: an empty class folder is reported in `dataset.warnings` (its class
stays in `classes`); an unreadable image raises `ImageReadError` from `image()`, which the
feature extractor counts and skips, naming the files.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import threading
import urllib.parse
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pathjax.input.images import array_to_rgb8, to_rgb8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".ome.tif", ".ome.tiff")
KINDS = ("imagefolder", "csv", "jsonl", "tfds", "records", "slides")

# TFDS datasets whose images have a known scale and label names (the catalog's labels are
# integers for PCam). mpp: PCam is cut at 10x from 0.243 um/px scans downsampled 4x;
# Kather 2016 (colorectal_histology) is 150 px of 74 um.
TFDS_META = {
    "patch_camelyon": dict(mpp=0.972, label_names=("normal", "tumor"), prompts="patch_camelyon"),
    "colorectal_histology": dict(mpp=0.495, label_names=None, prompts="colorectal_histology"),
}


class DataError(ValueError):
  """A data spec or dataset that cannot be used as given; the message says what to do."""


class ImageReadError(OSError):
  """One example whose image cannot be read; extraction skips it and names it."""

  def __init__(self, example_id: str, reason: str):
    super().__init__(f"{example_id}: {reason}")
    self.example_id, self.reason = example_id, reason


# ---------------------------------------------------------------------------------------
# Image geometry


def center_square(img: Image.Image) -> Image.Image:
  w, h = img.size
  if w == h:
    return img
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  return img.crop((left, top, left + s, top + s))


def resize(img: Image.Image, size: int) -> Image.Image:
  if img.size == (size, size):
    return img
  method = Image.Resampling.BOX if img.size[0] > size else Image.Resampling.BICUBIC
  return img.resize((size, size), method)


def to_magnification(img: Image.Image, size: int, mpp: float | None, magnification: float | None) -> np.ndarray:
  """The image at `magnification` (see the module docstring), size x size uint8 RGB."""
  img = img.convert("RGB")
  if magnification is not None and mpp is not None:
    scale = mpp / (10.0 / magnification)
    if abs(scale - 1.0) > 1e-3:
      w, h = img.size
      nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
      method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
      img = img.resize((nw, nh), method)
    w, h = img.size
    if min(w, h) >= size:
      left, top = (w - size) // 2, (h - size) // 2
      return np.asarray(img.crop((left, top, left + size, top + size)))
  return np.asarray(resize(center_square(img), size))


# ---------------------------------------------------------------------------------------
# Datasets


class Dataset:
  """Examples with ids, optional labels and captions; images read on demand.

  Subclasses implement `_read(key) -> PIL image` (native resolution) or override
  `image(i, size)`.
  """

  kind = "base"

  def __init__(self, name: str, keys: Sequence[Any], ids: Sequence[str], labels: Sequence[str | None],
               captions: Sequence[str | None] | None = None, mpp: Sequence[float | None] | None = None,
               classes: Sequence[str] | None = None, warnings: Sequence[str] = (),
               slides: Sequence[str | None] | None = None):
    n = len(keys)
    self.name = name
    self.keys = list(keys)
    self.ids = [str(i) for i in ids]
    self.labels = list(labels)
    self.captions = list(captions) if captions is not None else [None] * n
    self.mpp = list(mpp) if mpp is not None else [None] * n
    # The slide each example was cut from (records and slides sources; None elsewhere), so
    # slide-level tasks can group a patch model's patch scores.
    self.slides = list(slides) if slides is not None else [None] * n
    if not (len(self.ids) == len(self.labels) == len(self.captions) == len(self.mpp)
            == len(self.slides) == n):
      raise ValueError("keys, ids, labels, captions, mpp and slides must have the same length")
    present = sorted({l for l in self.labels if l is not None})
    self.classes = list(classes) if classes is not None else present
    self.warnings = list(warnings)
    self.magnification: float | None = None  # the view's target magnification

  def __len__(self) -> int:
    return len(self.keys)

  def __repr__(self) -> str:
    mag = f" @{self.magnification:g}x" if self.magnification else ""
    return f"<{type(self).__name__} {self.name}{mag}: {len(self)} examples, classes {self.classes}>"

  @property
  def has_labels(self) -> bool:
    return any(l is not None for l in self.labels)

  @property
  def has_captions(self) -> bool:
    return any(c for c in self.captions)

  # -- views ------------------------------------------------------------------------------

  def subset(self, indices) -> "Dataset":
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    new = copy.copy(self)
    for attr in ("keys", "ids", "labels", "captions", "mpp", "slides"):
      values = getattr(self, attr)
      setattr(new, attr, [values[i] for i in indices])
    return new

  def labelled(self) -> "Dataset":
    return self.subset([i for i, l in enumerate(self.labels) if l is not None])

  def limit(self, n: int | None, seed: int = 0) -> "Dataset":
    """At most n examples, a random choice (by `seed`) kept in the original order."""
    if n is None or n <= 0 or n >= len(self):
      return self
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(self))[:n])
    return self.subset(chosen)

  def at_magnification(self, magnification: float | None) -> "Dataset":
    if magnification is None:
      return self
    missing = [self.ids[i] for i, m in enumerate(self.mpp) if m is None]
    if missing:
      raise DataError(
          f"{self.name}: evaluating at {magnification:g}x needs each image's scale, but "
          f"{len(missing)} example(s) (e.g. {missing[:3]}) have no MPP; add an `mpp` column to the "
          "manifest or give it for the whole dataset with `?mpp=0.5` (or `?magnification=20`)")
    new = copy.copy(self)
    new.magnification = float(magnification)
    return new

  def native_magnifications(self) -> list[float]:
    return sorted({round(10.0 / m, 3) for m in self.mpp if m})

  # -- pixels -----------------------------------------------------------------------------

  def _read(self, key) -> Image.Image:
    raise NotImplementedError

  def image(self, i: int, size: int) -> np.ndarray:
    """Example i as size x size x 3 uint8 at the view's magnification; ImageReadError if bad."""
    try:
      img = self._read(self.keys[i])
      return to_magnification(img, size, self.mpp[i], self.magnification)
    except ImageReadError:
      raise
    except Exception as e:  # PIL raises many types for broken files
      raise ImageReadError(self.ids[i], f"{type(e).__name__}: {e}") from e


class FileDataset(Dataset):
  """Images in files (ImageFolder or manifest)."""

  kind = "files"

  def _read(self, path) -> Image.Image:
    if not os.path.exists(path):
      raise ImageReadError(path, "no such file")
    with Image.open(path) as img:
      img.load()
      return to_rgb8(img, str(path))


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_folder(root: str, *, mpp: float | None = None, name: str | None = None) -> FileDataset:
  if not os.path.isdir(root):
    raise DataError(f"{root}: no such directory (imagefolder: expects one subfolder per class)")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  if not classes:
    raise DataError(f"{root}: no class subfolders; an ImageFolder holds one subfolder of images per "
                    "class (root/ADI/x.png, root/TUM/y.png, ...)")
  keys, ids, labels, warnings, empty = [], [], [], [], []
  for cls in classes:
    files = []
    for dirpath, _, filenames in os.walk(os.path.join(root, cls)):
      files += [os.path.join(dirpath, f) for f in filenames if _is_image(f)]
    if not files:
      empty.append(cls)
      continue
    for path in sorted(files):
      keys.append(path)
      ids.append(os.path.relpath(path, root))
      labels.append(cls)
  if empty:
    warnings.append(f"{root}: class folder(s) {empty} hold no images (extensions "
                    f"{', '.join(IMAGE_EXTENSIONS)}); those classes have 0 examples")
  if not keys:
    raise DataError(f"{root}: every class folder is empty ({classes}); no images to evaluate")
  return FileDataset(name or os.path.basename(os.path.normpath(root)), keys, ids, labels,
                     mpp=[mpp] * len(keys), classes=classes, warnings=warnings)


def _read_manifest_rows(path: str) -> list[dict[str, Any]]:
  if path.lower().endswith((".jsonl", ".json")):
    rows = []
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{n}: not a JSON line ({e})") from e
    return rows
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def _float(value) -> float | None:
  if value is None or value == "":
    return None
  try:
    f = float(value)
  except (TypeError, ValueError):
    return None
  return f if np.isfinite(f) and f > 0 else None


def manifest(path: str, *, root: str | None = None, mpp: float | None = None,
             name: str | None = None) -> FileDataset:
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such manifest file")
  rows = _read_manifest_rows(path)
  if not rows:
    raise DataError(f"{path}: the manifest has no rows")
  columns = set().union(*(r.keys() for r in rows))
  if "path" not in columns:
    raise DataError(f"{path}: the manifest needs a `path` column (has {sorted(columns)}); optional "
                    "columns: label, id, mpp, magnification, caption")
  base = root or os.path.dirname(os.path.abspath(path))
  keys, ids, labels, captions, mpps = [], [], [], [], []
  for n, row in enumerate(rows):
    p = str(row.get("path") or "")
    if not p:
      raise DataError(f"{path}: row {n + 1} has an empty path")
    full = p if os.path.isabs(p) else os.path.join(base, p)
    keys.append(full)
    ids.append(str(row.get("id") or p))
    label = row.get("label")
    labels.append(None if label is None or label == "" else str(label))
    captions.append(row.get("caption") or None)
    m = _float(row.get("mpp"))
    if m is None and _float(row.get("magnification")):
      m = 10.0 / _float(row.get("magnification"))
    mpps.append(m if m is not None else mpp)
  return FileDataset(name or os.path.splitext(os.path.basename(path))[0], keys, ids, labels,
                     captions=captions, mpp=mpps)


# -- TFDS ----------------------------------------------------------------------------------


class TfdsDataset(Dataset):
  kind = "tfds"

  def __init__(self, source, *args, image_key: str = "image", **kwargs):
    super().__init__(*args, **kwargs)
    self._source = source
    self._image_key = image_key

  def _read(self, index) -> Image.Image:
    example = self._source[int(index)]
    img = example[self._image_key]
    if isinstance(img, (bytes, bytearray)):
      import io
      return to_rgb8(Image.open(io.BytesIO(img)), f"example {index}")
    return array_to_rgb8(img, f"example {index}")


def tfds_dataset(name: str, split: str = "test", *, data_dir: str | None = None,
                 mpp: float | None = None, source=None, label_names: Sequence[str] | None = None) -> TfdsDataset:
  """A TFDS dataset prepared in ArrayRecord format (random access, no TensorFlow).

  `source`/`label_names` inject an already-open data source (tests).
  """
  meta = TFDS_META.get(name, {})
  if source is None:
    import tensorflow_datasets as tfds
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:
      raise DataError(f"tfds:{name}: not a TFDS dataset known here ({type(e).__name__}: {e})") from e
    how = (f"prepare it once where TensorFlow is installed with `tfds build {name} "
           f"--file_format=array_record{' --data_dir ' + data_dir if data_dir else ''}` "
           "(or `tfds.builder(name, file_format='array_record').download_and_prepare()`), "
           "then pass its folder with ?data_dir=DIR or TFDS_DATA_DIR")
    if not builder.is_prepared():
      raise DataError(f"tfds:{name} is not prepared in {builder.data_dir}; {how}")
    if split not in builder.info.splits:
      raise DataError(f"tfds:{name} has no split {split!r}; splits: {list(builder.info.splits)}")
    try:
      source = builder.as_data_source(split=split)
    except Exception as e:
      raise DataError(f"tfds:{name}:{split} cannot be opened for random access "
                      f"({type(e).__name__}: {e}); {how}") from e
    feature = builder.info.features["label"]
    label_names = meta.get("label_names") or list(feature.names)
  n = len(source)
  if label_names is None:
    label_names = meta.get("label_names")

  # Labels without decoding images: read the label column once.
  def label_of(i):
    value = source[i]["label"]
    return str(label_names[int(value)]) if label_names is not None else str(int(value))

  labels = [label_of(i) for i in range(n)]
  ds_mpp = mpp if mpp is not None else meta.get("mpp")
  classes = [str(c) for c in label_names] if label_names is not None else None
  return TfdsDataset(source, f"{name}-{split}", list(range(n)), [f"{name}/{split}/{i}" for i in range(n)],
                     labels, mpp=[ds_mpp] * n, classes=classes)


# -- records -------------------------------------------------------------------------------


class RecordsDataset(Dataset):
  """Patches of a pathjax records directory; keys are (record index, patch index)."""

  kind = "records"

  def __init__(self, directory: str, source, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.directory = directory
    self._source = source
    self._local = threading.local()

  def _bag(self, record_index: int):
    cache = getattr(self._local, "cache", None)
    if cache is None or cache[0] != record_index:
      cache = (record_index, self._source.bag(record_index))
      self._local.cache = cache
    return cache[1]

  def _read(self, key) -> Image.Image:
    import io
    record_index, patch_index = key
    jpeg, = self._source.jpegs(record_index, self._bag(record_index), [patch_index])
    return Image.open(io.BytesIO(jpeg)).convert("RGB")

  def image(self, i: int, size: int) -> np.ndarray:
    try:
      return np.asarray(resize(center_square(self._read(self.keys[i])), size))
    except Exception as e:
      raise ImageReadError(self.ids[i], f"{type(e).__name__}: {e}") from e

  def at_magnification(self, magnification: float | None) -> "Dataset":
    """The patches tiled at `magnification` (records hold each magnification natively)."""
    if magnification is None:
      return self
    idx = [i for i, m in enumerate(self.mpp) if m and abs(10.0 / m - magnification) < 1e-3 * magnification]
    if not idx:
      raise DataError(f"{self.directory}: no patches at {magnification:g}x; the records hold "
                      f"{self.native_magnifications()}")
    new = self.subset(idx)
    new.magnification = float(magnification)
    return new


def records_dataset(directory: str, magnification: float | None = None,
                    exclude: Sequence[str] = ("background",)) -> RecordsDataset:
  from pathjax.input import records
  try:
    source, info = records.open_records(directory)
  except FileNotFoundError as e:
    raise DataError(str(e)) from e
  keys, ids, labels, captions, mpps, slides = [], [], [], [], [], []
  excluded = 0
  for r in range(len(source)):
    bag = source.bag(r)
    for j, p in enumerate(bag.patches):
      if magnification is not None and abs(p.magnification - magnification) > 1e-3 * magnification:
        continue
      label = p.label or None
      if label in exclude:
        excluded += 1
        continue
      keys.append((r, j))
      ids.append(f"{bag.slide_id}/{bag.bag_index}/{j}@{p.magnification:g}x")
      labels.append(label)
      captions.append(p.caption if p.has_caption else None)
      mpps.append(10.0 / p.magnification)
      slides.append(bag.slide_id)
  if not keys:
    raise DataError(f"records:{directory}: no patches{f' at {magnification:g}x' if magnification else ''}")
  warnings = [f"records:{directory}: left out {excluded} patch(es) labelled {list(exclude)}"] if excluded else []
  ds = RecordsDataset(directory, source, os.path.basename(os.path.normpath(directory)), keys, ids, labels,
                      captions=captions, mpp=mpps, warnings=warnings, slides=slides)
  ds.magnification = magnification
  return ds


# -- slides --------------------------------------------------------------------------------


class SlideDataset(Dataset):
  """Labelled square regions of slides; keys are (slide path, centre x, centre y, mag).

  Images are cut from the slide at the view's magnification around the same centre, so a
  cross-magnification run sees the same place at every power (re-cut, not resampled).
  """

  kind = "slides"

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._local = threading.local()

  def _slide(self, path):
    from pathjax.wsi import slide as slide_lib
    slides = getattr(self._local, "slides", None)
    if slides is None:
      slides = self._local.slides = {}
    if path not in slides:
      slides[path] = slide_lib.open_slide(path)
    return slides[path]

  def image(self, i: int, size: int) -> np.ndarray:
    path, cx, cy, mag = self.keys[i]
    target = self.magnification or mag
    try:
      s = self._slide(path)
      s.check_magnification(target)
      extent = s.extent_for(target, size)
      return s.read_region(int(round(cx - extent / 2)), int(round(cy - extent / 2)), extent, size)
    except Exception as e:
      raise ImageReadError(self.ids[i], f"{type(e).__name__}: {e}") from e

  def at_magnification(self, magnification: float | None) -> "Dataset":
    if magnification is None:
      return self
    new = copy.copy(self)
    new.magnification = float(magnification)
    return new


def _find_slide(directory: str, slide_id: str) -> str | None:
  for ext in SLIDE_EXTENSIONS:
    p = os.path.join(directory, slide_id + ext)
    if os.path.exists(p):
      return p
  return None


def slides_dataset(directory: str, *, labels_file: str | None = None, ref_mag: float | None = 20.0,
                   patch_size: int = 224, exclude: Sequence[str] = ("background",)) -> SlideDataset:
  """Regions of the slides in `directory` from a captions/labels JSONL file.

  Each line: {"slide": id, "x", "y" (level-0 top-left of a grid patch), "magnification",
  "label", optional "caption"} (what `write_synthetic_slides` writes). Lines at `ref_mag`
  (None: all) become examples centred on their patch; the patch's extent is
  patch_size * slide magnification / line magnification.
  """
  from pathjax.wsi import slide as slide_lib
  labels_file = labels_file or os.path.join(directory, "captions.jsonl")
  if not os.path.isfile(labels_file):
    raise DataError(f"slides:{directory}: no labels file {labels_file}; give one with ?labels=FILE "
                    "(JSON lines with slide, x, y, magnification, label)")
  rows = _read_manifest_rows(labels_file)
  mags = {}
  keys, ids, labels, captions, mpps, warnings, slides = [], [], [], [], [], [], []
  missing, excluded = set(), 0
  for row in rows:
    mag = float(row.get("magnification") or 0)
    if ref_mag is not None and abs(mag - ref_mag) > 1e-3:
      continue
    label = row.get("label") or None
    if label in exclude:
      excluded += 1
      continue
    sid = str(row["slide"])
    path = _find_slide(directory, sid)
    if path is None:
      missing.add(sid)
      continue
    if path not in mags:
      with slide_lib.open_slide(path) as s:
        mags[path] = s.magnification
    extent = patch_size * mags[path] / mag
    cx, cy = float(row["x"]) + extent / 2, float(row["y"]) + extent / 2
    keys.append((path, cx, cy, mag))
    ids.append(f"{sid}/{int(row['x'])}_{int(row['y'])}@{mag:g}x")
    labels.append(label)
    captions.append(row.get("caption") or None)
    mpps.append(10.0 / mag)
    slides.append(sid)
  if missing:
    warnings.append(f"slides:{directory}: no slide file for {sorted(missing)}; their lines were skipped")
  if excluded:
    warnings.append(f"slides:{directory}: left out {excluded} region(s) labelled {list(exclude)}")
  if not keys:
    raise DataError(f"slides:{directory}: no labelled regions at {ref_mag:g}x in {labels_file}" if ref_mag
                    else f"slides:{directory}: no labelled regions in {labels_file}")
  return SlideDataset(os.path.basename(os.path.normpath(directory)), keys, ids, labels,
                      captions=captions, mpp=mpps, warnings=warnings, slides=slides)


# ---------------------------------------------------------------------------------------
# Specs


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """'kind:target?k=v&...' -> (kind, target, options); the kind is guessed for bare paths."""
  text, _, query = spec.partition("?")
  options = {k: v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)}
  kind, sep, target = text.partition(":")
  if not sep or kind not in KINDS:
    target = text
    lower = text.lower()
    if lower.endswith(".csv"):
      kind = "csv"
    elif lower.endswith((".jsonl", ".json")):
      kind = "jsonl"
    elif os.path.isdir(text) and os.path.exists(os.path.join(text, "manifest.json")):
      kind = "records"
    elif os.path.isdir(text):
      kind = "imagefolder"
    else:
      raise DataError(
          f"cannot tell what data spec {spec!r} is; use one of: imagefolder:DIR, csv:FILE, "
          "jsonl:FILE, tfds:NAME[:SPLIT], records:DIR[@MAG], slides:DIR (options after ?, e.g. "
          "imagefolder:/data/CRC-VAL-HE-7K?mpp=0.5)")
  return kind, target, options


def _split_at(target: str) -> tuple[str, float | None]:
  head, sep, tail = target.rpartition("@")
  if sep:
    try:
      return head, float(tail.rstrip("x"))
    except ValueError:
      pass
  return target, None


def load_dataset(spec: str) -> Dataset:
  """A `Dataset` for a data spec (see the module docstring).

  This is also what `pathjax embed --data SPEC` uses: iterate `extract_features` (in
  pathjax.evaluate.features) over it to get ids, labels and embeddings.
  """
  kind, target, opts = parse_spec(spec)
  known = {"mpp", "magnification", "root", "data_dir", "limit", "exclude", "ref_mag", "patch_size",
           "labels", "seed"}
  unknown = set(opts) - known
  if unknown:
    raise DataError(f"data spec {spec!r}: unknown option(s) {sorted(unknown)}; valid: {sorted(known)}")
  mpp = _float(opts.get("mpp"))
  if mpp is None and _float(opts.get("magnification")):
    mpp = 10.0 / _float(opts["magnification"])
  exclude = tuple(x for x in opts.get("exclude", "background").split(",") if x)
  if kind == "imagefolder":
    ds = image_folder(target, mpp=mpp)
  elif kind in ("csv", "jsonl"):
    ds = manifest(target, root=opts.get("root"), mpp=mpp)
  elif kind == "tfds":
    name, _, split = target.partition(":")
    ds = tfds_dataset(name, split or "test", data_dir=opts.get("data_dir"), mpp=mpp)
  elif kind == "records":
    directory, mag = _split_at(target)
    ds = records_dataset(directory, mag, exclude=exclude)
  elif kind == "slides":
    ref = opts.get("ref_mag", "20")
    ds = slides_dataset(target, labels_file=opts.get("labels"),
                        ref_mag=None if ref in ("", "all") else float(ref),
                        patch_size=int(opts.get("patch_size", 224)), exclude=exclude)
  else:  # pragma: no cover - parse_spec guards
    raise DataError(f"unknown data kind {kind!r}")
  if kind in ("imagefolder", "csv", "jsonl", "tfds") and "exclude" in opts:
    keep = [i for i, l in enumerate(ds.labels) if l not in exclude]
    ds = ds.subset(keep)
  if opts.get("limit"):
    ds = ds.limit(int(opts["limit"]), seed=int(opts.get("seed", 0)))
  ds.spec = spec
  return ds

