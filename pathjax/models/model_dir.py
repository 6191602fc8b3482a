"""Model directories: what `pathjax convert` and the trainer's export write, and what
`pathjax embed` and evaluation load.

    DIR/model.json          {"towers": {"vision": {"kind": "vit", "config": {...}, "projection": bool},
                                        "text": {"kind": "clip_text", "config": {...}}},
                             "preprocess": {"image_size", "mean", "std"},
                             "tokenizer": "tokenizer" (a directory inside DIR) | hub name | null,
                             "pathjax_version", "source"}
    DIR/params.safetensors  flat tensors in their dtype (bf16 stays bf16): "{tower}/params/{a/b/c}"
                            and "{tower}/projection"; above `max_shard_bytes`, shards
                            params-0000i-of-0000N.safetensors + params.safetensors.index.json
    DIR/tokenizer/          (optional) a copy of the tokenizer directory

Directories are written atomically (a temporary directory renamed into place), so a reader
never sees half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import jax.numpy as jnp
import numpy as np

from pathjax.convert.safetensors_io import (INDEX_SUFFIX, WeightsError, check_tree,
                                            open_safetensors, save_safetensors)
from pathjax.input.transforms import IMAGENET_MEAN, IMAGENET_STD

MODEL_JSON = "model.json"
PARAMS_FILE = "params.safetensors"
PARAMS_INDEX = "params" + INDEX_SUFFIX
MAX_SHARD_BYTES = 5 * 10 ** 9  # Hugging Face's default shard size
TOKENIZER_DIR = "tokenizer"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelDirError(ValueError):
  """A model directory that cannot be loaded as it is (the message says what and where)."""


def _kinds() -> dict[str, tuple[type, Callable, Callable]]:
  """kind -> (module class, config_dict(module), dummy input(s) for init: an array or a tuple)."""
  from pathjax.models import llm as llm_lib
  from pathjax.models import pathflip as pathflip_lib
  from pathjax.models import projector as projector_lib
  from pathjax.models import qformer as qformer_lib
  from pathjax.models import text as text_lib
  from pathjax.models import vit as vit_lib
  return {
      "llm": (llm_lib.LLM, llm_lib.config_dict, lambda m: jnp.zeros((1, 8), jnp.int32)),
      "qformer": (qformer_lib.QFormer, qformer_lib.config_dict, qformer_lib.example_inputs),
      "projector": (projector_lib.Projector, projector_lib.config_dict, projector_lib.example_inputs),
      "pathflip_heads": (pathflip_lib.PathFLIPHeads, pathflip_lib.config_dict,
                         pathflip_lib.example_inputs),
      "vit": (vit_lib.ViT, vit_lib.config_dict,
              lambda m: jnp.zeros((1, m.image_size, m.image_size, 3), jnp.float32)),
      "clip_text": (text_lib.TextTransformer, text_lib.config_dict,
                    lambda m: jnp.zeros((1, m.context_length), jnp.int32)),
  }


def build_module(kind: str, config: Mapping[str, Any], **overrides):
  kinds = _kinds()
  if kind not in kinds:
    raise ModelDirError(f"unknown tower kind {kind!r}; valid: {', '.join(kinds)}")
  cls, config_dict, _ = kinds[kind]
  valid = set(config_dict(cls()))
  unknown = set(config) - valid
  if unknown:
    raise ModelDirError(f"unknown {kind} config fields {sorted(unknown)}; valid: "
                        f"{', '.join(sorted(valid))}")
  return cls(**{**config, **overrides})


def abstract_params(kind: str, module) -> dict[str, Any]:
  """Shapes of the module's params (no computation, no allocation)."""
  import flax.linen as nn
  _, _, dummy = _kinds()[kind]
  inputs = dummy(module)
  inputs = inputs if isinstance(inputs, tuple) else (inputs,)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
  return nn.unbox(variables)["params"]


