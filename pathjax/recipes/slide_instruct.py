"""Slide instruction following (PathFLIP's LLM stage, specs/pathflip.md; LLaVA-style): a
frozen slide encoder's visual tokens, projected into a decoder LLM at the `<image>` point of
a chat, trained on the assistant's tokens only.

Generic over the encoder: `model.encoder_dir` is any recipe's exported model directory whose
predict_fns has `visual_tokens(features, coords, mask) -> (tokens [B,T,E], mask [B,T])`
(PathFLIP: global + region embeddings; PathAlign: Q-Former query outputs). The encoder
recipe is rebuilt from the config stored with the directory (model.json "train_config", else
the training workdir's config.json next to it: WORKDIR/model -> WORKDIR/config.json), and
the parameters under each of its exported towers are placed under `encoder/<tower>/` of this
recipe's tree, frozen (frozen_patterns) and streamed in by load_pretrained on every start.

Model: `projector` (pathjax.models.projector: Linear or 2-layer GELU MLP, E -> LLM width,
trainable) and `llm` (model.llm_dir, a `pathjax convert --llm` directory, frozen; stage 2
adds LoRA adapters on q,k,v,o,gate,up,down via pathjax.models.lora, rank 16 alpha 32, the
only trainable LLM parameters). `<image>` is a split point of the rendered chat text (not a
vocabulary token): the text before and after it is tokenized separately and the T visual
tokens take the place of one slot (`splice`). The tokenizer must have a chat template
(pathjax.input.instructions.ChatEncoder refuses one without; add_chat_template gives the
ChatML-style one). Loss: next-token cross-entropy over assistant tokens (and their
end-of-turn marker), averaged over the global batch's target tokens.

Stage 1 (`model.stage=1`): projector only, on captions. Stage 2: projector + LoRA on
captions + VQA; the projector starts from `model.init_dir` (a stage-1 export).

Data: `data.embeddings` (a `pathjax embed-slides` directory), `data.instructions` (JSON lines,
pathjax.input.instructions), `data.tasks` (which conversations train), held-out slides by
`data.heldout_pattern` (regex) or a stable hash (`data.holdout_fraction`).

Batch: features [B,M,D], coords [B,M,2] int32, patch_mask [B,M], ids [B,L] int32 (the image
slot holds pad), mask [B,L], targets [B,L] (assistant tokens), image_pos [B] int32.

Export: a `projector` tower, stage 2 also the LLM with the adapters merged (an `llm` tower, so
the directory is also an LLM directory), the tokenizer, and "train_config" (this config) in
model.json; `pathjax chat --model DIR --slide ID` answers questions with it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pathjax import losses
from pathjax.config_lib import ConfigError
from pathjax.input import instructions as inst
from pathjax.models import lora as lora_lib
from pathjax.models.projector import Projector

log = logging.getLogger("pathjax.slide_instruct")

LORA_ADAPTER = re.compile(r".*/lora_[ab]$")


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def _flat(tree) -> dict:
  from flax import traverse_util
  return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat) -> dict:
  from flax import traverse_util
  return traverse_util.unflatten_dict(dict(flat), sep="/")


# ------------------------------------------------------------------------- the encoder


def stored_config(directory: str) -> ml_collections.ConfigDict:
  """The training config of an exported model directory: model.json "train_config", else
  the workdir's config.json (the trainer exports to WORKDIR/model)."""
  from pathjax.models import model_dir
  try:
    meta = model_dir.read_model_json(directory)
  except model_dir.ModelDirError as e:
    raise ConfigError(f"model.encoder_dir: {e}") from None
  cfg = meta.get("train_config")
  source = f"{directory}/model.json"
  if cfg is None:
    source = os.path.join(os.path.dirname(os.path.abspath(directory)), "config.json")
    if not os.path.isfile(source):
      raise ConfigError(f"{directory} stores no training config (model.json has no "
                        f"\"train_config\" and {source} does not exist): export it with "
                        "`pathjax train --config.export_model=True` and keep it in its workdir")
    with open(source) as f:
      cfg = json.load(f)
  if not isinstance(cfg, dict) or "recipe" not in cfg:
    raise ConfigError(f"{source} is not a pathjax training config (no \"recipe\")")
  return ml_collections.ConfigDict(cfg)


