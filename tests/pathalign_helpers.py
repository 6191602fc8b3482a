"""Tiny PathAlign data: an embed-slides directory whose features encode a class, reports
naming the class, and an offline BERT-style tokenizer (tests and the demo's smoke runs)."""

from __future__ import annotations

import json
import os

import numpy as np

CLASSES = ("adenocarcinoma", "lymphoma", "normal mucosa")
PHRASES = ("Sections show {c}.", "The slide shows {c}.", "Diagnosis: {c}.")


def write_embeddings(out_dir: str, slides: dict, *, dim: int, encoder: str = "toy-encoder",
                     encoder_hash: str = "a" * 64, skipped: dict | None = None,
                     dtype: str = "float16", extent: int = 224, paths: dict | None = None) -> str:
  """An embed-slides directory: slides = {id: (features [N, D], grid [N, 2])}; `skipped` =
  {id: reason} become skipped entries (as a slide without tissue). Level-0 coords are
  grid * extent; `paths` = {id: slide file} (default: id + ".svs")."""
  paths = paths or {}
  from safetensors.numpy import save_file
  os.makedirs(os.path.join(out_dir, "slides"), exist_ok=True)
  entries = []
  for sid, (feats, grid) in slides.items():
    file = f"slides/{sid}.safetensors"
    n = len(feats)
    save_file({"features": np.asarray(feats, dtype), "grid": np.asarray(grid, np.int32),
               "coords": np.asarray(grid, np.int64) * extent, "tissue": np.ones((n,), np.float32)},
              os.path.join(out_dir, file),
              metadata={"encoder": encoder, "encoder_hash": encoder_hash, "dim": str(dim),
                        "slide_id": sid})
    entries.append({"slide_id": sid, "path": paths.get(sid, sid + ".svs"), "status": "done",
                    "file": file, "patches": n, "extent": extent})
  skipped = skipped or {}
  for sid, reason in skipped.items():
    entries.append({"slide_id": sid, "path": sid + ".svs", "status": "skipped", "reason": reason})
  manifest = {"format_version": 1, "encoder": encoder, "encoder_hash": encoder_hash, "dim": dim,
              "dtype": dtype, "magnification": 20.0, "patch_size": 224, "options": {},
              "counts": {"slides": len(entries)},
              "skipped": {"by_reason": {r: list(skipped.values()).count(r) for r in set(skipped.values())},
                          "slides": [{"slide": s, "path": s + ".svs", "reason": r, "message": r}
                                     for s, r in skipped.items()]},
              "slides": entries}
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  return out_dir


def synthetic_slides(n: int, *, dim: int, seed: int = 0, min_patches: int = 6,
                     max_patches: int = 40, noise: float = 0.5):
  """{id: (features, grid)}, {id: class}: each slide's patches = its class prototype + noise."""
  rng = np.random.default_rng(seed)
  protos = rng.standard_normal((len(CLASSES), dim)).astype(np.float32)
  slides, labels = {}, {}
  for i in range(n):
    c = i % len(CLASSES)
    k = int(rng.integers(min_patches, max_patches + 1))
    feats = protos[c] + noise * rng.standard_normal((k, dim)).astype(np.float32)
    grid = np.stack([rng.permutation(64)[:k], rng.permutation(64)[:k]], -1)
    sid = f"slide-{i:03d}"
    slides[sid], labels[sid] = (feats, grid), CLASSES[c]
  return slides, labels


def report_lines(labels: dict, seed: int = 0):
  rng = np.random.default_rng(seed + 1)
  return [{"slide": s, "report": PHRASES[int(rng.integers(len(PHRASES)))].format(c=c)}
          for s, c in labels.items()]


def make_dataset(root: str, n: int = 24, *, dim: int = 32, seed: int = 0, **kw) -> dict:
  """Embeddings, reports.jsonl, labels.json and a tokenizer under `root`; returns the paths."""
  from pathjax.input.reports import write_reports
  from pathjax.input.tokenize import train_wordpiece_tokenizer
  os.makedirs(root, exist_ok=True)
  slides, labels = synthetic_slides(n, dim=dim, seed=seed, **kw)
  emb = write_embeddings(os.path.join(root, "emb"), slides, dim=dim)
  lines = report_lines(labels, seed)
  reports = os.path.join(root, "reports.jsonl")
  write_reports(reports, lines)
  with open(os.path.join(root, "labels.json"), "w") as f:
    json.dump(labels, f)
  tok = train_wordpiece_tokenizer([l["report"] for l in lines] + list(CLASSES) * 3,
                                  os.path.join(root, "tokenizer"), vocab_size=200)
  return {"embeddings": emb, "reports": reports, "labels": os.path.join(root, "labels.json"),
          "tokenizer": tok, "slides": slides, "labels_map": labels}


def smoke_config(paths: dict, variant: str = "smoke", **overrides):
  from pathjax.config_lib import load_config_file
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config_file(os.path.join(root, "configs", "pathalign.py") + ":" + variant)
  config.data.embeddings = paths["embeddings"]
  config.data.reports = paths["reports"]
  config.input.tokenizer = paths["tokenizer"]
  config.data.max_patches = 24
  config.batch_size = 8
  config.total_steps = 6
  config.log_every = 1
  config.checkpoint_every = 3
  for k, v in overrides.items():
    target = config
    *head, last = k.split(".")
    for h in head:
      target = target[h]
    target[last] = v
  return config


def tiny_llm_dir(out_dir: str, seed: int = 0) -> str:
  """A random tiny Llama-layout model directory (kind llm) with an offline BPE tokenizer,
  as `pathjax convert --llm` writes one (no torch needed)."""
  import tempfile

  import jax
  import jax.numpy as jnp

  from llm_helpers import train_tokenizer
  from pathjax.models import model_dir
  from pathjax.models.llm import LLM
  module = LLM(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=96, norm_eps=1e-5, scan=True)
  params = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  with tempfile.TemporaryDirectory() as tok:
    train_tokenizer(tok)
    return model_dir.save_model_dir(
        out_dir, {"llm": dict(kind="llm", module=module, params=params, projection=None)},
        tokenizer_dir=tok, extra_meta={"generation": {"eos_token_id": [2], "pad_token_id": 0,
                                                      "bos_token_id": 1}})