def _shape_only(x):
  """Arrays stay where they are (the writer fetches one tensor at a time); other leaves
  (lists, scalars) become numpy."""
  return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def save_model_dir(out_dir: str, towers: Mapping[str, Mapping[str, Any]], *,
                   preprocess: Mapping[str, Any] | None = None, tokenizer_dir: str | None = None,
                   tokenizer: str | None = None, source: str | None = None,
                   check: bool = True, max_shard_bytes: int | None = MAX_SHARD_BYTES,
                   overwrite: bool = False, extra_meta: Mapping[str, Any] | None = None) -> str:
  """Writes a model directory atomically; returns its path.

  An existing `out_dir` is replaced only when it is a pathjax model directory (has
  model.json) and `overwrite` is set; an empty directory is filled; anything else (a file,
  a folder with other contents) is refused with ModelDirError, never deleted. Files and
  folders are created with the user's umask. Non-finite weights are refused.

  towers: name -> dict(kind="vit"|"clip_text", module=flax module, params=pytree (with or
  without the "params" level), projection=np.ndarray [D, E] or None).
  preprocess: {"image_size", "mean", "std"} (defaults: the vision tower's image size and
  ImageNet statistics). tokenizer_dir is copied into DIR/tokenizer; `tokenizer` may instead
  name a hub tokenizer. Tensors keep their dtype and are fetched from the devices one at a
  time while writing; above `max_shard_bytes` the params are written as shards with an index.
  extra_meta: more top-level model.json entries (an LLM's "generation" ids).
  """
  import flax.linen as nn

  from pathjax import __version__
  if not towers:
    raise ModelDirError("a model directory needs at least one tower")
  tensors: dict[str, np.ndarray] = {}
  meta_towers: dict[str, Any] = {}
  for name, tower in towers.items():
    if "/" in name:
      raise ModelDirError(f"tower name {name!r} must not contain '/'")
    kind, module = tower["kind"], tower["module"]
    kinds = _kinds()
    if kind not in kinds:
      raise ModelDirError(f"unknown tower kind {kind!r}; valid: {', '.join(kinds)}")
    params = nn.unbox(tower["params"])
    if isinstance(params, Mapping) and set(params) == {"params"}:
      params = params["params"]
    params = jax.tree.map(_shape_only, dict(params) if not isinstance(params, dict) else params)
    _check_finite(flatten_dict(params, sep="/"), f"{name} tower")
    if check:
      check_tree(abstract_params(kind, module), params, what=f"{name} tower params")
    for key, value in flatten_dict(params, sep="/").items():
      tensors[f"{name}/params/{key}"] = value
    projection = tower.get("projection")
    if projection is not None:
      tensors[f"{name}/projection"] = _shape_only(projection)
      _check_finite({"projection": tensors[f"{name}/projection"]}, f"{name} tower")
    meta_towers[name] = {"kind": kind, "config": kinds[kind][1](module),
                         "projection": projection is not None}

  if preprocess is None:
    preprocess = {}
  preprocess = dict(preprocess)
  vision = next((t["module"] for t in towers.values() if t["kind"] == "vit"), None)
  if vision is not None:
    preprocess.setdefault("image_size", int(vision.image_size))
    preprocess.setdefault("mean", list(IMAGENET_MEAN))
    preprocess.setdefault("std", list(IMAGENET_STD))
  meta = {"towers": meta_towers, "preprocess": preprocess,
          "tokenizer": TOKENIZER_DIR if tokenizer_dir else tokenizer,
          "pathjax_version": __version__, "source": source, **(extra_meta or {})}

  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  _check_out_dir(out_dir, overwrite)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  except OSError as e:
    raise ModelDirError(f"cannot create the model directory {out_dir}: {e.strerror or e}; "
                        "choose an --out you can write to") from None
  try:
    save_safetensors(tensors, os.path.join(tmp, PARAMS_FILE),
                     metadata={"format": "pathjax", "pathjax_version": __version__},
                     max_shard_bytes=max_shard_bytes)
    if tokenizer_dir:
      if not os.path.isdir(tokenizer_dir):
        raise ModelDirError(f"tokenizer directory {tokenizer_dir} does not exist")
      shutil.copytree(tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR))
    with open(os.path.join(tmp, MODEL_JSON), "w") as f:
      json.dump(meta, f, indent=2, default=_json_default)
    _apply_umask(tmp)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)  # an empty directory: fill it (checked empty above)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "m"))
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _check_finite(flat: Mapping[str, np.ndarray], what: str) -> None:
  bad = [k for k, v in flat.items()
         if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v))]
  if bad:
    raise ModelDirError(f"{what} has NaN or Inf values in {', '.join(sorted(bad)[:8])}"
                        + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
                        + "; the weights are damaged (re-download or re-export them)")


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  """Refuses to replace anything but a model directory, and that only with `overwrite`."""
  if not os.path.lexists(out_dir):
    return
  if not os.path.isdir(out_dir) or os.path.islink(out_dir):
    raise ModelDirError(f"--out {out_dir} exists and is not a directory; choose a new path "
                        "(nothing was written)")
  if not os.listdir(out_dir):
    return
  if not os.path.isfile(os.path.join(out_dir, MODEL_JSON)):
    raise ModelDirError(f"--out {out_dir} is a non-empty directory that is not a pathjax model "
                        "directory; choose a new or empty path (nothing was written or deleted)")
  if not overwrite:
    raise ModelDirError(f"--out {out_dir} already holds a model directory; pass --overwrite to "
                        "replace it, or choose another path")


