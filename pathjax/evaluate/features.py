"""Embedding datasets with a model: one `Embedder` over a model directory or a recipe.

`Embedder` holds two functions into the shared image-text space, `image(uint8 NHWC) ->
[N, E]` and `text(list of str) -> [N, E]` (L2-normalised here, whatever the source
returns), and the image size the model takes. `from_model_dir` wraps
`pathjax.models.model_dir.Model`; `from_recipe` wraps a recipe's `encoders(params)` (used by
periodic evaluation inside training, jitted once per evaluator).

`extract_features(dataset, embedder)` reads images on a few threads, runs fixed-size
batches (the last one padded, so the model compiles once), counts and names unreadable
images instead of failing, and shows a progress bar on a terminal.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from typing import Callable, Sequence

import numpy as np
import sklearn.preprocessing

from pathjax.evaluate import data as data_lib


class EmbedderError(ValueError):
  """A model that cannot do what was asked (e.g. zero-shot without a text tower)."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows [N, D] scaled to unit L2 norm (zero rows stay zero), float32."""
  return sklearn.preprocessing.normalize(np.asarray(x, np.float32))


@dataclasses.dataclass
class Embedder:
  image_fn: Callable[[np.ndarray], np.ndarray]
  text_fn: Callable[[list[str]], np.ndarray] | None
  image_size: int
  name: str = "model"
  text_batch_size: int = 256

  @property
  def has_text(self) -> bool:
    return self.text_fn is not None

  def image(self, images: np.ndarray) -> np.ndarray:
    return l2_normalize(np.asarray(self.image_fn(images)))

  def text(self, texts: Sequence[str]) -> np.ndarray:
    if self.text_fn is None:
      raise EmbedderError(f"{self.name} has no text tower, so it cannot embed text (zero-shot "
                          "and retrieval need one); use linear_probe or knn, or a model with a "
                          "text tower")
    texts = list(texts)
    out = [np.asarray(self.text_fn(texts[i:i + self.text_batch_size]))
           for i in range(0, len(texts), self.text_batch_size)]
    return l2_normalize(np.concatenate(out) if out else np.zeros((0, 1), np.float32))

  def require_text(self, task: str) -> None:
    if not self.has_text:
      raise EmbedderError(f"{task} needs a text tower, but {self.name} has none (an image-only "
                          "model directory); run linear_probe or knn instead, or use a model "
                          "directory with a text tower")

  # -- constructors -----------------------------------------------------------------------

  @classmethod
  def from_model_dir(cls, model_or_path) -> "Embedder":
    """From a `pathjax.models.model_dir.Model` (or its path)."""
    model = _load_model(model_or_path) if isinstance(model_or_path, str) else model_or_path
    has_text = bool(getattr(model, "has_text", False))

    def image_fn(images):
      return model.encode_image(images, batch_size=len(images))

    def text_fn(texts):
      # Padded to a multiple of 64 rows so the text tower compiles for a few shapes only.
      texts = list(texts)
      n = len(texts)
      padded = texts + [texts[-1]] * ((-n) % 64)
      return np.asarray(model.encode_text(padded, batch_size=len(padded)))[:n]

    return cls(image_fn, text_fn if has_text else None, int(getattr(model, "image_size", 224)),
               name=getattr(model, "path", "model"))

  @classmethod
  def from_encoders(cls, image_fn, text_fn, tokenizer, image_size: int, name: str = "model") -> "Embedder":
    """From jittable `image_fn(uint8 NHWC)` / `text_fn(int ids)` and a TextTokenizer.

    Texts are tokenized and padded to a multiple of 64 rows so the text function compiles
    for a few shapes only.
    """
    def texts_to_features(texts):
      ids = np.asarray(tokenizer(list(texts)), np.int32)
      n = len(ids)
      pad = (-n) % 64
      if pad:
        ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
      return np.asarray(text_fn(ids))[:n]

    return cls(lambda x: np.asarray(image_fn(x)), texts_to_features if text_fn is not None else None,
               image_size, name=name)


_MODEL_CACHE: dict = {}


