"""Tiny slide-instruction fixtures: a PathAlign encoder export (random Q-Former, stored config
beside it as the trainer writes it), a tiny LLM directory with a ChatML-style template, and
instructions for the PathAlign test slides (each slide's class dominates)."""

from __future__ import annotations

import os

import numpy as np

import pathalign_helpers as PA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pathflip.py")
# The PathAlign helper's classes mapped onto synthetic tissue classes.
CLASS_TO_TISSUE = {"adenocarcinoma": "tumor", "lymphoma": "lymphocytes", "normal mucosa": "mucus"}


def encoder_dir(root: str, data: dict, seed: int = 0) -> str:
  """WORKDIR/model of a PathAlign stage-1 smoke model (random weights) and WORKDIR/config.json."""
  import flax.linen as nn
  import jax

  from pathjax.models import model_dir
  from pathjax.recipes.base import make_recipe
  from pathjax.train import write_config
  config = PA.smoke_config(data)
  recipe = make_recipe(config)
  params = nn.unbox(jax.jit(recipe.init)(jax.random.key(seed), recipe.example_batch(2)))
  workdir = os.path.join(root, "encoder_run")
  os.makedirs(workdir, exist_ok=True)
  write_config(config, workdir)
  return model_dir.save_model_dir(os.path.join(workdir, "model"), **recipe.export(params))


def llm_dir(root: str, seed: int = 0) -> str:
  from pathjax.input.instructions import add_chat_template
  out = PA.tiny_llm_dir(os.path.join(root, "llm"), seed=seed)
  add_chat_template(os.path.join(out, "tokenizer"))
  return out


def instructions(path: str, labels: dict, seed: int = 0) -> str:
  from pathjax.input.instructions import slide_instructions, write_instructions
  records = []
  for sid, c in sorted(labels.items()):
    dom = CLASS_TO_TISSUE[c]
    fractions = {dom: 0.6, "stroma": 0.25, "adipose": 0.15} if dom != "stroma" else {dom: 1.0}
    records += slide_instructions(sid, fractions, f"Sections show {c}.", seed=seed)
  return write_instructions(path, records)


def make_all(root: str, n: int = 16) -> dict:
  data = PA.make_dataset(os.path.join(root, "data"), n, dim=32)
  return dict(data, encoder=encoder_dir(root, data), llm=llm_dir(root),
              instructions=instructions(os.path.join(root, "instructions.jsonl"), data["labels_map"]))


def config(paths: dict, variant: str = "instruct_stage1,smoke", **overrides):
  from pathjax.config_lib import load_config_file
  c = load_config_file(CONFIG + ":" + variant)
  c.model.encoder_dir = paths["encoder"]
  c.model.llm_dir = paths["llm"]
  c.data.embeddings = paths["embeddings"]
  c.data.instructions = paths["instructions"]
  c.data.max_patches = 24
  c.data.holdout_fraction = 0.25
  c.model.text_len = 96
  c.batch_size = 8
  c.total_steps = 6
  c.log_every = 1
  c.checkpoint_every = 3
  c.export_model = False
  for k, v in overrides.items():
    target = c
    *head, last = k.split(".")
    for h in head:
      target = target[h]
    target[last] = v
  return c