def _apply_umask(root: str) -> None:
  """mkdtemp/mkstemp create 0700/0600; give the tree the modes the user's umask asks for."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(root, 0o777 & ~umask)
  for base, dirs, files in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(base, d), 0o777 & ~umask)
    for f in files:
      os.chmod(os.path.join(base, f), 0o666 & ~umask)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"cannot write {type(x).__name__} to model.json")


class Tower:
  """One loaded tower: module, params, optional projection and a jitted apply."""

  def __init__(self, name: str, kind: str, module, params, projection: np.ndarray | None):
    self.name, self.kind, self.module = name, kind, module
    self.params = params
    self.projection = None if projection is None else jnp.asarray(projection)
    self._apply = jax.jit(lambda p, x: module.apply({"params": p}, x))

  def __call__(self, x) -> dict[str, jax.Array]:
    return self._apply(self.params, x)


class Model:
  """A loaded model directory. `encode_image` / `encode_text` return numpy features."""

  def __init__(self, path: str, meta: dict[str, Any], towers: dict[str, Tower]):
    self.path, self.meta, self.towers = path, meta, towers
    self.preprocess = meta.get("preprocess") or {}
    self._tokenizer = None
    self._image_fns: dict[tuple, Callable] = {}

  # ------------------------------------------------------------------------------ towers
  @property
  def has_text(self) -> bool:
    return "text" in self.towers

  @property
  def has_vision(self) -> bool:
    return "vision" in self.towers

  def _tower(self, name: str) -> Tower:
    if name not in self.towers:
      raise ModelDirError(f"the model in {self.path} has no {name} tower (towers: "
                          f"{', '.join(self.towers)})")
    return self.towers[name]

  @property
  def image_size(self) -> int:
    return int(self.preprocess.get("image_size") or self._tower("vision").module.image_size)

  # ------------------------------------------------------------------------------ images
  def _image_fn(self, dtype_kind: str, in_hw: tuple[int, int], output: str):
    key = (dtype_kind, in_hw, output)
    if key in self._image_fns:
      return self._image_fns[key]
    tower = self._tower("vision")
    size = self.image_size
    mean = jnp.asarray(self.preprocess.get("mean", IMAGENET_MEAN), jnp.float32)
    std = jnp.asarray(self.preprocess.get("std", IMAGENET_STD), jnp.float32)
    proj = tower.projection

    def fn(params, images):
      x = images
      if dtype_kind == "uint8":
        x = x.astype(jnp.float32) / 255.0
        if tuple(x.shape[1:3]) != (size, size):
          x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
        x = (x - mean) / std
      out = tower.module.apply({"params": params}, x)
      if output != "pooled":
        return out[output]
      feats = out["pooled"]
      if proj is not None:
        feats = feats @ proj.astype(feats.dtype)
      return feats

    self._image_fns[key] = jax.jit(fn)
    return self._image_fns[key]

  def encode_image(self, images, *, batch_size: int = 64, output: str = "pooled",
                   progress: bool = False) -> np.ndarray:
    """Features of images [N, H, W, 3]: uint8 (resized to the model's size and normalised
    here) or float (already normalised). `output`: "pooled" (projected when the tower has a
    projection), or a raw ViT output ("tokens", "patch_tokens")."""
    images = np.asarray(images) if not isinstance(images, jax.Array) else images
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3] (NHWC RGB); got shape {tuple(images.shape)}")
    kind = "uint8" if images.dtype == np.uint8 else "float"
    if kind == "float":
      images = images.astype(np.float32)
    fn = self._image_fn(kind, tuple(images.shape[1:3]), output)
    params = self._tower("vision").params
    return _batched(lambda b: fn(params, b), images, batch_size, progress, "images")

  # -------------------------------------------------------------------------------- text
  @property
  def tokenizer(self):
    """The stored tokenizer as a pathjax TextTokenizer (fixed-length CLIP-style ids)."""
    if self._tokenizer is None:
      name = self.meta.get("tokenizer")
      if not name:
        raise ModelDirError(f"the model in {self.path} stores no tokenizer; pass token ids "
                            "(--text-ids) or convert with --tokenizer DIR")
      local = os.path.join(self.path, name)
      if name == TOKENIZER_DIR and not os.path.isdir(local):
        raise ModelDirError(f"{os.path.join(self.path, MODEL_JSON)} names the tokenizer directory "
                            f"{local}, which is missing; copy the tokenizer there or re-export "
                            "the model with its tokenizer")
      where = local if os.path.isdir(local) else name
      text = self._tower("text").module
      try:
        from pathjax.input.tokenize import TextTokenizer, load_tokenizer
        self._tokenizer = TextTokenizer(load_tokenizer(where), context_length=text.context_length)
      except ImportError:  # pragma: no cover - the tokenize module ships with pathjax
        from transformers import AutoTokenizer
        self._tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(where, local_files_only=True),
                                       text.context_length)
      eos = getattr(self._tokenizer, "eos_id", None)
      if text.eos_id >= 0 and eos is not None and eos != text.eos_id:
        raise ModelDirError(f"the tokenizer's end-of-text id {eos} differs from the text "
                            f"tower's eos_id {text.eos_id}")
      if text.eos_id < 0 and eos is not None and not self._tokenizer.eos_is_max:
        raise ModelDirError("the text tower pools at argmax(ids) but the tokenizer's "
                            f"end-of-text id {eos} is not its largest id")
    return self._tokenizer

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    return np.asarray(self.tokenizer(list(texts)), np.int32)

  def encode_text(self, texts_or_ids, *, batch_size: int = 256,
                  progress: bool = False) -> np.ndarray:
    """Features of strings (tokenized with the stored tokenizer) or int ids [N, T]."""
    tower = self._tower("text")
    if isinstance(texts_or_ids, str):
      texts_or_ids = [texts_or_ids]
    if isinstance(texts_or_ids, (list, tuple)) and texts_or_ids and isinstance(texts_or_ids[0], str):
      ids = self.tokenize(texts_or_ids)
    else:
      ids = np.asarray(texts_or_ids)
      if ids.ndim == 1:
        ids = ids[None]
      if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be an int array [N, T]; got {ids.dtype} {ids.shape}")
      ctx = tower.module.context_length
      if ids.shape[1] > ctx:
        raise ValueError(f"token ids have {ids.shape[1]} positions; the text tower's context "
                         f"length is {ctx}")
      vocab = int(tower.module.vocab_size)
      outside = np.argwhere((ids < 0) | (ids >= vocab))
      if len(outside):
        row, col = (int(v) for v in outside[0])
        raise ValueError(f"token id {int(ids[row, col])} at text {row}, position {col} is outside "
                         f"the vocabulary [0, {vocab}) of the text tower ({len(outside)} ids "
                         "outside); tokenize with the model's own tokenizer")
      ids = ids.astype(np.int32)
    proj = tower.projection

    def fn(b):
      feats = tower(b)["pooled"]
      return feats if proj is None else feats @ proj
    return _batched(fn, ids, batch_size, progress, "texts")


class _HFTokenizer:
  """Fallback when pathjax.input.tokenize is unavailable: a transformers tokenizer padded
  to the context length."""

  def __init__(self, tok, context_length):
    self.tok, self.context_length = tok, context_length
    self.eos_id = tok.eos_token_id
    self.eos_is_max = self.eos_id == len(tok) - 1

  def __call__(self, texts):
    return self.tok(list(texts), padding="max_length", truncation=True,
                    max_length=self.context_length, return_tensors="np")["input_ids"]


def _batched(fn, data, batch_size: int, progress: bool, unit: str) -> np.ndarray:
  """Runs fn over fixed-size batches (the last one padded, so one compile) and concatenates."""
  n = len(data)
  if n == 0:
    raise ValueError(f"no {unit} to encode")
  batch_size = max(1, min(batch_size, n))
  outs = []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n, unit=unit[:-1] if unit.endswith("s") else unit, desc="embed")
  for start in range(0, n, batch_size):
    chunk = data[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      pad = np.zeros((batch_size - real,) + tuple(chunk.shape[1:]), chunk.dtype)
      chunk = np.concatenate([np.asarray(chunk), pad])
    outs.append(np.asarray(jax.device_get(fn(chunk)))[:real])
    if bar is not None:
      bar.update(real)
  if bar is not None:
    bar.close()
  return np.concatenate(outs)


def read_model_json(path: str) -> dict[str, Any]:
  file = os.path.join(path, MODEL_JSON)
  if not os.path.isfile(file):
    raise ModelDirError(f"{path} is not a pathjax model directory (no {MODEL_JSON}); create "
                        "one with `pathjax convert` or the trainer's export")
  try:
    with open(file) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModelDirError(f"cannot read {file}: {e}") from e
  if not isinstance(meta, dict) or not isinstance(meta.get("towers"), dict) or not meta["towers"]:
    raise ModelDirError(f"{file} has no towers")
  return meta


def read_for_config(field: str, path: str, tower: str | None = None, hint: str = "") -> dict[str, Any]:
  """read_model_json for the directory a config field names: problems become ConfigErrors
  that name the field (exit code 2); with `tower`, the directory must hold that tower
  (`hint` says how to make one)."""
  from pathjax.config_lib import ConfigError
  try:
    meta = read_model_json(path)
  except ModelDirError as e:
    raise ConfigError(f"{field}: {e}") from None
  if tower is not None and tower not in meta["towers"]:
    raise ConfigError(f"{field} {path} has no {tower} tower (towers: {', '.join(meta['towers'])})"
                      + (f"; {hint}" if hint else ""))
  return meta


def params_reader(path: str):
  """A lazy reader over DIR's params (one file, or shards with an index)."""
  index, single = os.path.join(path, PARAMS_INDEX), os.path.join(path, PARAMS_FILE)
  file = index if os.path.isfile(index) else single
  if not os.path.isfile(file):
    raise ModelDirError(f"{path} has no {PARAMS_FILE} (or {PARAMS_INDEX})")
  try:
    return open_safetensors(file)
  except WeightsError as e:
    raise ModelDirError(f"cannot read the params file {file}: {e}") from e


