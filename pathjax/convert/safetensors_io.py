"""Safetensors in and out, tensor by tensor: the one reader every converter uses.

`open_safetensors(path)` opens a single file, a sharded checkpoint (`*.safetensors.index.json`)
or a directory of `*.safetensors` files and knows every tensor's name, dtype and shape from
the headers alone; `get(key)` reads one tensor in its STORED dtype (bfloat16 and float8 as
`ml_dtypes` arrays, which safetensors' own numpy loader returns too). `place` puts tensors
straight into their target `NamedSharding`s, one tensor at a time, reading only the rows
the addressable devices need, so host memory stays near the largest tensor, not the model.

Data are read with plain positioned reads (`os.pread`) rather than safetensors' `safe_open`:
safe_open memory-maps the file, and every mapped page it touches stays in the process's
resident set until the file is closed. Measured on `pathjax bench load`'s 2 GB checkpoint
(4 shards, largest tensor 256 MiB), reading every tensor and dropping it: safe_open raised
peak RSS by 593 MiB in 13.2 s, positioned reads by 256 MiB (the largest tensor) in 3.6 s.
The header layout (8-byte length, JSON
with dtype / shape / data_offsets) is the published format; round trips are tested against
safetensors' own `load_file` / `save_file`.

No torch and no pickle: `.bin` / `.pt` / `.pth` / `.ckpt` files (PyTorch pickles) are refused
with the one-liner that converts them on a machine that has torch.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import struct
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from flax.traverse_util import flatten_dict

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def is_float(dtype) -> bool:
  """True for numpy floats and ml_dtypes' (bfloat16, float8), which numpy files under 'V'."""
  return any(np.dtype(dtype) == DTYPES[n] for n in FLOAT_NAMES)


class WeightsError(ValueError):
  """A weights file or tree that cannot be used as given (the message says why and where)."""


def conversion_recipe(path: str) -> str:
  out = os.path.splitext(path)[0] + ".safetensors"
  return (
      "python -c \"import torch; from safetensors.torch import save_file; "
      f"sd = torch.load('{path}', map_location='cpu', weights_only=True); "
      "sd = sd.get('state_dict', sd.get('model', sd)); "
      f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\"")


def refuse_pickle(path: str) -> None:
  """Raises WeightsError for PyTorch pickle files, with the way to convert them."""
  if str(path).lower().endswith(PICKLE_SUFFIXES):
    raise WeightsError(
        f"{path} is a PyTorch pickle; pathjax reads safetensors only (no torch, no pickle at "
        "run time). Convert it once on a machine with torch:\n  " + conversion_recipe(str(path)))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int   # absolute byte offset of the data in `file`
  nbytes: int


def _read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  if not os.path.exists(path):
    raise WeightsError(f"weights file {path} does not exist")
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise ValueError("file shorter than the 8-byte header length")
      (n,) = struct.unpack("<Q", head)
      if n > min(size - 8, 100 << 20):
        raise ValueError(f"header length {n} exceeds the file")
      header = json.loads(f.read(n))
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
  except (ValueError, UnicodeDecodeError, OSError) as e:
    raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
  meta = header.pop("__metadata__", None) or {}
  infos = {}
  for key, spec in header.items():
    try:
      dtype = DTYPES[spec["dtype"]]
      shape = tuple(int(s) for s in spec["shape"])
      start, end = (int(x) for x in spec["data_offsets"])
    except KeyError as e:
      raise WeightsError(f"{path}: tensor {key} has unsupported dtype {spec.get('dtype')!r} "
                         f"or a malformed entry ({e})") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - start != nbytes or start < 0 or 8 + n + end > size:
      raise WeightsError(f"{path}: tensor {key} ({spec['dtype']} {list(shape)}) has data "
                         f"offsets {start}..{end} that do not fit its shape or the file; the "
                         "file is truncated or corrupt")
    infos[key] = TensorInfo(path, dtype, shape, 8 + n + start, nbytes)
  return infos, meta


