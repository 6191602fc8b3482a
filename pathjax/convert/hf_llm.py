"""Hugging Face causal LM directory (Llama / Qwen2 / Qwen3) -> pathjax LLM parameters.

Reads config.json and model.safetensors or a sharded model.safetensors.index.json one
shard at a time, maps the names (see pathjax/models/llm.py's table), checks every tensor
against the config (missing, unexpected, wrong shape) and copies the tokenizer files and
chat template, so `pathjax generate` runs offline from the converted directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from pathjax.convert.safetensors_io import (PICKLE_SUFFIXES, WeightsError, check_tree,
                                            load_safetensors, refuse_pickle)
from pathjax.models import llm as llm_lib
from pathjax.models.model_dir import abstract_params
from flax import traverse_util
flatten = lambda tree: traverse_util.flatten_dict(tree, sep="/")
unflatten = lambda flat: traverse_util.unflatten_dict(flat, sep="/")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json")
# HF per-layer name -> (pathjax path under the layer, how to reshape)
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_MAP = {
    "input_layernorm.weight": ("attn_norm/scale", "vec"),
    "post_attention_layernorm.weight": ("mlp_norm/scale", "vec"),
    "self_attn.q_proj.weight": ("attn/query/kernel", "q"),
    "self_attn.k_proj.weight": ("attn/key/kernel", "kv"),
    "self_attn.v_proj.weight": ("attn/value/kernel", "kv"),
    "self_attn.o_proj.weight": ("attn/out/kernel", "o"),
    "self_attn.q_proj.bias": ("attn/query/bias", "qb"),
    "self_attn.k_proj.bias": ("attn/key/bias", "kvb"),
    "self_attn.v_proj.bias": ("attn/value/bias", "kvb"),
    "self_attn.o_proj.bias": ("attn/out/bias", "vec"),
    "self_attn.q_norm.weight": ("attn/query_norm/scale", "vec"),
    "self_attn.k_norm.weight": ("attn/key_norm/scale", "vec"),
    "mlp.gate_proj.weight": ("mlp/fc1_gate/kernel", "t"),
    "mlp.up_proj.weight": ("mlp/fc1_up/kernel", "t"),
    "mlp.down_proj.weight": ("mlp/fc2/kernel", "t"),
    "mlp.gate_proj.bias": ("mlp/fc1_gate/bias", "vec"),
    "mlp.up_proj.bias": ("mlp/fc1_up/bias", "vec"),
    "mlp.down_proj.bias": ("mlp/fc2/bias", "vec"),
}
# Buffers some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def read_config(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise WeightsError(f"{model_dir} has no config.json (expected a Hugging Face model "
                       "directory: config.json + model.safetensors or an index)")
  with open(path) as f:
    return json.load(f)


def weight_files(model_dir: str) -> list[str]:
  """The safetensors files of a HF directory (single or sharded); pickles are refused."""
  index = os.path.join(model_dir, "model.safetensors.index.json")
  single = os.path.join(model_dir, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map") or {}
    files = sorted({os.path.join(model_dir, v) for v in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise WeightsError(f"{index} lists shards that do not exist: {', '.join(missing)}")
    return files
  if os.path.isfile(single):
    return [single]
  pickles = [f for f in sorted(os.listdir(model_dir)) if f.lower().endswith(PICKLE_SUFFIXES)]
  if pickles:
    refuse_pickle(os.path.join(model_dir, pickles[0]))
  raise WeightsError(f"{model_dir} has neither model.safetensors nor "
                     "model.safetensors.index.json")


def iter_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) over the files, one shard in memory at a time, as float32."""
  for file in files:
    for name, value in load_safetensors(file).items():
      yield name, np.asarray(value).astype(np.float32)