def place_tower(path: str, tower: str, abstract: Mapping[str, Any],
                only: Iterable[str] | None = None) -> dict[str, jax.Array]:
  """One tower's params streamed from DIR straight into their shardings, tensor by tensor.

  `abstract`: flat "a/b/c" paths (relative to the tower's params) -> jax.ShapeDtypeStruct
  carrying a sharding (e.g. a train-state layout's params); values are cast to its dtype.
  The whole tower is checked; `only` (paths) limits what is read and placed.
  Names and shapes are checked from the file headers before anything is read. Host memory
  stays near the largest tensor (see safetensors_io.place); returns flat path -> jax.Array.
  """
  from pathjax.convert import safetensors_io as sio
  meta = read_model_json(path)
  if tower not in meta["towers"]:
    raise ModelDirError(f"the model in {path} has no {tower} tower (towers: "
                        f"{', '.join(meta['towers'])})")
  reader = params_reader(path)
  prefix = f"{tower}/params/"
  stored = {k[len(prefix):]: jax.ShapeDtypeStruct(reader.shape(k), reader.dtype(k))
            for k in reader if k.startswith(prefix)}
  try:
    check_tree(unflatten_dict(dict(abstract), sep="/"), unflatten_dict(stored, sep="/"), what=f"{tower} tower params",
               source=reader.path)
  except WeightsError as e:
    raise ModelDirError(str(e)) from e
  keep = set(abstract) if only is None else set(only)
  plan = {k: sio.Target(prefix + k, a.sharding, dtype=a.dtype) for k, a in abstract.items()
          if k in keep}
  return sio.place(reader, plan)


