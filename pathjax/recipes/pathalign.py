"""PathAlign (specs/pathalign.md, specs/qformer.md): a BLIP-2 Q-Former over whole-slide
patch embeddings, aligned with report text (stage 1), then writing reports through a frozen
decoder LLM (stage 2).

Data: a finished `pathjax embed-slides` directory (`data.embeddings`) and a report file
(`data.reports`, pathjax.input.reports: each slide paired with its part of a multi-part
report). Slides are split into train / held-out by a stable hash of the slide id
(`data.holdout_fraction`); training reads the train split through a Grain pipeline
(shuffled per epoch, split by process, resumable). Per slide and step: at most
`data.max_patches` patches, a uniform sample without replacement seeded by (seed, epoch,
slide) when a slide has more, padded to M = min(max_patches, longest slide) with a key mask.

Stage 1 (`stage=1`): L = w_itc ITC + w_itm ITM + w_itg ITG (pathjax.losses_blip); the
cross-attention K/V of every slide are computed once per step (`QFormer.encode_patches`);
ITM's negative images are gathered as raw features and re-encoded (cheaper to move than K/V,
see qformer.py). The retrieval variant is 1 query and ITC only.
Stage 2 (`stage=2`): Q-Former query outputs -> `proj` (no bias) -> soft tokens prepended to
the prompt's embeddings in a frozen LLM (`model.llm_dir`, streamed into its shardings on every
start and never checkpointed); loss on the report tokens only. The Q-Former starts from a
stage-1 model directory (`model.init_dir`).

Batch (host arrays; B = this host's share of the global batch):
    features [B, M, D] (data.feature_dtype), coords [B, M, 2] int32 grid, patch_mask [B, M],
    text_ids [B, T] int32 ([CLS] report [SEP] pad; BERT-style tokenizer), text_mask [B, T],
    slide_index [B] int32 (position in the sorted train split),
    stage 2 also llm_ids [B, L], llm_mask [B, L], llm_targets [B, L] (True on report tokens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from pathjax import losses, losses_blip
from pathjax.config_lib import ConfigError
from pathjax.losses import l2_normalize
from pathjax.models import layers
from pathjax.models.heads import spread, unrelated_cosine
from pathjax.models.qformer import QFormer

log = logging.getLogger("pathjax.pathalign")

DEC_TOKEN = "[DEC]"


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


# ------------------------------------------------------------------------------ tokenizer


class ReportTokenizer:
  """BERT-style ids for reports: [CLS] tokens [SEP] [PAD]..., plus the [DEC] id for ITG.

  Any tokenizer directory with cls/sep/pad tokens and a [DEC] token (`pathjax convert
  --bert` writes one next to the Q-Former; `train_wordpiece_tokenizer` makes one offline).
  Reuses TextTokenizer (cached, picklable) with bos = [CLS] and eos = [SEP].
  """

  def __init__(self, path: str, length: int):
    from pathjax.input.tokenize import TextTokenizer, load_tokenizer
    try:
      tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
      raise ConfigError(f"input.tokenizer: {e}") from None
    cls_id, sep_id, pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    dec_id = tok.convert_tokens_to_ids(DEC_TOKEN)
    if None in (cls_id, sep_id, pad_id) or dec_id is None or dec_id == tok.unk_token_id:
      raise ConfigError(f"the tokenizer in {path} needs [CLS], [SEP], [PAD] and {DEC_TOKEN} tokens "
                        "(a BERT tokenizer from `pathjax convert --bert`, or one made by "
                        "pathjax.input.tokenize.train_wordpiece_tokenizer)")
    self.text = TextTokenizer(tok, length, pad_id=pad_id)
    self.text.bos_id, self.text.eos_id = int(cls_id), int(sep_id)
    self.cls_id, self.sep_id, self.pad_id, self.dec_id = int(cls_id), int(sep_id), int(pad_id), int(dec_id)
    self.vocab_size = max(self.text.vocab_size, len(tok))
    self.length = int(length)

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = self.text.encode(list(texts))
    return enc["ids"].astype(np.int32), enc["mask"]

  def decode(self, ids) -> str:
    return self.text.decode(ids)


# --------------------------------------------------------------------------------- data


def heldout(slide_id: str, fraction: float, seed: int) -> bool:
  """Stable split: a slide is held out when the hash of (seed, id) falls below `fraction`."""
  h = hashlib.sha256(f"{seed}:{slide_id}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction


@dataclasses.dataclass
class SlideReportData:
  """Paired slides of one split: ids (sorted), their texts, the embeddings and counts."""
  embeddings: Any                       # pathjax.embed_slides.SlideEmbeddings
  slide_ids: list[str]
  texts: list[str]
  patches: list[int]
  summary: dict[str, Any]


def load_pairs(data_cfg, encoder_width: int, split: str = "train") -> SlideReportData:
  """Opens the embeddings (checking the feature width), pairs slides with report parts and
  keeps `split` ("train", "heldout" or "all"). Every dropped slide is counted in `summary`."""
  from pathjax.embed_slides import EmbedSlidesError, open_slide_embeddings
  from pathjax.input.reports import ReportError, pair_reports
  if not data_cfg.embeddings or not data_cfg.reports:
    raise ConfigError("PathAlign needs data.embeddings (a `pathjax embed-slides` directory) and "
                      "data.reports (a report JSON-lines file): set --config.data.embeddings=DIR "
                      "--config.data.reports=FILE")
  try:
    emb = open_slide_embeddings(data_cfg.embeddings, dim=int(encoder_width),
                                encoder="model.qformer.encoder_width")
  except EmbedSlidesError as e:
    raise ConfigError(f"data.embeddings: {e}") from None
  try:
    pairing = pair_reports(data_cfg.reports, emb.slide_ids,
                           whole_report_fallback=bool(data_cfg.whole_report_fallback))
  except ReportError as e:
    raise ConfigError(f"data.reports: {e}") from None
  skipped = {s["slide"]: s.get("reason") for s in emb.manifest.get("skipped", {}).get("slides", [])}
  summary = pairing.summary()
  summary["skipped_by_embed_slides"] = dict(emb.manifest.get("skipped", {}).get("by_reason", {}))
  summary["reports_for_skipped_slides"] = sorted(s for s in pairing.unknown_slides if s in skipped)
  summary["unknown_slides"] = len([s for s in pairing.unknown_slides if s not in skipped])
  counts = {s["slide_id"]: int(s.get("patches") or 0) for s in emb.manifest["slides"]}
  if split not in ("train", "heldout", "all"):
    raise ValueError(f"split {split!r}: valid train, heldout, all")
  frac, seed = float(data_cfg.holdout_fraction), int(data_cfg.split_seed)
  pattern = data_cfg.get("heldout_pattern", "")
  if pattern:  # an explicit held-out set, e.g. slide ids with a "heldout-" prefix
    import re
    try:
      held = re.compile(pattern).search
    except re.error as e:
      raise ConfigError(f"data.heldout_pattern {pattern!r} is not a regular expression: {e}") from None
    is_held = lambda s: held(s) is not None
  else:
    is_held = lambda s: heldout(s, frac, seed)
  ids = sorted(s for s in pairing.pairs if split == "all" or is_held(s) == (split == "heldout"))
  summary["split"], summary["split_slides"] = split, len(ids)
  if not ids:
    raise ConfigError(f"no {split} slide has both an embedding in {data_cfg.embeddings} and a "
                      f"report in {data_cfg.reports} (pairing: {_short(summary)})")
  return SlideReportData(emb, ids, [pairing.pairs[s] for s in ids], [counts.get(s, 0) for s in ids],
                         summary)


def _short(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if k != "lists"}


def slide_arrays(features: np.ndarray, grid: np.ndarray, m: int, rng: np.random.Generator | None,
                 dtype) -> dict[str, np.ndarray]:
  """One slide padded / sampled to M patches: features [M, D], coords [M, 2], patch_mask [M].

  More than M patches: a uniform M-subset without replacement (from `rng`; the first M when
  rng is None, for evaluation)."""
  n = len(features)
  if n > m:
    sel = np.arange(m) if rng is None else np.sort(rng.choice(n, m, replace=False))
    features, grid = features[sel], grid[sel]
    n = m
  out_f = np.zeros((m, features.shape[-1]), dtype)
  out_f[:n] = features
  out_c = np.zeros((m, 2), np.int32)
  out_c[:n] = grid
  mask = np.zeros((m,), bool)
  mask[:n] = True
  return {"features": out_f, "coords": out_c, "patch_mask": mask}


class SlideElements:
  """Maps (global index, slide position) -> one training example; picklable for workers.
  The shared part of the slide recipes' element functions: the embeddings opened lazily in
  each worker, the slide, its report and the epoch (PathFLIP's subclass adds regions and
  subcaptions)."""

  def __init__(self, recipe, data: SlideReportData, m: int):
    self.directory = data.embeddings.directory
    self.manifest = data.embeddings.manifest
    self.slide_ids, self.texts = data.slide_ids, data.texts
    self.m, self.seed = m, int(recipe.config.seed)
    self.dtype = np.dtype(recipe.config.data.feature_dtype)
    self.tokenizer = recipe.tokenizer
    self._emb = None

  def slide(self, index: int, position: int):
    """(slide id, its SlideFeatures, epoch) of global element `index` at `position`."""
    if self._emb is None:
      from pathjax.embed_slides import SlideEmbeddings
      self._emb = SlideEmbeddings(self.directory, self.manifest)
    sid = self.slide_ids[position]
    return sid, self._emb[sid], int(index) // len(self.slide_ids)

  def report(self, position: int) -> dict[str, np.ndarray]:
    ids, mask = self.tokenizer([self.texts[position]])
    return {"text_ids": ids[0], "text_mask": mask[0], "slide_index": np.int32(position)}


class _SlideElements(SlideElements):
  """PathAlign: a uniform patch sample per slide and epoch, the report (and stage 2's LLM text)."""

  def __init__(self, recipe: "PathAlignRecipe", data: SlideReportData, m: int):
    super().__init__(recipe, data, m)
    self.llm_text = recipe.llm_text if recipe.stage == 2 else None

  def __call__(self, index: int, position: int) -> dict[str, np.ndarray]:
    _, sf, epoch = self.slide(index, position)
    rng = np.random.default_rng([self.seed, epoch, int(position)])
    out = slide_arrays(sf.features, sf.grid, self.m, rng, self.dtype)
    out.update(self.report(position))
    if self.llm_text is not None:
      out.update(self.llm_text.encode(self.texts[position]))
    return out


class LLMText:
  """Stage-2 LLM inputs: prompt tokens + report tokens + eos, right-padded to `length`,
  with the report tokens (and eos) marked as targets."""

  def __init__(self, tokenizer_dir: str, prompt: str, length: int, eos_id: int | None,
               pad_id: int | None):
    from pathjax.input.tokenize import load_tokenizer
    self.tok = load_tokenizer(tokenizer_dir)
    eos = eos_id if eos_id is not None else self.tok.eos_token_id
    if eos is None:
      raise ConfigError(f"the LLM tokenizer in {tokenizer_dir} has no eos token")
    self.eos_id = int(eos)
    self.pad_id = int(pad_id if pad_id is not None else (self.tok.pad_token_id
                                                         if self.tok.pad_token_id is not None else eos))
    bos = self.tok.bos_token_id
    self.prompt_ids = ([int(bos)] if bos is not None else []) + list(
        self.tok.encode(prompt, add_special_tokens=False))
    self.length = int(length)
    if len(self.prompt_ids) + 2 > self.length:
      raise ConfigError(f"the stage-2 prompt has {len(self.prompt_ids)} tokens; model.llm_text_len "
                        f"{self.length} leaves no room for the report")

  def __getstate__(self):
    state = dict(self.__dict__)
    state["tok"] = None  # encode() needs only the backend, kept below
    state["_backend"] = self.tok.backend_tokenizer.to_str() if self.tok is not None else state.get("_backend")
    return state

  def __setstate__(self, state):
    import tokenizers
    self.__dict__.update(state)
    self._backend_tok = tokenizers.Tokenizer.from_str(state["_backend"])

  def _encode(self, text: str) -> list[int]:
    if self.__dict__.get("tok") is not None:
      return list(self.tok.encode(text, add_special_tokens=False))
    return list(self._backend_tok.encode(text, add_special_tokens=False).ids)

  def encode(self, report: str) -> dict[str, np.ndarray]:
    body = self._encode(report)[: self.length - len(self.prompt_ids) - 1] + [self.eos_id]
    seq = self.prompt_ids + body
    ids = np.full((self.length,), self.pad_id, np.int32)
    ids[:len(seq)] = seq
    mask = np.zeros((self.length,), bool)
    mask[:len(seq)] = True
    targets = np.zeros((self.length,), bool)
    targets[len(self.prompt_ids):len(seq)] = True
    return {"llm_ids": ids, "llm_mask": mask, "llm_targets": targets}

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    if self.__dict__.get("tok") is not None:
      return self.tok.decode(ids, skip_special_tokens=True).strip()
    return self._backend_tok.decode(ids, skip_special_tokens=True).strip()


# -------------------------------------------------------------------------------- model


class PathAlignModel(nn.Module):
  """The Q-Former; in stage 2 also `proj` (Q-Former width -> LLM hidden) and the LLM."""
  qformer_cfg: dict[str, Any]
  llm_cfg: dict[str, Any] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.qformer = QFormer(**self.qformer_cfg, **kw)
    if self.llm_cfg is not None:
      from pathjax.models.llm import LLM
      self.proj = layers.dense(self.llm_cfg["hidden_size"], ("embed", "mlp"), use_bias=False,
                               name=None, **kw)
      self.llm = LLM(**self.llm_cfg, **kw)

  def q(self, method: str, *args, **kwargs):
    return getattr(self.qformer, method)(*args, **kwargs)

  def soft_tokens(self, kv) -> jax.Array:
    """[B, Q, llm hidden]: the query outputs projected into the LLM's embedding space."""
    return self.proj(self.qformer.query_pass(kv))

  def lm(self, inputs_embeds, attention_mask):
    return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

  def __call__(self, features, coords, patch_mask, ids, text_mask, llm_ids=None):
    out = self.qformer(features, coords, patch_mask, ids, text_mask)
    if self.llm_cfg is not None:
      kv = self.qformer.encode_patches(features, coords, patch_mask)
      soft = self.soft_tokens(kv)
      out["llm_logits"] = self.llm(llm_ids)
      out["soft"] = soft
    return out


# ------------------------------------------------------------------------------- recipe


def collapse_monitors(img: jax.Array, txt: jax.Array) -> dict[str, jax.Array]:
  """Collapse monitors of stage 1 (printed by the demo): the spread of the slide embeddings
  (mean of the query embeddings), of the individual query embeddings and of the report
  embeddings (~1 healthy, 0 when every slide maps to one direction), and the cosine of a
  slide with other slides' reports (~0 healthy, 1 collapsed). img [B, Q, E], txt [B, E]."""
  slide = jnp.mean(img.astype(jnp.float32), axis=1)
  return {"monitor_slide_spread": spread(slide), "monitor_query_spread": spread(img),
          "monitor_report_spread": spread(txt),
          "monitor_itc_unrelated_cos": unrelated_cosine(slide[:, None], txt[:, None])}


class PathAlignRecipe:
  """The trainer's view of PathAlign (pathjax.recipes.base.Recipe)."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = mesh
    m = config.model
    self.stage = int(m.stage)
    if self.stage not in (1, 2):
      raise ConfigError(f"model.stage={m.stage}; valid: 1 (Q-Former pretraining), 2 (frozen LLM)")
    if config.loss.get("itm_negatives", "hard") not in ("hard", "random"):
      raise ConfigError(f"loss.itm_negatives={config.loss.itm_negatives!r}; valid: hard, random")
    self.compute_dtype = _dtype(config.precision.compute_dtype)
    self.param_dtype = _dtype(config.precision.param_dtype)
    qf = dict(m.qformer.to_dict())
    self.tokenizer = None
    if config.input.tokenizer:
      self.tokenizer = ReportTokenizer(config.input.tokenizer, int(config.input.text_len))
      if not qf.get("vocab_size"):
        qf["vocab_size"] = self.tokenizer.vocab_size
      elif qf["vocab_size"] < self.tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer in {config.input.tokenizer} has {self.tokenizer.vocab_size} "
                          f"tokens, more than model.qformer.vocab_size={qf['vocab_size']}")
    elif not qf.get("vocab_size"):
      raise ConfigError("model.qformer.vocab_size is 0 (take it from the tokenizer) but "
                        "input.tokenizer is empty: set --config.input.tokenizer=DIR")
    if m.init_dir:  # the Q-Former's own fields come from the model directory it starts from
      from pathjax.models import model_dir
      meta = model_dir.read_for_config("model.init_dir", m.init_dir, "qformer")
      stored = dict(meta["towers"]["qformer"]["config"])
      keep = {k: qf[k] for k in ("dropout_rate", "attention_dropout_rate", "deterministic") if k in qf}
      qf = {**stored, **keep}
    self.qformer_fields = qf
    self.llm_fields = None
    self.llm_text = None
    if self.stage == 2:
      self._setup_llm()
    self.model = self._model(deterministic=True)
    self.train_model = self._model(deterministic=not (qf.get("dropout_rate") or
                                                      qf.get("attention_dropout_rate")))

  def _setup_llm(self):
    m = self.config.model
    if m.llm_dir:
      from pathjax.models import model_dir
      meta = model_dir.read_for_config("model.llm_dir", m.llm_dir, "llm",
                                       "write one with `pathjax convert --llm`")
      fields = dict(meta["towers"]["llm"]["config"])
      # Only run-time choices; the layout (and `scan`, which shapes the tree) is the directory's.
      fields.update({k: v for k, v in m.llm_overrides.to_dict().items() if k in ("remat", "attention")})
      self.llm_fields = fields
      tok = meta.get("tokenizer")
      if tok:
        import os
        gen = meta.get("generation", {})
        eos = gen.get("eos_token_id")
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.llm_text = LLMText(os.path.join(m.llm_dir, tok), m.prompt, int(m.llm_text_len),
                                eos, gen.get("pad_token_id"))
    else:
      if not m.llm_overrides.to_dict().get("hidden_size"):
        raise ConfigError("stage 2 needs model.llm_dir (a `pathjax convert --llm` directory), or "
                          "model.llm_overrides with the LLM's fields for synthetic batches")
      self.llm_fields = dict(m.llm_overrides.to_dict())

  def _model(self, deterministic: bool) -> PathAlignModel:
    return PathAlignModel(qformer_cfg={**self.qformer_fields, "deterministic": deterministic},
                          llm_cfg=self.llm_fields, dtype=self.compute_dtype, param_dtype=self.param_dtype)

  @property
  def qformer(self) -> QFormer:
    return QFormer(**self.qformer_fields)

  # -- shapes ---------------------------------------------------------------------------

  def _num_patches(self) -> int:
    """M: min(max_patches, the longest training slide) -- or max_patches without data."""
    if getattr(self, "_m", None) is None:
      self._m = int(self.config.data.max_patches)
      if self.config.data.embeddings and self.config.data.reports:
        data = self.data("train")
        self._m = max(1, min(self._m, max(data.patches)))
    return self._m

  def data(self, split: str = "train") -> SlideReportData:
    cache = self.__dict__.setdefault("_data", {})
    if split not in cache:
      cache[split] = load_pairs(self.config.data, self.qformer_fields["encoder_width"], split)
      log.info("pathalign %s data: %s", split, _short(cache[split].summary))
    return cache[split]

  def example_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    b, m, t = global_batch_size, self._num_patches(), int(self.config.input.text_len)
    d = int(self.qformer_fields["encoder_width"])
    s = jax.ShapeDtypeStruct
    out = {"features": s((b, m, d), np.dtype(self.config.data.feature_dtype)),
           "coords": s((b, m, 2), jnp.int32), "patch_mask": s((b, m), jnp.bool_),
           "text_ids": s((b, t), jnp.int32), "text_mask": s((b, t), jnp.bool_),
           "slide_index": s((b,), jnp.int32)}
    if self.stage == 2:
      length = int(self.config.model.llm_text_len)
      out.update(llm_ids=s((b, length), jnp.int32), llm_mask=s((b, length), jnp.bool_),
                 llm_targets=s((b, length), jnp.bool_))
    return out

  def init(self, rng, batch):
    qf = self.qformer
    args = [jnp.zeros((1, 4, qf.encoder_width), jnp.float32), jnp.zeros((1, 4, 2), jnp.int32),
            jnp.ones((1, 4), bool), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)]
    if self.stage == 2:
      args.append(jnp.zeros((1, 4), jnp.int32))
    return self.model.init(rng, *args)["params"]

  def train_iterator(self, process_index: int, process_count: int):
    if self.config.batch_size % process_count:
      raise ConfigError(f"batch_size {self.config.batch_size} is not divisible by "
                        f"{process_count} processes")
    if self.tokenizer is None:
      raise ConfigError("training needs input.tokenizer (a BERT-style tokenizer directory)")
    if self.stage == 2 and self.llm_text is None:
      raise ConfigError("stage-2 training needs model.llm_dir with a tokenizer")
    data = self.data("train")
    elements = _SlideElements(self, data, self._num_patches())
    ds = (grain.MapDataset.range(len(data.slide_ids))
          .shuffle(seed=int(self.config.seed))        # a new permutation every epoch
          .repeat(None)
          .map_with_index(elements)                   # index -> epoch -> patch sample
          [process_index::process_count]
          .batch(self.config.batch_size // process_count, drop_remainder=True))
    return iter(ds.to_iter_dataset())

  # -- loss -----------------------------------------------------------------------------

  def _apply(self, params, rng, train: bool):
    model = self.train_model if train else self.model
    counter = iter(range(1_000))

    def apply(method, *args, **kwargs):
      rngs = {"dropout": jax.random.fold_in(rng, next(counter))} if train else {}
      return model.apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)
    return apply

  def loss(self, params, batch, rng, train: bool = True):
    if self.stage == 2:
      return self._stage2_loss(params, batch, rng, train)
    cfg = self.config.loss
    apply = self._apply(params, rng, train)
    q = lambda name, *a, **kw: apply(PathAlignModel.q, name, *a, **kw)
    feats, coords, pmask = batch["features"], batch["coords"], batch["patch_mask"].astype(bool)
    ids, tmask = batch["text_ids"].astype(jnp.int32), batch["text_mask"].astype(bool)
    kv = q("encode_patches", feats, coords, pmask)            # once per step
    img = q("image_embeds", q("query_pass", kv))              # [B, Q, E]
    txt = q("text_embeds", q("text_pass", ids, tmask))        # [B, E]
    temp = q("temperature")
    same = losses_blip.same_text_mask(ids, tmask)
    sim = losses_blip.itc_similarity(img, txt)
    l_itc, metrics = losses_blip.itc_loss(sim, temp, positive_mask=same,
                                          label_smoothing=float(cfg.label_smoothing))
    metrics = dict(metrics, itc=l_itc, temperature=temp, **collapse_monitors(img, txt))
    total = cfg.w_itc * l_itc
    if cfg.w_itm:
      # 'random': uniform over the admissible slides. Hard negatives (softmax of ITC, as
      # BLIP-2) are slides whose reports differ from the positive by a word or two; a small
      # model trained from scratch first needs easy pairs, or it learns the prior p = 1/3.
      scores = jnp.zeros_like(sim) if cfg.get("itm_negatives", "hard") == "random" else sim / temp
      neg = losses_blip.itm_negatives(scores, jax.random.fold_in(rng, 10_001), positive_mask=same)
      j = neg.image_for_text
      # Negative images: gather their raw features and encode again (see qformer.py).
      kv_neg = q("encode_patches", feats[j], coords[j], pmask[j])
      itm = lambda kv_, i, t: q("itm_logits", q("multimodal_pass", kv_, i, t))
      l_itm, m2 = losses_blip.itm_loss(
          itm(kv, ids, tmask), itm(kv_neg, ids, tmask),
          itm(kv, ids[neg.text_for_image], tmask[neg.text_for_image]), negatives=neg)
      metrics.update(m2, itm=l_itm)
      total = total + cfg.w_itm * l_itm
    if cfg.w_itg:
      dec = ids.at[:, 0].set(self.tokenizer.dec_id if self.tokenizer else 1)
      logits = q("lm_logits", q("multimodal_pass", kv, dec, tmask, causal=True))
      l_itg, m3 = losses_blip.itg_loss(logits, dec, tmask, label_smoothing=float(cfg.label_smoothing))
      metrics.update(m3, itg=l_itg)
      total = total + cfg.w_itg * l_itg
    metrics["loss"] = total
    return total, metrics

  def _stage2_embeds(self, params, apply, batch):
    """[soft tokens; prompt + report embeddings] [B, Q + L, H] and its attention mask."""
    q = lambda name, *a, **kw: apply(PathAlignModel.q, name, *a, **kw)
    kv = q("encode_patches", batch["features"], batch["coords"], batch["patch_mask"].astype(bool))
    soft = apply(PathAlignModel.soft_tokens, kv)              # [B, Q, H]
    table = params["llm"]["embed"]["embedding"]
    tokens = jnp.take(table, batch["llm_ids"].astype(jnp.int32), axis=0).astype(soft.dtype)
    b, nq = soft.shape[:2]
    embeds = jnp.concatenate([soft, tokens], axis=1)
    mask = jnp.concatenate([jnp.ones((b, nq), bool), batch["llm_mask"].astype(bool)], axis=1)
    return embeds, mask, nq

  def _stage2_loss(self, params, batch, rng, train):
    apply = self._apply(params, rng, train)
    embeds, mask, nq = self._stage2_embeds(params, apply, batch)
    logits = apply(PathAlignModel.lm, embeds, mask)           # [B, Q + L, V] float32
    ids = batch["llm_ids"].astype(jnp.int32)
    targets = batch["llm_targets"].astype(bool)
    # Position nq + t - 1 predicts token t of the text (the last soft token predicts token 0).
    loss, acc, count = losses.masked_token_cross_entropy(logits[:, nq - 1:-1], ids, targets)
    return loss, {"loss": loss, "lm": loss, "lm_accuracy": acc, "lm_tokens": count.astype(jnp.int32)}

  # -- frozen LLM and initialisation ---------------------------------------------------

  def frozen_patterns(self) -> tuple[str, ...]:
    return (r"llm/.*",) if self.stage == 2 else ()

  def load_pretrained(self, abstract: dict[str, jax.ShapeDtypeStruct], wanted: set[str]
                      ) -> dict[str, jax.Array]:
    """The LLM from model.llm_dir (every start) and the Q-Former (+ projection) from
    model.init_dir (fresh starts), each streamed into its sharding."""
    from pathjax.models import model_dir
    m = self.config.model
    out: dict[str, jax.Array] = {}

    def tower(directory, name, prefix):
      sub = {p[len(prefix):]: x for p, x in abstract.items() if p.startswith(prefix)}
      only = {p[len(prefix):] for p in wanted if p.startswith(prefix)}
      if not only:
        return
      try:
        placed = model_dir.place_tower(directory, name, sub, only=only)
      except model_dir.ModelDirError as e:
        raise ConfigError(f"{directory} {name} tower: {e}") from None
      out.update({prefix + k: v for k, v in placed.items()})

    if self.stage == 2 and m.llm_dir:
      tower(m.llm_dir, "llm", "llm/")
    if m.init_dir:
      tower(m.init_dir, "qformer", "qformer/")
      if self.stage == 2 and "proj/kernel" in wanted:
        reader = model_dir.params_reader(m.init_dir)
        if "qformer/projection" in list(reader):
          want = abstract["proj/kernel"]
          if tuple(reader.shape("qformer/projection")) == tuple(want.shape):
            out["proj/kernel"] = jax.device_put(np.asarray(reader.get("qformer/projection"),
                                                           want.dtype), want.sharding)
    return out

  # -- using a trained model ------------------------------------------------------------

  def predict_fns(self, params) -> dict[str, Callable[..., Any]]:
    model = self.model
    q = lambda name, *a, **kw: model.apply({"params": params}, name, *a,
                                           method=PathAlignModel.q, **kw)

    def slide(features, coords, mask, pooled=False):
      """Unit-norm query embeddings [B, Q, E] (or their normalised mean with pooled=True)."""
      img = q("image_embeds", q("query_pass", q("encode_patches", features, coords, mask)))
      return l2_normalize(jnp.mean(img, axis=1)) if pooled else img

    def text(ids, mask=None):
      ids = jnp.asarray(ids, jnp.int32)
      mask = ids != (self.tokenizer.pad_id if self.tokenizer else 0) if mask is None else mask
      return q("text_embeds", q("text_pass", ids, mask))

    def itm(features, coords, mask, ids, text_mask):
      """Match probability [B] of slide b with text b."""
      kv = q("encode_patches", features, coords, mask)
      logits = q("itm_logits", q("multimodal_pass", kv, jnp.asarray(ids, jnp.int32), text_mask))
      return jax.nn.softmax(logits, axis=-1)[:, 1]

    def visual_tokens(features, coords, mask):
      """Q-Former query outputs [B, Q, width] (float32) and an all-true mask [B, Q]: the
      visual tokens an instruction LLM reads (pathjax.recipes.slide_instruct)."""
      out = q("query_pass", q("encode_patches", features, coords, mask)).astype(jnp.float32)
      return out, jnp.ones(out.shape[:2], bool)

    fns = {"slide": slide, "text": text, "itm": itm, "visual_tokens": visual_tokens}
    if self.stage == 2:
      fns["generate"] = lambda *a, **kw: self.generate(params, *a, **kw)
    return fns

  def generate(self, params, features, coords, mask, *, max_new_tokens: int = 64,
               num_beams: int = 1) -> list[str]:
    """Reports for a batch of slides: Q-Former soft tokens, then the prompt, through the
    frozen LLM (pathjax.generate: greedy, or beam search with num_beams > 1)."""
    from pathjax.generate import Generator
    if self.llm_text is None:
      raise ConfigError("generation needs model.llm_dir with a tokenizer")
    gen = self.__dict__.get("_generator")
    if gen is None or gen.params is not params["llm"]:
      gen = self._generator = Generator(_llm(self), params["llm"], eos_ids=[self.llm_text.eos_id],
                                        pad_id=self.llm_text.pad_id)
    soft_fn = self.__dict__.get("_soft_fn")
    if soft_fn is None:
      def soft(p, f, c, m):
        kv = self.model.apply({"params": p}, "encode_patches", f, c, m, method=PathAlignModel.q)
        return self.model.apply({"params": p}, kv, method=PathAlignModel.soft_tokens)
      soft_fn = self._soft_fn = jax.jit(soft)
    prefix = soft_fn(params, jnp.asarray(features), jnp.asarray(coords), jnp.asarray(mask).astype(bool))
    prompts = [list(self.llm_text.prompt_ids)] * int(prefix.shape[0])
    out = gen.generate(prompts, prefix=np.asarray(prefix), max_new_tokens=max_new_tokens,
                       num_beams=num_beams)
    return [self.llm_text.decode(o) for o in out]

  def export(self, params) -> dict[str, Any]:
    """The Q-Former tower (stage 2: with `proj` as its projection), its tokenizer and, for
    stage 2, the LLM's directory and prompt in model.json (the LLM itself is not copied)."""
    qf = {k: v for k, v in self.qformer_fields.items() if k != "deterministic"}
    proj = None
    if self.stage == 2:
      proj = np.asarray(jax.device_get(params["proj"]["kernel"]))
    extra = {"pathalign": {"stage": self.stage, "llm_dir": self.config.model.llm_dir,
                           "prompt": self.config.model.prompt,
                           "text_len": int(self.config.input.text_len)}}
    return {"towers": {"qformer": dict(kind="qformer", module=QFormer(**qf),
                                       params=params["qformer"], projection=proj)},
            "tokenizer_dir": self.config.input.tokenizer or None, "extra_meta": extra}


def _llm(recipe: PathAlignRecipe):
  from pathjax.models.llm import LLM
  return LLM(**recipe.llm_fields, dtype=recipe.compute_dtype, param_dtype=recipe.param_dtype)


def make_recipe(config, mesh=None) -> PathAlignRecipe:
  return PathAlignRecipe(config, mesh)