class FrozenEncoder:
  """A visual encoder rebuilt from an exported model directory (see the module docstring)."""

  def __init__(self, directory: str, config_spec: str = ""):
    """`config_spec` instead of `directory` ("configs/pathflip.py:align"): the encoder's
    shapes only, for `pathjax compile` (no weights to load)."""
    from pathjax.models import model_dir
    from pathjax.recipes.base import make_recipe
    if not directory and not config_spec:
      raise ConfigError("model.encoder_dir is empty: set it to an exported model directory whose "
                        "recipe has a visual_tokens predict function (PathFLIP align, PathAlign)")
    self.directory = os.path.abspath(directory) if directory else None
    if self.directory:
      meta = model_dir.read_model_json(self.directory)
      cfg = stored_config(self.directory)
      if meta.get("tokenizer") and "input" in cfg and "tokenizer" in cfg.input:
        cfg.input.tokenizer = os.path.join(self.directory, meta["tokenizer"])  # the copy it holds
      if cfg.get("model", {}).get("init_dir"):
        # The towers the run started from are in its export too (same layout): the encoder
        # does not depend on that starting directory still being where it was.
        cfg.model.init_dir = self.directory
    else:
      from pathjax.config_lib import load_config_file
      meta = None
      cfg = load_config_file(config_spec)
    cfg.evals = []
    try:
      self.recipe = make_recipe(cfg)
    except ValueError as e:
      raise ConfigError(f"model.encoder_dir {directory}: cannot rebuild its recipe "
                        f"{cfg.recipe!r}: {e}") from None
    if "visual_tokens" not in self.recipe.predict_fns(None):
      raise ConfigError(f"model.encoder_dir {directory}: recipe {cfg.recipe!r} has no "
                        "visual_tokens predict function (valid encoders: pathflip, pathalign)")
    # Shapes only: every parameter group of the recipe (its export's towers are those).
    self.towers = tuple(meta["towers"]) if meta else None

  def init(self, rng) -> dict:
    """The encoder's (boxed) parameters under its exported towers."""
    try:
      batch = self.recipe.example_batch(1)
    except (ConfigError, OSError, ValueError):
      # The encoder's training data (paths in its stored config, possibly relative to where
      # it was trained) need not exist here; recipes whose init ignores the batch still build.
      batch = None
    tree = self.recipe.init(rng, batch)
    if self.towers is None:
      self.towers = tuple(k for k in tree if k != "encoder")
    missing = [t for t in self.towers if t not in tree]
    if missing:
      raise ConfigError(f"{self.directory}: towers {missing} are not parameter groups of recipe "
                        f"{self.recipe.config.recipe!r} ({', '.join(tree)})")
    return {t: tree[t] for t in self.towers}

  def visual_tokens(self, params, features, coords, mask):
    return self.recipe.predict_fns(params)["visual_tokens"](features, coords, mask)


# --------------------------------------------------------------------------- the model


class InstructModel(nn.Module):
  """Projector + LLM (the frozen encoder is applied outside, from its own recipe)."""
  projector_cfg: dict[str, Any]
  llm_cfg: dict[str, Any]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    from pathjax.models.llm import LLM
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.projector = Projector(**self.projector_cfg, **kw)
    self.llm = LLM(**self.llm_cfg, **kw)

  def project(self, visual):
    return self.projector(visual)

  def lm(self, inputs_embeds, attention_mask):
    return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

  def __call__(self, visual, ids):
    return self.projector(visual), self.llm(ids)