def load_model_dir(path: str, *, dtype=jnp.float32, towers: Sequence[str] | None = None) -> Model:
  """Loads a model directory, checking every tensor's name and shape against the modules."""
  meta = read_model_json(path)
  reader = params_reader(path)
  file = reader.path
  try:
    tensors = {key: reader.get(key) for key in reader}
  except WeightsError as e:
    raise ModelDirError(f"cannot read the params file {file}: {e}") from e
  by_tower: dict[str, dict[str, np.ndarray]] = {}
  stray = []
  for key, value in tensors.items():
    name, _, rest = key.partition("/")
    if name not in meta["towers"]:
      stray.append(key)
    else:
      by_tower.setdefault(name, {})[rest] = value
  if stray:
    raise ModelDirError(f"{file}: unexpected keys for towers not in {MODEL_JSON}: "
                        f"{', '.join(sorted(stray)[:20])}")
  loaded: dict[str, Tower] = {}
  for name, spec in meta["towers"].items():
    if towers is not None and name not in towers:
      continue
    module = build_module(spec["kind"], spec.get("config", {}), dtype=dtype)
    flat = by_tower.get(name, {})
    params = unflatten_dict({k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}, sep="/")
    others = sorted(k for k in flat if not k.startswith("params/") and k != "projection")
    if others:
      raise ModelDirError(f"{file}: unexpected keys {', '.join(f'{name}/{k}' for k in others)}")
    try:
      check_tree(abstract_params(spec["kind"], module), params, what=f"{name} tower params",
                 source=file)
    except WeightsError as e:
      raise ModelDirError(str(e)) from e
    try:
      _check_finite(flat, f"{file}: the {name} tower")
    except ModelDirError as e:
      raise ModelDirError(f"{e}; refusing to load it") from None
    projection = flat.get("projection")
    if spec.get("projection") and projection is None:
      raise ModelDirError(f"{file}: missing key {name}/projection ({MODEL_JSON} says the "
                          f"{name} tower has a projection)")
    if projection is not None and not spec.get("projection"):
      raise ModelDirError(f"{file}: unexpected key {name}/projection")
    if projection is not None:
      width = getattr(module, "num_classes", 0) or module.width
      if projection.ndim != 2 or projection.shape[0] != width:
        raise ModelDirError(f"{file}: shape mismatch for parameter {name}/projection: file has "
                            f"{tuple(projection.shape)}, the model expects ({width}, E)")
    params = jax.tree.map(jnp.asarray, params)
    loaded[name] = Tower(name, spec["kind"], module, params, projection)
  return Model(os.path.abspath(path), meta, loaded)