def _load_model(path: str):
  """Loads a model directory once per process (keyed by path and params file time), so
  several evaluations in one process share its compiled functions."""
  import os
  from pathjax.models.model_dir import PARAMS_FILE, load_model_dir
  params = os.path.join(path, PARAMS_FILE)
  key = (os.path.realpath(path), os.path.getmtime(params) if os.path.exists(params) else None)
  if key not in _MODEL_CACHE:
    if len(_MODEL_CACHE) >= 2:
      _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    _MODEL_CACHE[key] = load_model_dir(path)
  return _MODEL_CACHE[key]


@dataclasses.dataclass
class Features:
  """Embeddings of the readable examples of a dataset (skipped ones named in `skipped`)."""
  ids: list[str]
  labels: list[str | None]
  captions: list[str | None]
  embeddings: np.ndarray          # [N, E] float32, L2-normalised
  indices: np.ndarray             # [N] positions in the dataset
  skipped: list[tuple[str, str]]  # (id, reason) of unreadable examples

  def __len__(self) -> int:
    return len(self.ids)


def _progress(total: int, desc: str, enabled: bool | None):
  from tqdm import tqdm
  disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
  return tqdm(total=total, desc=desc, unit="img", disable=disable, dynamic_ncols=True)


def extract_features(dataset: data_lib.Dataset, embedder: Embedder, *, batch_size: int = 64,
                     workers: int = 4, progress: bool | None = None, desc: str | None = None,
                     report: Callable[[str], None] | None = print) -> Features:
  """Embeds every readable image of `dataset` (at its view's magnification)."""
  n = len(dataset)
  size = embedder.image_size
  good_idx, chunks, skipped = [], [], []
  bar = _progress(n, desc or f"embed {dataset.name}", progress)

  def load(i):
    try:
      return i, dataset.image(i, size), None
    except data_lib.ImageReadError as e:
      return i, None, e.reason

  def flush(batch_idx, batch_imgs):
    real = len(batch_imgs)
    arr = np.stack(batch_imgs)
    if real < batch_size:
      arr = np.concatenate([arr, np.zeros((batch_size - real,) + arr.shape[1:], np.uint8)])
    chunks.append(embedder.image(arr)[:real])
    good_idx.extend(batch_idx)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending_idx, pending_img = [], []
    for i, img, err in pool.map(load, range(n)):
      bar.update(1)
      if img is None:
        skipped.append((dataset.ids[i], err))
        continue
      pending_idx.append(i)
      pending_img.append(img)
      if len(pending_img) == batch_size:
        flush(pending_idx, pending_img)
        pending_idx, pending_img = [], []
    if pending_img:
      flush(pending_idx, pending_img)
  bar.close()
  if skipped and report is not None:
    names = ", ".join(f"{i} ({r})" for i, r in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    report(f"warning: skipped {len(skipped)} unreadable image(s) of {n} in {dataset.name}: {names}{more}")
  if not good_idx:
    raise data_lib.DataError(f"{dataset.name}: none of the {n} images could be read "
                             f"(first: {skipped[0] if skipped else None})")
  idx = np.asarray(good_idx, np.int64)
  return Features(ids=[dataset.ids[i] for i in idx], labels=[dataset.labels[i] for i in idx],
                  captions=[dataset.captions[i] for i in idx], embeddings=np.concatenate(chunks),
                  indices=idx, skipped=skipped)


def save_features(feats: Features, out: str) -> list[str]:
  """Writes embeddings with their ids for downstream multiple-instance learning.

  `out` ending in .parquet: one table (id, label, caption, embedding as a float32 list).
  Otherwise `out` is a .npy path: the [N, E] array there, plus `<stem>.index.csv` (row, id,
  label, caption) beside it. Returns the written paths.
  """
  import csv
  import os
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if out.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    emb = np.asarray(feats.embeddings, np.float32)
    table = pa.table({
        "id": feats.ids, "label": feats.labels, "caption": feats.captions,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])})
    pq.write_table(table, out)
    return [out]
  path = out if out.endswith(".npy") else out + ".npy"
  np.save(path, np.asarray(feats.embeddings, np.float32))
  index = path[:-4] + ".index.csv"
  with open(index, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(["row", "id", "label", "caption"])
    for i, (id_, label, cap) in enumerate(zip(feats.ids, feats.labels, feats.captions)):
      w.writerow([i, id_, label or "", cap or ""])
  return [path, index]