def splice(tokens, visual, token_mask, visual_mask, image_pos):
  """LLaVA splice: the T visual tokens replace the one slot at `image_pos` of each row.

  tokens [B, L, H], visual [B, T, H], masks [B, L] / [B, T], image_pos [B] ->
  (embeds [B, L-1+T, H], mask [B, L-1+T], token_index [B, L-1+T] (the source token of each
  output position), is_visual [B, L-1+T])."""
  b, length = token_mask.shape
  t = visual.shape[1]
  j = jnp.arange(length - 1 + t)[None, :]
  rel = j - image_pos.astype(jnp.int32)[:, None]
  is_vis = (rel >= 0) & (rel < t)
  tok_idx = jnp.clip(jnp.where(rel < 0, j, j - t + 1), 0, length - 1)
  vis_idx = jnp.clip(rel, 0, t - 1)
  take = lambda x, i: jnp.take_along_axis(x, i[..., None] if x.ndim == 3 else i, axis=1)
  embeds = jnp.where(is_vis[..., None], take(visual.astype(tokens.dtype), vis_idx), take(tokens, tok_idx))
  mask = jnp.where(is_vis, take(visual_mask.astype(bool), vis_idx), take(token_mask.astype(bool), tok_idx))
  return embeds, mask, tok_idx, is_vis


# --------------------------------------------------------------------------------- data


class _Elements:
  """(global index, conversation position) -> one example; picklable for Grain workers."""

  def __init__(self, recipe: "SlideInstructRecipe", records: list[dict], m: int):
    self.directory = recipe.embeddings.directory
    self.manifest = recipe.embeddings.manifest
    self.records, self.m, self.seed = records, m, int(recipe.config.seed)
    self.dtype = np.dtype(recipe.config.data.feature_dtype)
    self.chat = recipe.chat
    self._emb = None

  def __call__(self, index: int, position: int) -> dict[str, np.ndarray]:
    from pathjax.embed_slides import SlideEmbeddings
    from pathjax.recipes.pathalign import slide_arrays
    if self._emb is None:
      self._emb = SlideEmbeddings(self.directory, self.manifest)
    epoch = int(index) // len(self.records)
    r = self.records[position]
    sf = self._emb[r["slide"]]
    rng = np.random.default_rng([self.seed, epoch, int(position)])
    out = slide_arrays(sf.features, sf.grid, self.m, rng, self.dtype)
    enc = self.chat.encode(r["messages"])
    out.update(ids=enc.ids, mask=enc.mask, targets=enc.targets, image_pos=np.int32(enc.image_pos))
    return out


# ------------------------------------------------------------------------------- recipe