def _files_of(path: str) -> list[str]:
  if os.path.isdir(path):
    indexes = sorted(f for f in os.listdir(path) if f.endswith(INDEX_SUFFIX))
    if len(indexes) == 1:
      return _files_of(os.path.join(path, indexes[0]))
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      pickles = [f for f in os.listdir(path) if f.lower().endswith(PICKLE_SUFFIXES)]
      if pickles:
        refuse_pickle(os.path.join(path, pickles[0]))
      raise WeightsError(f"{path} holds no .safetensors file")
    return files
  if path.endswith(".index.json"):
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except FileNotFoundError:
      raise WeightsError(f"index file {path} does not exist") from None
    except (ValueError, KeyError, TypeError) as e:
      raise WeightsError(f"{path} is not a safetensors index (no weight_map): {e}") from None
    base = os.path.dirname(path)
    return sorted({os.path.join(base, v) for v in weight_map.values()})
  return [path]


class SafetensorsReader(Mapping[str, np.ndarray]):
  """Lazy read-only mapping name -> tensor over one or many safetensors files.

  `reader[key]` / `get(key)` reads that tensor now, in its stored dtype; `shape`, `dtype`,
  `nbytes` and `keys()` come from the headers without reading data.
  """

  def __init__(self, path: str):
    path = os.fspath(path)
    refuse_pickle(path)
    self.path = path
    self.files = _files_of(path)
    self.infos: dict[str, TensorInfo] = {}
    self.metadata: dict[str, str] = {}
    for file in self.files:
      refuse_pickle(file)
      infos, meta = _read_header(file)
      for key in infos:
        if key in self.infos:
          raise WeightsError(f"tensor {key} is stored twice: in {self.infos[key].file} and {file}")
      self.infos.update(infos)
      self.metadata.update(meta)

  def __getitem__(self, key: str) -> np.ndarray:
    return self.get(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self.infos)

  def __len__(self) -> int:
    return len(self.infos)

  def __contains__(self, key: object) -> bool:
    return key in self.infos

  def info(self, key: str) -> TensorInfo:
    if key not in self.infos:
      raise KeyError(f"{key} is not in {self.path}")
    return self.infos[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self.info(key).shape

  def dtype(self, key: str) -> np.dtype:
    return self.info(key).dtype

  def nbytes(self, key: str) -> int:
    return self.info(key).nbytes

  def get(self, key: str) -> np.ndarray:
    return self.read_rows(key, 0, None)

  def read_rows(self, key: str, start: int, stop: int | None) -> np.ndarray:
    """Rows [start, stop) of axis 0 (the whole tensor for a scalar), in the stored dtype."""
    info = self.info(key)
    if not info.shape:
      return _pread(info.file, info.offset, info.nbytes).view(info.dtype).reshape(())
    stop = info.shape[0] if stop is None else stop
    row = info.nbytes // max(info.shape[0], 1)
    buf = _pread(info.file, info.offset + start * row, (stop - start) * row)
    return buf.view(info.dtype).reshape((stop - start,) + info.shape[1:])

  def read_index(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] for a tuple of unit-step slices, reading only the rows it covers."""
    info = self.info(key)
    if not info.shape:
      return self.get(key)
    start, stop, step = index[0].indices(info.shape[0]) if index else (0, info.shape[0], 1)
    if step != 1:
      raise ValueError(f"strided index {index} is not supported")
    block = self.read_rows(key, start, stop)
    rest = tuple(index[1:])
    if all(s == slice(None) or s.indices(n) == (0, n, 1) for s, n in zip(rest, info.shape[1:])):
      return block
    part = block[(slice(None),) + rest]
    out = host_buffer(part.nbytes).view(part.dtype).reshape(part.shape)
    out[...] = part
    return out

  def close(self) -> None:  # positioned reads hold no handles; kept for `with`
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_HUGE_PAGE = 2 << 20


def host_buffer(nbytes: int, align: int = 4096) -> np.ndarray:
  """An uninitialised page-aligned byte buffer: jax's CPU client then adopts it without a
  copy (measured: device_put of 64 MiB bf16 0.14 s unaligned, 0.01 s aligned).

  Buffers of a huge page or more are anonymous mappings advised to use transparent huge
  pages: one page fault per 2 MiB instead of per 4 KiB. Every loaded byte lands in fresh
  memory, and on the 2-core VMs here first-touch page faults cost as much as the disk read
  (`pathjax bench load` prints a first load next to one repeated into memory used before);
  with huge pages first touch was 3-4x faster.
  """
  if nbytes >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, np.uint8)  # keeps the mapping alive; unmapped with the array
  buf = np.empty(nbytes + align, np.uint8)
  start = (-buf.ctypes.data) % align
  return buf[start:start + nbytes]


def _pread(path: str, offset: int, nbytes: int) -> np.ndarray:
  out = host_buffer(nbytes)
  # Touch every page before reading: page faults taken inside the read syscall made cold
  # reads into fresh memory 3x slower here (0.15 vs 0.45 GB/s for 2 GB kept alive).
  out[::4096] = 0
  view = memoryview(out)
  fd = os.open(path, os.O_RDONLY)
  try:
    done = 0
    while done < nbytes:
      got = os.preadv(fd, [view[done:]], offset + done)
      if got <= 0:
        raise WeightsError(f"{path}: unexpected end of file at byte {offset + done}")
      done += got
  finally:
    os.close(fd)
  return out


def open_safetensors(path: str) -> SafetensorsReader:
  """A reader for a .safetensors file, a `*.safetensors.index.json` or a directory."""
  return SafetensorsReader(path)


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors as numpy arrays in their stored dtype (bf16 as ml_dtypes.bfloat16).

  For small models; large ones go through `open_safetensors` / `place` tensor by tensor.
  """
  reader = open_safetensors(path)
  return {key: reader.get(key) for key in reader}


# ------------------------------------------------------------------------------------ write
def _header_bytes(entries: Mapping[str, Any], metadata: Mapping[str, str] | None) -> bytes:
  header = dict(entries)
  if metadata:
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw


def _write_file(path: str, keys: Sequence[str], tensors: Mapping[str, Any],
                metadata: Mapping[str, str] | None) -> None:
  """Writes one file atomically, one tensor in host memory at a time."""
  entries, offset, shapes = {}, 0, {}
  for key in keys:
    dtype, shape = _dtype_shape(tensors[key])
    if dtype not in DTYPE_NAMES:
      raise WeightsError(f"tensor {key} has dtype {dtype}, which safetensors cannot store")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    entries[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    shapes[key] = (dtype, shape)
    offset += nbytes
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(_header_bytes(entries, metadata))
      for key in keys:
        arr = np.asarray(_host(tensors[key]))
        if not arr.flags.c_contiguous:
          arr = arr.copy(order="C")
        if (arr.dtype, arr.shape) != shapes[key]:
          raise WeightsError(f"tensor {key} changed while being written")
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        del arr
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _dtype_shape(x: Any) -> tuple[np.dtype, tuple[int, ...]]:
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return np.dtype(x.dtype), tuple(int(s) for s in x.shape)
  arr = np.asarray(x)
  return arr.dtype, arr.shape


def _host(x: Any) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if hasattr(x, "addressable_shards"):  # a jax.Array: fetch this one tensor only
    import jax
    return np.asarray(jax.device_get(x))
  return np.asarray(x)


def save_safetensors(tensors: Mapping[str, Any], path: str,
                     metadata: Mapping[str, str] | None = None, *,
                     max_shard_bytes: int | None = None) -> list[str]:
  """Writes tensors (numpy or jax arrays, kept in their dtype) as safetensors; returns the
  files written.

  Without `max_shard_bytes`, or when everything fits in one shard, `path` is one file. Else
  the tensors go, in order, into `{stem}-00001-of-0000N.safetensors` shards of at most that
  many bytes (a larger tensor gets a shard of its own) next to `path`, plus
  `{stem}.safetensors.index.json` in Hugging Face's layout, and a stale single file at
  `path` is not left behind to shadow them. Every file is written atomically and holds one
  tensor in host memory at a time.
  """
  path = os.fspath(path)
  keys = list(tensors)
  sizes = {}
  for key in keys:
    dtype, shape = _dtype_shape(tensors[key])
    sizes[key] = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  total = sum(sizes.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    _write_file(path, keys, tensors, metadata)
    return [path]
  groups: list[list[str]] = [[]]
  used = 0
  for key in keys:
    if groups[-1] and used + sizes[key] > max_shard_bytes:
      groups.append([])
      used = 0
    groups[-1].append(key)
    used += sizes[key]
  stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
  names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  for name, group in zip(names, groups):
    _write_file(name, group, tensors, metadata)
  index = {"metadata": {"total_size": total, **(dict(metadata) if metadata else {})},
           "weight_map": {k: os.path.basename(n) for n, g in zip(names, groups) for k in g}}
  index_path = stem + INDEX_SUFFIX
  fd, tmp = tempfile.mkstemp(prefix=".index.", dir=os.path.dirname(os.path.abspath(index_path)))
  with os.fdopen(fd, "w") as f:
    json.dump(index, f, indent=2)
  os.replace(tmp, index_path)
  return names + [index_path]


# ---------------------------------------------------------------------------------- placing
@dataclasses.dataclass(frozen=True)
class Target:
  """How one placed array is made from stored tensors.

  source: a stored key, or a sequence of keys stacked on a new leading axis (per-layer
    tensors -> a scanned [layers, ...] parameter; the stack is assembled on the devices,
    one layer in host memory at a time).
  sharding: where the array goes (a NamedSharding when stacking).
  transform: applied on the host to each stored tensor (transpose / reshape / split); None
    reads each device's rows straight from the file.
  dtype: cast on the host (None keeps the stored dtype).
  shape: the expected final shape, checked (None: not checked).
  """
  source: str | Sequence[str]
  sharding: Any
  transform: Callable[[np.ndarray], np.ndarray] | None = None
  dtype: Any = None
  shape: tuple[int, ...] | None = None


def _put(host_slices: Callable[[tuple], np.ndarray], shape, sharding):
  """A global jax.Array from per-device host slices; distinct slices are read once, several
  at a time (positioned reads and page faults release the GIL), so disk reads and the
  filling of fresh memory overlap. Host memory stays within the one tensor being placed."""
  import jax
  index_map = sharding.addressable_devices_indices_map(tuple(shape))
  by_index: dict[tuple, list] = {}
  for device, index in index_map.items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    by_index.setdefault(key, []).append((device, index))
  groups = list(by_index.values())
  arrays = []
  for pairs, host in zip(groups, _map_concurrently(lambda p: host_slices(p[0][1]), groups)):
    arrays += [jax.device_put(host, d) for d, _ in pairs]
  order = {d: i for i, d in enumerate(index_map)}
  arrays.sort(key=lambda a: order[next(iter(a.devices()))])
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


# Concurrent slice reads: on `pathjax bench load`'s checkpoint (8 slices per tensor) 8
# readers loaded 2.2-2.9x faster than one (0.96-1.00 vs 0.33-0.46 GB/s): a disk (or network
# file system) serves several outstanding reads faster than one, and on a VM first-touch page
# faults, which cost more than the reads there, proceed in parallel.
READ_THREADS = 8


def _map_concurrently(fn: Callable, items: list) -> list:
  if len(items) < 2:
    return [fn(x) for x in items]
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
    return list(pool.map(fn, items))


def _cast(x: np.ndarray, dtype) -> np.ndarray:
  return x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)


def _check_shape(name: str, shape, want, reader: SafetensorsReader) -> None:
  if want is not None and tuple(shape) != tuple(want):
    raise WeightsError(f"shape mismatch for parameter {name}: checkpoint ({reader.path}) "
                       f"gives {tuple(shape)}, the model expects {tuple(want)}")


def place_one(reader: SafetensorsReader, name: str, target: Target):
  """One target array (see `Target`), placed in its sharding."""
  import jax
  import jax.numpy as jnp
  sources = [target.source] if isinstance(target.source, str) else list(target.source)
  for key in sources:
    if key not in reader:
      raise WeightsError(f"{reader.path} has no tensor {key} (needed for {name})")
  if isinstance(target.source, str):
    key = target.source
    if target.transform is None:
      shape = reader.shape(key)
      _check_shape(name, shape, target.shape, reader)
      return _put(lambda idx: _cast(reader.read_index(key, idx), target.dtype), shape,
                  target.sharding)
    host = _cast(np.asarray(target.transform(reader.get(key))), target.dtype)
    _check_shape(name, host.shape, target.shape, reader)
    return _put(lambda idx: host[idx], host.shape, target.sharding)

  # Stacked: allocate the whole target on the devices, then write layer by layer in place.
  from jax.sharding import NamedSharding, PartitionSpec
  sharding = target.sharding
  if not isinstance(sharding, NamedSharding):
    raise WeightsError(f"{name}: stacking needs a NamedSharding, got {type(sharding).__name__}")
  first = reader.get(sources[0])
  first = _cast(np.asarray(target.transform(first) if target.transform else first), target.dtype)
  shape = (len(sources),) + first.shape
  _check_shape(name, shape, target.shape, reader)
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
  out = jax.jit(lambda: jnp.zeros(shape, first.dtype), out_shardings=sharding)()
  update = _updater(sharding)
  for i, key in enumerate(sources):
    host = first if i == 0 else reader.get(key)
    if i:
      host = _cast(np.asarray(target.transform(host) if target.transform else host), target.dtype)
    if host.shape != first.shape:
      raise WeightsError(f"{name}: {key} gives shape {host.shape}, layer 0 gave {first.shape}")
    layer = _put(lambda idx, h=host: h[idx], host.shape, layer_sharding)
    out = update(out, layer, i)
    del host, layer
  return out


_UPDATERS: dict[Any, Callable] = {}


def _updater(sharding):
  import jax
  if sharding not in _UPDATERS:
    _UPDATERS[sharding] = jax.jit(
        lambda t, x, i: jax.lax.dynamic_update_index_in_dim(t, x.astype(t.dtype), i, 0),
        donate_argnums=0, out_shardings=sharding)
  return _UPDATERS[sharding]


def place(reader: SafetensorsReader, plan: Mapping[str, Target], *,
          progress: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
  """Places every target of `plan` (name -> Target), one at a time; returns name -> jax.Array.

  Host memory holds one stored tensor (and its transform) at a time: untransformed tensors
  are read row block by row block, only the rows the addressable devices hold.
  """
  out = {}
  for name, target in plan.items():
    out[name] = place_one(reader, name, target)
    if progress is not None:
      progress(name, out[name])
  return out


def load_sharded(path: str, shardings: Mapping[str, Any], *, dtype=None,
                 rename: Callable[[str], str] | None = None) -> dict[str, Any]:
  """Stored tensors straight into their shardings (name -> Sharding, names as stored, or
  as `rename(stored)` gives them); every stored tensor must have a sharding."""
  reader = open_safetensors(path)
  rename = rename or (lambda k: k)
  plan = {}
  for key in reader:
    name = rename(key)
    if name not in shardings:
      raise WeightsError(f"{reader.path}: no target sharding for tensor {key} ({name})")
    plan[name] = Target(key, shardings[name], dtype=dtype)
  missing = set(shardings) - set(plan)
  if missing:
    raise WeightsError(f"{reader.path} lacks tensors: {_listing(missing)}")
  return place(reader, plan)


# ------------------------------------------------------------------------ converter helpers
def shape_of(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
  """A tensor's shape without reading it when `sd` is a reader (or a view of one)."""
  if hasattr(sd, "shape") and callable(sd.shape):
    return tuple(sd.shape(key))
  return tuple(np.shape(sd[key]))


class PrefixView(Mapping[str, Any]):
  """The tensors of `sd` under `prefix`, with the prefix stripped; lazy over a reader."""

  def __init__(self, sd: Mapping[str, Any], prefix: str):
    self.sd, self.prefix = sd, prefix
    self._keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]

  def __getitem__(self, key: str):
    return self.sd[self.prefix + key]

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)

  def __contains__(self, key: object) -> bool:
    return isinstance(key, str) and (self.prefix + key) in self.sd

  def shape(self, key: str) -> tuple[int, ...]:
    return shape_of(self.sd, self.prefix + key)


# ------------------------------------------------------------------------- checking trees
def _listing(names: Iterable[str], limit: int = 40) -> str:
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class TensorReader:
  """Hands out a converter's source tensors by name, recording which were used or missing,
  so a converter can report every missing and unexpected key at once (`finish`).

  `sd` is any mapping (a `SafetensorsReader` reads lazily). Floating tensors keep their
  stored dtype unless `dtype` is given.
  """

  def __init__(self, sd: Mapping[str, Any], source: str, *, what: str = "the pathjax model",
               dtype=None):
    self.sd, self.source, self.what, self.dtype = sd, source, what, dtype
    self.used: set[str] = set()
    self.missing: list[str] = []

  def has(self, key: str) -> bool:
    return key in self.sd

  def get(self, key: str) -> np.ndarray | None:
    if key not in self.sd:
      self.missing.append(key)
      return None
    self.used.add(key)
    arr = np.asarray(self.sd[key])
    if self.dtype is not None and is_float(arr.dtype):
      arr = arr.astype(self.dtype)
    return arr

  def maybe(self, key: str) -> np.ndarray | None:
    return self.get(key) if key in self.sd else None

  def finish(self, ignore: Sequence[str] = (), note: str = "") -> None:
    unexpected = sorted(k for k in self.sd if k not in self.used
                        and not any(re.fullmatch(p, k) for p in ignore))
    if self.missing or unexpected:
      parts = [f"checkpoint {self.source} does not match {self.what}:"]
      if self.missing:
        parts.append(f"missing keys ({len(self.missing)}): {_listing(self.missing)}")
      if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}{note}")
      raise WeightsError("\n  ".join(parts))


def check_tree(expected: Mapping[str, Any], actual: Mapping[str, Any], *, what: str,
               source: str = "") -> None:
  """Raises WeightsError when `actual` differs from `expected` in keys or shapes.

  `expected` holds arrays or ShapeDtypeStructs (e.g. from jax.eval_shape of the model's
  init). The message lists missing and unexpected keys, or names the parameter and both
  shapes.
  """
  exp = flatten_dict(expected, sep="/")
  act = flatten_dict(actual, sep="/")
  missing = set(exp) - set(act)
  unexpected = set(act) - set(exp)
  where = f" ({source})" if source else ""
  if missing or unexpected:
    parts = [f"{what}{where} does not match the model:"]
    if missing:
      parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    raise WeightsError("\n  ".join(parts))
  for key in sorted(exp):
    want, got = tuple(exp[key].shape), tuple(np.shape(act[key]))
    if want != got:
      raise WeightsError(f"{what}{where}: shape mismatch for parameter {key}: "
                         f"checkpoint has {got}, the model expects {want}")