def convert_hf_llm(model_dir: str, *, scan: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> tuple[dict, dict]:
  """(LLM fields, params tree) from a HF model directory."""
  cfg = read_config(model_dir)
  fields = llm_lib.config_from_hf(cfg, source=os.path.join(model_dir, "config.json"))
  model = llm_lib.LLM(**fields)
  d, h, kvh, hd = model.hidden_size, model.num_heads, model.num_kv_heads, model.dim_per_head
  shapes = {  # HF shape per kind
      "vec": None, "q": (h * hd, d), "kv": (kvh * hd, d), "o": (d, h * hd),
      "qb": (h * hd,), "kvb": (kvh * hd,), "t": None}

  def reshape(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "q":
      return w.T.reshape(d, h, hd)
    if kind == "kv":
      return w.T.reshape(d, kvh, hd)
    if kind == "o":
      return w.T.reshape(h, hd, d)
    if kind == "qb":
      return w.reshape(h, hd)
    if kind == "kvb":
      return w.reshape(kvh, hd)
    if kind == "t":
      return w.T
    return w

  per_layer: list[dict[str, np.ndarray]] = [{} for _ in range(model.num_layers)]
  top: dict[str, np.ndarray] = {}
  unexpected, bad_shape = [], []
  source = weight_files(model_dir)
  for name, w in iter_tensors(source):
    m = _LAYER.fullmatch(name)
    if m and int(m.group(1)) < model.num_layers and m.group(2) in _LAYER_MAP:
      path, kind = _LAYER_MAP[m.group(2)]
      want = shapes[kind]
      if want is not None and w.shape != want:
        bad_shape.append(f"{name}: file has {w.shape}, the config expects {want}")
        continue
      per_layer[int(m.group(1))][path] = reshape(kind, w)
    elif name == "model.embed_tokens.weight":
      top["embed/embedding"] = w
    elif name == "model.norm.weight":
      top["final_norm/scale"] = w
    elif name == "lm_head.weight":
      if not model.tie_embeddings:
        top["lm_head/kernel"] = w.T
    elif not _IGNORED.fullmatch(name):
      unexpected.append(name)
  if bad_shape:
    raise WeightsError(f"{model_dir}: weights do not match config.json:\n  " + "\n  ".join(bad_shape))

  flat: dict[str, np.ndarray] = dict(top)
  if scan:
    keys = set().union(*per_layer) if per_layer else set()
    for key in keys:
      if all(key in layer for layer in per_layer):
        flat[f"layers/{key}"] = np.stack([layer[key] for layer in per_layer])
      else:
        have = [i for i, layer in enumerate(per_layer) if key in layer]
        flat[f"layers/{key}"] = None  # reported as missing below
        unexpected.extend(f"model.layers.{i}.{_hf_name(key)}" for i in have)
  else:
    for i, layer in enumerate(per_layer):
      for key, value in layer.items():
        flat[f"layers_{i}/{key}"] = value
  flat = {k: v for k, v in flat.items() if v is not None}

  module = llm_lib.LLM(**fields, scan=scan)
  expected = abstract_params("llm", module)
  want = flatten(expected)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  problems = []
  if missing:
    problems.append("missing for the config: " + ", ".join(missing[:20]))
  if extra or unexpected:
    problems.append("not used by a " + cfg["architectures"][0] + " with this config: "
                    + ", ".join((unexpected + extra)[:20]))
  if problems:
    raise WeightsError(f"{model_dir}: weights do not match config.json: " + "; ".join(problems))
  params = unflatten(flat)
  check_tree(expected, params, what="llm params", source=model_dir)
  log(f"llm: {cfg['architectures'][0]} hidden {d}, layers {model.num_layers}, heads {h} "
      f"({kvh} kv, head dim {hd}), mlp {model.intermediate_size}, vocab {model.vocab_size}, "
      f"rope theta {model.rope_theta} {model.rope_scaling or ''}, tied {model.tie_embeddings}, "
      f"from {len(source)} file(s)")
  return {**fields, "scan": scan}, params


def _hf_name(path: str) -> str:
  return next((k for k, (p, _) in _LAYER_MAP.items() if p == path), path)


def generation_ids(model_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
  """Stop / pad / bos ids from generation_config.json, else config.json."""
  gen = {}
  path = os.path.join(model_dir, "generation_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      gen = json.load(f)
  out = {}
  for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
    value = gen.get(key, cfg.get(key))
    if value is not None:
      out[key] = value
  if cfg.get("max_position_embeddings"):
    out["max_length"] = int(cfg["max_position_embeddings"])
  eos = out.get("eos_token_id")
  out["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
  return out


def copy_tokenizer(model_dir: str, dest: str) -> bool:
  """Copies the tokenizer files (and chat template) into dest; False when there are none."""
  files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, f))]
  if not any(f in files for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    return False
  os.makedirs(dest, exist_ok=True)
  for f in files:
    shutil.copy2(os.path.join(model_dir, f), os.path.join(dest, f))
  return True


def convert_to_model_dir(model_dir: str, out: str, *, scan: bool = True, overwrite: bool = False,
                         log: Callable[[str], None] = print) -> str:
  """`pathjax convert --llm DIR --out OUT`: writes a model directory with tower "llm"."""
  from pathjax.models import model_dir as model_dir_lib
  if not os.path.isdir(model_dir):
    raise WeightsError(f"--llm {model_dir} is not a directory (expected a Hugging Face model "
                       "directory)")
  fields, params = convert_hf_llm(model_dir, scan=scan, log=log)
  cfg = read_config(model_dir)
  module = llm_lib.LLM(**fields)
  with tempfile.TemporaryDirectory() as tmp:
    tok = os.path.join(tmp, "tokenizer")
    has_tok = copy_tokenizer(model_dir, tok)
    if not has_tok:
      log(f"warning: {model_dir} has no tokenizer files; `pathjax generate` will need token ids")
    path = model_dir_lib.save_model_dir(
        out, {"llm": dict(kind="llm", module=module, params=params, projection=None)},
        tokenizer_dir=tok if has_tok else None, source=f"llm: {model_dir}",
        extra_meta={"generation": generation_ids(model_dir, cfg)}, overwrite=overwrite)
  log(f"wrote {path}")
  return path