class SlideInstructRecipe:
  """The trainer's view of slide instruction tuning (pathjax.recipes.base.Recipe)."""

  def __init__(self, config, mesh=None):
    self.config, self.mesh = config, mesh
    m = config.model
    self.stage = int(m.stage)
    if self.stage not in (1, 2):
      raise ConfigError(f"model.stage={m.stage}; valid: 1 (projector), 2 (projector + LoRA)")
    self.compute_dtype = _dtype(config.precision.compute_dtype)
    self.param_dtype = _dtype(config.precision.param_dtype)
    self.encoder = FrozenEncoder(m.encoder_dir, m.get("encoder_config", ""))
    self._setup_llm()
    self.lora = None
    if self.stage == 2 and int(m.lora.rank) > 0:
      from pathjax.models.llm import LORA_TARGETS
      unknown = [t for t in m.lora.targets if t not in LORA_TARGETS]
      if unknown:
        raise ConfigError(f"model.lora.targets {unknown}: valid {', '.join(LORA_TARGETS)}")
      self.lora = lora_lib.LoraConfig(
          rank=int(m.lora.rank), alpha=float(m.lora.alpha), dropout=float(m.lora.dropout),
          targets=tuple("llm/" + LORA_TARGETS[t] for t in m.lora.targets))
    self._m = None
    self._visual = None

  def _setup_llm(self):
    from pathjax.models import model_dir
    m = self.config.model
    if not m.llm_dir:
      fields = m.llm_overrides.to_dict()
      if not fields.get("hidden_size"):
        raise ConfigError("model.llm_dir is empty: set it to a `pathjax convert --llm` directory "
                          "(with its tokenizer), or give model.llm_overrides the LLM's fields for "
                          "an AOT compile (the `shapes` variant)")
      # Shapes only (pathjax compile): no tokenizer, no weights.
      self.llm_fields, self.llm_meta, self.tokenizer_dir, self.chat = dict(fields), {}, None, None
      return
    meta = model_dir.read_for_config("model.llm_dir", m.llm_dir, "llm",
                                     "write one with `pathjax convert --llm`")
    if not meta.get("tokenizer"):
      raise ConfigError(f"model.llm_dir {m.llm_dir} stores no tokenizer")
    fields = dict(meta["towers"]["llm"]["config"])
    fields.update({k: v for k, v in m.llm_overrides.to_dict().items() if k in ("remat", "attention")})
    self.llm_fields = fields
    self.llm_meta = meta
    self.tokenizer_dir = os.path.join(m.llm_dir, meta["tokenizer"])
    self.chat = inst.ChatEncoder(self.tokenizer_dir, int(m.text_len))

  def _need_weights(self):
    if self.encoder.directory is None or self.chat is None:
      raise ConfigError("model.encoder_config / model.llm_overrides without model.encoder_dir and "
                        "model.llm_dir describe shapes only (pathjax compile); training needs "
                        "model.encoder_dir and model.llm_dir")

  # -- data ------------------------------------------------------------------------------

  @property
  def embeddings(self):
    emb = self.__dict__.get("_emb")
    if emb is None:
      from pathjax.embed_slides import EmbedSlidesError, open_slide_embeddings
      if not self.config.data.embeddings:
        raise ConfigError("data.embeddings is empty: set it to a `pathjax embed-slides` directory")
      try:
        emb = self._emb = open_slide_embeddings(self.config.data.embeddings)
      except EmbedSlidesError as e:
        raise ConfigError(f"data.embeddings: {e}") from None
    return emb

  def is_heldout(self, slide: str) -> bool:
    from pathjax.recipes.pathalign import heldout
    d = self.config.data
    if d.heldout_pattern:
      try:
        return re.search(d.heldout_pattern, slide) is not None
      except re.error as e:
        raise ConfigError(f"data.heldout_pattern {d.heldout_pattern!r}: {e}") from None
    return heldout(slide, float(d.holdout_fraction), int(d.split_seed))

  def records(self, split: str = "train", tasks: Sequence[str] | None = None) -> list[dict]:
    """Conversations of `split` (train / heldout / all) on embedded slides, of `tasks`
    (default data.tasks; empty = all)."""
    cache = self.__dict__.setdefault("_records", {})
    if "all" not in cache:
      try:
        rows = inst.read_instructions(self.config.data.instructions)
      except inst.InstructionError as e:
        raise ConfigError(f"data.instructions: {e}") from None
      have = set(self.embeddings.slide_ids)
      missing = sorted({r["slide"] for r in rows} - have)
      if missing:
        log.warning("%d slides of %s have no embedding and are left out, e.g. %s", len(missing),
                    self.config.data.instructions, missing[:3])
      cache["all"] = [r for r in rows if r["slide"] in have]
    tasks = tuple(self.config.data.tasks) if tasks is None else tuple(tasks)
    out = [r for r in cache["all"] if (not tasks or r["task"] in tasks) and
           (split == "all" or self.is_heldout(r["slide"]) == (split == "heldout"))]
    if not out:
      raise ConfigError(f"no {split} conversation of tasks {list(tasks) or 'any'} in "
                        f"{self.config.data.instructions} has an embedded slide in "
                        f"{self.config.data.embeddings}")
    return out

  def _num_patches(self) -> int:
    if self._m is None:
      self._m = int(self.config.data.max_patches)
      if self.config.data.embeddings and self.config.data.instructions:
        counts = {s["slide_id"]: int(s.get("patches") or 0) for s in self.embeddings.manifest["slides"]}
        longest = max(counts.get(r["slide"], 0) for r in self.records("train"))
        self._m = max(1, min(self._m, longest))
    return self._m

  def _feature_dim(self) -> int:
    if self.config.data.embeddings:
      return int(self.embeddings.dim)
    return int(self.config.data.feature_dim)

  def visual_shape(self) -> tuple[int, int]:
    """(T, E) of the encoder's visual tokens for M patches (traced, nothing computed)."""
    if self._visual is None:
      m, d = self._num_patches(), self._feature_dim()
      s = jax.ShapeDtypeStruct
      enc = jax.eval_shape(lambda k: nn.unbox(self.encoder.init(k)), jax.random.key(0))
      try:
        tok, tmask = jax.eval_shape(self.encoder.visual_tokens, enc, s((1, m, d), jnp.float32),
                                    s((1, m, 2), jnp.int32), s((1, m), jnp.bool_))
      except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"the encoder in {self.encoder.directory} cannot take {d}-dimensional "
                          f"patch features of {self.config.data.embeddings}: {e}") from None
      self._visual = (int(tok.shape[1]), int(tok.shape[2]))
    return self._visual

  @property
  def projector_fields(self) -> dict[str, Any]:
    return dict(in_dim=self.visual_shape()[1], out_dim=int(self.llm_fields["hidden_size"]),
                kind=str(self.config.model.projector))

  @property
  def model(self) -> InstructModel:
    return InstructModel(self.projector_fields, self.llm_fields, self.compute_dtype, self.param_dtype)

  def example_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    b, m, d, length = global_batch_size, self._num_patches(), self._feature_dim(), int(self.config.model.text_len)
    s = jax.ShapeDtypeStruct
    return {"features": s((b, m, d), np.dtype(self.config.data.feature_dtype)),
            "coords": s((b, m, 2), jnp.int32), "patch_mask": s((b, m), jnp.bool_),
            "ids": s((b, length), jnp.int32), "mask": s((b, length), jnp.bool_),
            "targets": s((b, length), jnp.bool_), "image_pos": s((b,), jnp.int32)}

  def init(self, rng, batch):
    t, e = self.visual_shape()
    args = (jnp.zeros((1, t, e), jnp.float32), jnp.zeros((1, 4), jnp.int32))
    k1, k2 = jax.random.split(rng)
    if self.lora is not None:
      params = lora_lib.init(self.model, self.lora, k1, *args)["params"]
    else:
      params = self.model.init(k1, *args)["params"]
    return {**params, "encoder": self.encoder.init(k2)}

  def train_iterator(self, process_index: int, process_count: int):
    if self.config.batch_size % process_count:
      raise ConfigError(f"batch_size {self.config.batch_size} is not divisible by "
                        f"{process_count} processes")
    self._need_weights()
    records = self.records("train")
    elements = _Elements(self, records, self._num_patches())
    long = sum(self.chat.encode(r["messages"]).truncated for r in records[:256])
    if long:
      log.warning("%d of the first %d conversations are longer than model.text_len=%d tokens "
                  "and are cut", long, min(len(records), 256), self.chat.length)
    ds = (grain.MapDataset.range(len(records))
          .shuffle(seed=int(self.config.seed))
          .repeat(None)
          .map_with_index(elements)
          [process_index::process_count]
          .batch(self.config.batch_size // process_count, drop_remainder=True))
    return iter(ds.to_iter_dataset())

  # -- loss ------------------------------------------------------------------------------

  def _apply(self, params, method, *args, rng=None, train=False):
    variables = {"params": {k: v for k, v in params.items() if k != "encoder"}}
    if self.lora is None:
      return self.model.apply(variables, *args, method=method)
    rngs = {"dropout": rng} if (train and rng is not None and self.lora.dropout > 0) else {}
    with lora_lib.adapters(self.lora, deterministic=not train):
      return self.model.apply(variables, *args, method=method, rngs=rngs)

  def visual_embeds(self, params, features, coords, mask):
    """Projected visual tokens [B, T, H] and their mask [B, T]; the encoder is frozen."""
    vis, vmask = self.encoder.visual_tokens(params["encoder"], features, coords, mask.astype(bool))
    vis = jax.lax.stop_gradient(vis)
    return self._apply(params, InstructModel.project, vis), vmask

  def inputs(self, params, batch, rng=None, train=False):
    """(embeds, mask, target ids, target weights) of the spliced sequences."""
    vis, vmask = self.visual_embeds(params, batch["features"], batch["coords"], batch["patch_mask"])
    ids = batch["ids"].astype(jnp.int32)
    table = params["llm"]["embed"]["embedding"]
    tokens = jnp.take(table, ids, axis=0).astype(self.compute_dtype)
    embeds, mask, tok_idx, is_vis = splice(tokens, vis, batch["mask"], vmask, batch["image_pos"])
    out_ids = jnp.take_along_axis(ids, tok_idx, axis=1)
    weights = jnp.take_along_axis(batch["targets"].astype(bool), tok_idx, axis=1) & ~is_vis & mask
    return embeds, mask, out_ids, weights

  def loss(self, params, batch, rng, train: bool = True):
    embeds, mask, out_ids, weights = self.inputs(params, batch, rng, train)
    logits = self._apply(params, InstructModel.lm, embeds, mask, rng=rng, train=train)
    loss, acc, count = losses.masked_token_cross_entropy(logits[:, :-1], out_ids[:, 1:], weights[:, 1:])
    return loss, {"loss": loss, "lm": loss, "lm_accuracy": acc, "lm_tokens": count.astype(jnp.int32)}

  # -- frozen towers and initialisation --------------------------------------------------

  def frozen_patterns(self) -> tuple[str, ...]:
    llm = r"llm/(?!.*/lora_[ab]$).*" if self.lora is not None else r"llm/.*"
    return (r"encoder/.*", llm)

  def load_pretrained(self, abstract: dict[str, jax.ShapeDtypeStruct], wanted: set[str]
                      ) -> dict[str, jax.Array]:
    """Encoder towers from model.encoder_dir and the LLM from model.llm_dir (every start, no
    adapters), the projector from model.init_dir (fresh starts, when it has one)."""
    from pathjax.models import model_dir
    self._need_weights()
    m = self.config.model
    out: dict[str, jax.Array] = {}

    def tower(directory, name, prefix):
      sub = {p[len(prefix):]: x for p, x in abstract.items()
             if p.startswith(prefix) and not LORA_ADAPTER.match(p)}
      only = {p[len(prefix):] for p in wanted if p.startswith(prefix) and not LORA_ADAPTER.match(p)}
      if not only:
        return
      try:
        placed = model_dir.place_tower(directory, name, sub, only=only)
      except model_dir.ModelDirError as e:
        raise ConfigError(f"{directory} {name} tower: {e}") from None
      out.update({prefix + k: v for k, v in placed.items()})

    for t in self.encoder.towers:
      tower(self.encoder.directory, t, f"encoder/{t}/")
    tower(m.llm_dir, "llm", "llm/")
    if m.init_dir:
      model_dir.read_for_config("model.init_dir", m.init_dir, "projector",
                                "a stage-1 export of this recipe has one")
      tower(m.init_dir, "projector", "projector/")
    return out

  # -- using a trained model ---------------------------------------------------------------

  def predict_fns(self, params) -> dict[str, Callable[..., Any]]:
    def visual_tokens(features, coords, mask):
      return self.encoder.visual_tokens(params["encoder"], features, coords, mask)
    return {"visual_tokens": visual_tokens,
            "answer": lambda *a, **kw: self.answer(params, *a, **kw)}

  def llm_params(self, params):
    """The LLM's parameters with the LoRA adapters merged in (for generation)."""
    if self.lora is None:
      return params["llm"]
    base, ada = lora_lib.split(params["llm"])
    return lora_lib.merge(base, ada, self.lora.scale)

  def generator(self, params):
    from pathjax.generate import Generator
    from pathjax.models.llm import LLM
    cache = self.__dict__.setdefault("_gen", {})
    if "gen" not in cache:  # one Generator (its jitted steps take the params as an argument)
      gen = self.llm_meta.get("generation", {})
      module = LLM(**self.llm_fields, dtype=self.compute_dtype, param_dtype=self.param_dtype)
      cache["gen"] = Generator(module, None, eos_ids=[self.chat.eos_id], pad_id=self.chat.pad_id,
                               max_length=gen.get("max_length"), bucket=16)
    if cache.get("params") is not params:
      cache["params"] = params
      cache["gen"].params = self.llm_params(params)
    return cache["gen"]

  def answer(self, params, features, coords, mask, conversations: Sequence[Sequence[dict]], *,
             max_new_tokens: int = 64, on_token: Callable[[np.ndarray], None] | None = None
             ) -> list[str]:
    """The assistant's next answer for each (slide, conversation so far) pair; the
    conversations end with a user turn holding the `<image>`. Greedy."""
    fn = self.__dict__.get("_vis_fn")
    if fn is None:
      fn = self._vis_fn = jax.jit(lambda p, f, c, m: self.visual_embeds(p, f, c, m))
    vis, vmask = jax.device_get(fn(params, jnp.asarray(features), jnp.asarray(coords),
                                   jnp.asarray(mask).astype(bool)))
    table = np.asarray(jax.device_get(params["llm"]["embed"]["embedding"]))
    prefixes, prompts = [], []
    for b, conv in enumerate(conversations):
      before, after = self.chat.prompt(conv)
      prefixes.append(np.concatenate([table[before].astype(vis.dtype), vis[b][vmask[b]]], 0))
      prompts.append(after)
    gen = self.generator(params)
    out: list[str | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
      groups.setdefault(len(p), []).append(i)
    for idx in groups.values():
      new = gen.generate([prompts[i] for i in idx], prefix=np.stack([prefixes[i] for i in idx]),
                         max_new_tokens=max_new_tokens, on_token=on_token)
      for i, ids in zip(idx, new):
        out[i] = self.chat.decode(ids)
    return out

  def export(self, params) -> dict[str, Any]:
    proj = self.projector_fields
    towers = {"projector": dict(kind="projector", module=Projector(**proj), params=params["projector"])}
    extra = {"generation": self.llm_meta.get("generation", {}),
             "slide_instruct": {"stage": self.stage, "encoder_dir": self.encoder.directory,
                                "llm_dir": os.path.abspath(self.config.model.llm_dir),
                                "visual_tokens": self.visual_shape()[0],
                                "llm_merged": self.lora is not None}}
    if self.lora is not None:
      from pathjax.models.llm import LLM
      towers["llm"] = dict(kind="llm", module=LLM(**self.llm_fields), params=self.llm_params(params))
    return {"towers": towers, "tokenizer_dir": self.tokenizer_dir, "extra_meta": extra}


def load_chat_model(directory: str, *, embeddings: str | None = None,
                    max_patches: int | None = None) -> tuple[SlideInstructRecipe, dict]:
  """(recipe, params) of an export of this recipe, for answering questions: the encoder from
  its encoder_dir, the LLM from the export (adapters merged) or its llm_dir, the projector
  from the export. `embeddings` replaces the training config's data.embeddings."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from pathjax.models import model_dir
  try:
    meta = model_dir.read_model_json(directory)
  except model_dir.ModelDirError as e:
    raise ConfigError(str(e)) from None
  info = meta.get("slide_instruct")
  if not info or "projector" not in meta["towers"] or "train_config" not in meta:
    raise ConfigError(f"{directory} is not a slide chat model (it has no encoder and projector; "
                      f"towers: {', '.join(meta['towers'])}): train one with "
                      "configs/pathflip.py and --config.export_model=True")
  config = ml_collections.ConfigDict(meta["train_config"])
  config.evals = []
  config.model.encoder_dir = info["encoder_dir"]
  if "llm" in meta["towers"]:   # stage 2: the LLM with its adapters merged
    config.model.llm_dir, config.model.lora.rank = os.path.abspath(directory), 0
  else:
    config.model.llm_dir = info["llm_dir"]
  config.model.init_dir = os.path.abspath(directory)
  config.data.instructions = ""
  if embeddings:
    config.data.embeddings = embeddings
  if max_patches:
    config.data.max_patches = int(max_patches)
  recipe = make_recipe(config)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  rep = NamedSharding(mesh, PartitionSpec())
  shapes = jax.eval_shape(lambda k: nn.unbox(recipe.init(k, None)), jax.random.key(0))
  abstract = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep) for p, x in _flat(shapes).items()}
  loaded = recipe.load_pretrained(abstract, set(abstract))
  missing = sorted(set(abstract) - set(loaded))
  if missing:
    raise ConfigError(f"{directory}: parameters not found in its model directories: {missing[:6]}")
  return recipe, _unflat(loaded)


def make_recipe(config, mesh=None) -> SlideInstructRecipe:
  return SlideInstructRecipe(config, mesh)
