"""Reading and writing weights as safetensors with numpy, and checking trees against models.

No torch and no pickle: `.bin` / `.pt` / `.pth` / `.ckpt` files (PyTorch pickles) are refused
with the one-liner that converts them on a machine that has torch.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np

from pathjax.tree_utils import flatten

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


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


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (bf16/fp16 are widened to float32).

  Sharded checkpoints (`model.safetensors.index.json`, or a directory of `*.safetensors`
  files) are merged.
  """
  path = os.fspath(path)
  refuse_pickle(path)
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      pickles = [f for f in os.listdir(path) if f.lower().endswith(PICKLE_SUFFIXES)]
      if pickles:
        refuse_pickle(os.path.join(path, pickles[0]))
      raise WeightsError(f"{path} holds no .safetensors file")
  elif path.endswith(".index.json"):
    import json
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    base = os.path.dirname(path)
    files = sorted({os.path.join(base, v) for v in weight_map.values()})
  else:
    files = [path]
  out: dict[str, np.ndarray] = {}
  for file in files:
    out.update(_load_one(file))
  return out


def _load_one(path: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise WeightsError(f"weights file {path} does not exist")
  from safetensors import safe_open
  try:
    tensors = {}
    with safe_open(path, framework="np") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  except WeightsError:
    raise
  except Exception as e:  # safetensors raises SafetensorError / OSError / TypeError for bf16
    if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
      return _load_bf16(path)
    raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
  return {k: _widen(v) for k, v in tensors.items()}


def _widen(x: np.ndarray) -> np.ndarray:
  if x.dtype == np.float16:
    return x.astype(np.float32)
  return x


def _load_bf16(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file with bf16 tensors by parsing the header (numpy has no bf16)."""
  import json
  import struct
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
            "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    start, end = info["data_offsets"]
    raw = data[start:end]
    if info["dtype"] == "BF16":
      bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
      arr = bits.view(np.float32)
    elif info["dtype"] in dtypes:
      arr = np.frombuffer(raw, dtypes[info["dtype"]])
    else:
      raise WeightsError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
    out[key] = _widen(arr.reshape(info["shape"]).copy())
  return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                     metadata: Mapping[str, str] | None = None) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}, path,
            metadata=dict(metadata) if metadata else None)


def _listing(names: Iterable[str], limit: int = 40) -> str:
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_tree(expected: Mapping[str, Any], actual: Mapping[str, Any], *, what: str,
               source: str = "") -> None:
  """Raises WeightsError when `actual` differs from `expected` in keys or shapes.

  `expected` holds arrays or ShapeDtypeStructs (e.g. from jax.eval_shape of the model's
  init). The message lists missing and unexpected keys, or names the parameter and both
  shapes.
  """
  exp = flatten(expected)
  act = flatten(actual)
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
