"""One slide's report from a stage-2 PathAlign model directory (`pathjax generate --slide`).

    pathjax generate --model runs/s2/model --slide SLIDE_ID [--embeddings DIR]

The model directory is what stage-2 training exports (`--config.export_model=True`): the
Q-Former tower with the soft-token projection, its tokenizer, and a "pathalign" entry in
model.json with the frozen LLM's directory, the prompt and the training config. The recipe is
rebuilt from that config (the Q-Former's fields from the directory itself), the LLM is loaded
from its own directory, and the slide's features come from a `pathjax embed-slides` directory
(`--embeddings`, by default the training config's data.embeddings). Generation is the
recipe's own (`PathAlignRecipe.generate`: soft tokens, then the prompt, greedy or beam search).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from pathjax.generate import GenerateError

STAGE2_HINT = ("export one with `pathjax train --config=configs/pathalign.py:stage2 ... "
               "--config.export_model=True` (it writes WORKDIR/model)")


def _training_config(model: str, meta: dict[str, Any]) -> dict[str, Any]:
  """The recorded training config: model.json's, else WORKDIR/config.json beside WORKDIR/model."""
  if meta.get("train_config"):
    return meta["train_config"]
  beside = os.path.join(os.path.dirname(os.path.abspath(model)), "config.json")
  if os.path.isfile(beside):
    with open(beside, encoding="utf-8") as f:
      return json.load(f)
  raise GenerateError(f"{os.path.join(model, 'model.json')} records no training config and there "
                      f"is no {beside}; re-export the model with this pathjax ({STAGE2_HINT})")


class SlideReportModel:
  """A stage-2 PathAlign model loaded from its directory: recipe, parameters, embeddings."""

  def __init__(self, model: str, *, embeddings: str | None = None):
    import ml_collections

    from pathjax.config_lib import ConfigError
    from pathjax.models import model_dir
    from pathjax.recipes.base import make_recipe
    where = os.path.join(model, model_dir.MODEL_JSON)
    meta = model_dir.read_model_json(model)
    entry = meta.get("pathalign")
    if not isinstance(entry, dict) or int(entry.get("stage", 0)) != 2 or "qformer" not in meta["towers"]:
      kind = "a stage-1 PathAlign model" if isinstance(entry, dict) else (
          "not a PathAlign model (towers: " + ", ".join(meta["towers"]) + ")")
      raise GenerateError(f"{where}: {kind}; report generation needs a stage-2 PathAlign model "
                          f"directory: {STAGE2_HINT}")
    llm_dir = entry.get("llm_dir") or ""
    if not llm_dir:
      raise GenerateError(f"{where} names no LLM directory (pathalign.llm_dir is empty: the model "
                          "was trained on synthetic LLM fields); train stage 2 with "
                          "--config.model.llm_dir=DIR")
    if not os.path.isfile(os.path.join(llm_dir, model_dir.MODEL_JSON)):
      raise GenerateError(f"{where} names the frozen LLM {llm_dir}, which is not a model directory "
                          "(moved or deleted?): put it back there or set pathalign.llm_dir in "
                          f"{where} to its new path")
    config = ml_collections.ConfigDict(_training_config(model, meta))
    config.model.init_dir = os.path.abspath(model)   # the Q-Former's fields from the directory
    config.model.llm_dir = llm_dir
    config.model.prompt = entry.get("prompt", config.model.prompt)
    tok = os.path.join(model, meta["tokenizer"]) if meta.get("tokenizer") else ""
    config.input.tokenizer = tok if tok and os.path.isdir(tok) else ""
    self.embeddings_dir = embeddings or config.data.get("embeddings", "")
    if not self.embeddings_dir:
      raise GenerateError(f"{where}'s training config records no data.embeddings: pass "
                          "--embeddings DIR (a `pathjax embed-slides` directory)")
    try:
      self.recipe = make_recipe(config)
    except ConfigError as e:
      raise GenerateError(f"{where}: {e}") from None
    if self.recipe.llm_text is None:
      raise GenerateError(f"the LLM directory {llm_dir} (named in {where}) has no tokenizer; "
                          "convert it with `pathjax convert --llm` from a directory with one")
    from pathjax.models.llm import load_llm
    qformer = model_dir.load_model_dir(model, towers=["qformer"]).towers["qformer"]
    if qformer.projection is None:
      raise GenerateError(f"{where}: the qformer tower has no projection to the LLM (a stage-1 "
                          f"export?); {STAGE2_HINT}")
    _, llm_params, _ = load_llm(llm_dir)
    self.params = {"qformer": qformer.params, "proj": {"kernel": qformer.projection},
                   "llm": llm_params}
    self.max_patches = int(config.data.get("max_patches", 0) or 0)
    self._emb = None

  @property
  def embeddings(self):
    from pathjax.embed_slides import EmbedSlidesError, open_slide_embeddings
    if self._emb is None:
      width = int(self.recipe.qformer_fields["encoder_width"])
      try:
        self._emb = open_slide_embeddings(self.embeddings_dir, dim=width,
                                          encoder="the model's Q-Former encoder_width")
      except EmbedSlidesError as e:
        raise GenerateError(f"--embeddings: {e}") from None
    return self._emb

  def slide_inputs(self, slide_id: str) -> dict[str, np.ndarray]:
    """[1, M, ...] features, coords, patch_mask: all patches, or a fixed uniform sample of
    data.max_patches of them (the training limit)."""
    from pathjax.recipes.pathalign import slide_arrays
    emb = self.embeddings
    if slide_id not in emb:
      skipped = {s["slide"]: s.get("reason") for s in emb.manifest.get("skipped", {}).get("slides", [])}
      why = (f"it was skipped by embed-slides ({skipped[slide_id]})" if slide_id in skipped
             else f"{len(emb)} slides are embedded, e.g. {', '.join(emb.slide_ids[:3])}")
      raise GenerateError(f"slide {slide_id!r} is not in {os.path.join(emb.directory, 'manifest.json')}"
                          f": {why}; pass a slide id from it, or --embeddings DIR holding that slide")
    from pathjax.embed_slides import EmbedSlidesError
    try:
      sf = emb[slide_id]
    except EmbedSlidesError as e:   # a slide file from another encoder than the manifest's
      raise GenerateError(f"--embeddings: {e}") from None
    n = len(sf.features)
    m = min(n, self.max_patches) if self.max_patches else n
    arrays = slide_arrays(sf.features, sf.grid, max(m, 1), np.random.default_rng(0), np.float32)
    return {k: v[None] for k, v in arrays.items()}

  def report(self, slide_id: str, *, max_new_tokens: int = 128, num_beams: int = 1) -> str:
    x = self.slide_inputs(slide_id)
    return self.recipe.generate(self.params, x["features"], x["coords"], x["patch_mask"],
                                max_new_tokens=max_new_tokens, num_beams=num_beams)[0]
