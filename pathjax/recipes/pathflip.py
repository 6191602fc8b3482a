"""PathFLIP alignment (specs/pathflip.md): slide and region embeddings from one shared
Q-Former, aligned with the slide caption (L_slide) and with subcaptions through
text-conditioned region embeddings (L_region).

Data: as PathAlign (`pathjax.recipes.pathalign.load_pairs`): a finished `pathjax
embed-slides` directory (`data.embeddings`) and a report file (`data.reports`), a
train / held-out split by hash or `data.heldout_pattern`, Grain over the training slides
(shuffled per epoch, split by process, resumable). Per slide and step:

- L regions of S patches (`model.regions` = "window": S consecutive patches in stored order,
  the paper; "grid": square sqrt(S) x sqrt(S) blocks of the patch grid), L distinct regions
  drawn at random, duplicated at random when a slide has fewer (pathjax.input.regions; the
  last partial window is kept and masked). Drawn per (seed, slide, epoch).
- The slide's patches: all of them when it has at most `data.max_patches` (M), else the
  union of the drawn regions' patches (M >= L * S is required). The slide pass attends to
  these; `region_index` [L, S] points into them.
- K subcaptions (pathjax.input.subcaptions.SubcaptionSampler, or `data.subcaptions`, a
  precomputed JSON-lines file that overrides sampling) and the caption.

Model (`PathFLIPModel`): the Q-Former (pathjax.models.qformer; `vision_width` is the patch
projection Linear(D -> 256)) computes the cross-attention K/V of a slide's patches once.
Slide pass: the queries attend to all patches -> mean over queries -> vision_proj = v.
Region pass: the same Q-Former, one batched call over [B * L] regions whose K/V are the
slide's K/V gathered by region index with the key mask restricted to the region (so it
equals the slide pass with the patch mask restricted to that region: tested) -> r_l. The
context encoder mixes [v; r_1..r_L]; its first output is the slide embedding (L_slide,
"slide") and the rest are the contextualised regions R. Text: the Q-Former's text pass,
[CLS] -> text_proj. RegionHead(subcaption embeddings, R) -> text-conditioned embeddings.
L = w_slide L_slide + w_region L_region (pathjax.losses_pathflip).

At inference the regions are formed deterministically on device from the inputs
(`device_regions`): every window of the M patches ("window"), or the ceil(M / S) blocks
with the most patches ("grid"; pass num_regions for more).

Batch (host arrays; B = this host's share of the global batch):
    features [B, M, D], coords [B, M, 2] int32 grid, patch_mask [B, M],
    region_index [B, L, S] int32, region_mask [B, L, S],
    text_ids [B, T], text_mask [B, T] (the caption), sub_ids [B, K, Ts], sub_mask [B, K, Ts],
    slide_index [B] int32.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from pathjax import losses_pathflip
from pathjax.config_lib import ConfigError
from pathjax.input import regions as regions_lib
from pathjax.input.subcaptions import SubcaptionSampler, load_subcaptions, slide_rng
from pathjax.losses import l2_normalize
from pathjax.models.heads import spread, unrelated_cosine
from pathjax.models.pathflip import PathFLIPHeads
from pathjax.models.qformer import PatchKV, QFormer
from pathjax.recipes.pathalign import (ReportTokenizer, SlideElements, SlideReportData, _dtype,
                                      _short, load_pairs)

log = logging.getLogger("pathjax.pathflip")


# ------------------------------------------------------------------------------ regions


def region_kv(kv: PatchKV, index: jax.Array, mask: jax.Array) -> PatchKV:
  """The K/V of every region as a batch of [B * L] "slides" of S patches each: the slide's
  K/V gathered by region index [B, L, S], the key mask restricted to the region's real
  patches (mask [B, L, S] and the slide's patch mask)."""
  b, l, s = index.shape
  flat = jnp.asarray(index, jnp.int32).reshape(b, l * s)

  def take(a):
    idx = flat.reshape(flat.shape + (1,) * (a.ndim - 2))
    out = jnp.take_along_axis(a, idx, axis=1)
    return out.reshape((b * l, s) + a.shape[2:])
  pairs = tuple((take(k), take(v)) for k, v in kv["kv"])
  m = take(kv["mask"]) & jnp.asarray(mask).astype(bool).reshape(b * l, s)
  return {"kv": pairs, "mask": m}


def _window_regions(mask: jax.Array, size: int, count: int) -> tuple[jax.Array, jax.Array]:
  m = mask.shape[-1]
  slots = jnp.arange(count * size)
  index = jnp.where(slots < m, slots, 0).reshape(count, size)
  real = jnp.where(slots < m, jnp.take(mask, jnp.minimum(slots, m - 1), axis=-1), False)
  return index.astype(jnp.int32), real.reshape(mask.shape[:-1] + (count, size))


def _grid_regions_one(coords: jax.Array, mask: jax.Array, side: int, count: int):
  """One slide's blocks (as regions.grid_regions, raster order) keeping the `count` blocks
  with the most patches (ties: raster order). coords [M, 2] (col, row), mask [M]."""
  m = coords.shape[0]
  size = side * side
  coords = coords.astype(jnp.int32)
  bx, by = coords[:, 0] // side, coords[:, 1] // side
  width = jnp.max(jnp.where(mask, bx, 0)) + 1
  key = jnp.where(mask, by * width + bx, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, stable=True)
  sk = key[order]
  seg = jnp.cumsum(jnp.concatenate([jnp.ones((1,), jnp.int32),
                                    (sk[1:] != sk[:-1]).astype(jnp.int32)])) - 1
  real = mask[order]
  counts = jax.ops.segment_sum(real.astype(jnp.int32), seg, num_segments=m)
  k = min(count, m)
  _, chosen = jax.lax.top_k(counts * (m + 1) - jnp.arange(m), k)
  chosen = jnp.sort(chosen)
  rank = jnp.full((m,), count, jnp.int32).at[chosen].set(
      jnp.where(counts[chosen] > 0, jnp.arange(k, dtype=jnp.int32), count))
  row = jnp.where(real, rank[seg], count)
  slot = (coords[order, 1] % side) * side + coords[order, 0] % side
  index = jnp.zeros((count, size), jnp.int32).at[row, slot].set(order.astype(jnp.int32), mode="drop")
  rmask = jnp.zeros((count, size), bool).at[row, slot].set(True, mode="drop")
  return index, rmask


def device_regions(coords: jax.Array, mask: jax.Array, method: str, size: int,
                   num_regions: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Deterministic regions of a batch, jittable: coords [B, M, 2] grid, mask [B, M] ->
  (index [B, R, S] int32, region mask [B, R, S]). "window": the R = ceil(M / S) windows of
  S consecutive slots (padding slots masked); "grid": the R blocks with the most patches
  (default R = ceil(M / S))."""
  b, m = mask.shape
  count = int(num_regions or -(-m // size))
  mask = jnp.asarray(mask).astype(bool)
  if method == "window":
    index, real = _window_regions(mask, size, count)
    return jnp.broadcast_to(index, (b, count, size)), real
  if method == "grid":
    side = math.isqrt(size)
    if side * side != size:
      raise ValueError(f"grid regions need a square region size, got {size}")
    return jax.vmap(lambda c, k: _grid_regions_one(c, k, side, count))(jnp.asarray(coords), mask)
  raise ValueError(f"unknown region method {method!r}; valid: {', '.join(regions_lib.METHODS)}")


def slide_example(features: np.ndarray, grid: np.ndarray, *, method: str, size: int,
                  num_regions: int, m: int, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
  """One training slide: L regions drawn from the whole slide, the patches the slide pass
  sees (all when at most m, else the drawn regions' union) padded to m, and region_index
  pointing into them."""
  n = len(features)
  r = regions_lib.make_regions(method, size, num_patches=n, grid=grid, num_regions=num_regions,
                               rng=rng)
  keep = np.arange(n) if n <= m else np.unique(r.index[r.mask])
  if len(keep) > m:
    raise ConfigError(f"data.max_patches={m} is smaller than the {len(keep)} patches of "
                      f"{num_regions} regions of {size}; set it >= model.num_regions * model.region_size")
  pos = np.zeros(n, np.int32)
  pos[keep] = np.arange(len(keep), dtype=np.int32)
  out_f = np.zeros((m, features.shape[-1]), dtype)
  out_f[:len(keep)] = features[keep]
  out_c = np.zeros((m, 2), np.int32)
  out_c[:len(keep)] = grid[keep]
  pmask = np.zeros((m,), bool)
  pmask[:len(keep)] = True
  return {"features": out_f, "coords": out_c, "patch_mask": pmask,
          "region_index": np.where(r.mask, pos[r.index], 0).astype(np.int32),
          "region_mask": r.mask.copy()}


# -------------------------------------------------------------------------------- model


class PathFLIPModel(nn.Module):
  """The shared Q-Former (`qformer`) and the PathFLIP heads (`heads`).

  Regions arrive as index / mask arrays [B, L, S] into the slide's patches, formed outside
  the module by `config.model.regions`: "window" = S consecutive patches in stored order
  (the paper), "grid" = sqrt(S) x sqrt(S) blocks of the patch grid (pathjax.input.regions
  when training, `device_regions` at inference). The module itself does not care which."""
  qformer_cfg: dict
  heads_cfg: dict
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.qformer = QFormer(**self.qformer_cfg, **kw)
    self.heads = PathFLIPHeads(**self.heads_cfg, **kw)

  def encode_patches(self, features, coords, mask) -> PatchKV:
    return self.qformer.encode_patches(features, coords, mask)

  def _pool(self, query_out: jax.Array) -> jax.Array:
    """Mean over queries -> Linear(width -> E) (float32)."""
    return self.qformer.vision_proj(jnp.mean(query_out, axis=1)).astype(jnp.float32)

  def slide_vector(self, kv: PatchKV) -> jax.Array:
    """v [B, E]: the slide pass (queries attend to every patch)."""
    return self._pool(self.qformer.query_pass(kv))

  def region_query_out(self, kv: PatchKV, index, mask) -> jax.Array:
    """Query outputs [B * L, Q, W] of the region pass (one batched call)."""
    return self.qformer.query_pass(region_kv(kv, index, mask))

  def region_vectors(self, kv: PatchKV, index, mask) -> jax.Array:
    """r [B, L, E]: the region pass."""
    b, l = index.shape[:2]
    return self._pool(self.region_query_out(kv, index, mask)).reshape(b, l, -1)

  def tokens(self, features, coords, mask, index, region_mask):
    """Contextualised [global; regions] [B, 1 + L, E] and their mask [B, 1 + L]."""
    kv = self.encode_patches(features, coords, mask)
    v = self.slide_vector(kv)
    r = self.region_vectors(kv, index, region_mask)
    token_mask = jnp.concatenate([jnp.ones((v.shape[0], 1), bool),
                                  jnp.any(jnp.asarray(region_mask).astype(bool), axis=-1)], axis=1)
    x = self.heads.context(jnp.concatenate([v[:, None], r], axis=1), token_mask)
    return x.astype(jnp.float32), token_mask

  def text_vectors(self, ids, mask) -> jax.Array:
    """[CLS] of the Q-Former's text pass -> text_proj: [N, E] (float32, not normalised)."""
    return self.qformer.text_proj(self.qformer.text_pass(ids, mask)[:, 0]).astype(jnp.float32)

  def condition(self, texts, regions, region_valid):
    v, w = self.heads.region_head(texts, regions, region_valid)
    return v.astype(jnp.float32), w

  def scale_and_bias(self):
    return self.heads.scale_and_bias()

  def train_outputs(self, batch: dict, neg_index: jax.Array) -> dict[str, jax.Array]:
    """Everything the loss needs for one global batch."""
    x, token_mask = self.tokens(batch["features"], batch["coords"], batch["patch_mask"],
                                batch["region_index"], batch["region_mask"])
    caption = self.text_vectors(batch["text_ids"], batch["text_mask"])
    b, k, ts = batch["sub_ids"].shape
    t_own = self.text_vectors(batch["sub_ids"].reshape(b * k, ts),
                              batch["sub_mask"].reshape(b * k, ts)).reshape(b, k, -1)
    t_neg = jnp.take_along_axis(t_own, neg_index[:, None, None], axis=1)[:, 0]
    v, w = self.condition(losses_pathflip.region_texts(t_own, t_neg), x[:, 1:], token_mask[:, 1:])
    s, beta = self.scale_and_bias()
    return {"global": x[:, 0], "caption": caption, "t_own": t_own, "t_neg": t_neg,
            "v_own": v[:, :k], "v_neg": v[:, k:], "scale": s, "bias": beta, "region_weights": w,
            "regions": x[:, 1:], "region_valid": token_mask[:, 1:]}

  def __call__(self, features, coords, patch_mask, index, region_mask, ids, text_mask):
    """Every parameter once (initialisation): the Q-Former's own heads too, so its tower
    is a complete `qformer` model-directory tower (the unused ITM/LM heads stay frozen)."""
    self.qformer(features, coords, patch_mask, ids, text_mask)
    x, token_mask = self.tokens(features, coords, patch_mask, index, region_mask)
    t = self.text_vectors(ids, text_mask)
    return self.condition(t[:, None], x[:, 1:], token_mask[:, 1:])


def make_predict_fns(model: PathFLIPModel, params, *, region_method: str, region_size: int,
                     pad_id: int = 0) -> dict[str, Callable[..., Any]]:
  """The predict functions of a PathFLIP model (recipe.predict_fns and loaded model
  directories share them). Only builds closures; all are jittable (num_regions static)."""
  call = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, **kw)

  def regions(coords, mask, num_regions=None):
    return device_regions(coords, mask, region_method, region_size, num_regions)

  def tokens(features, coords, mask, num_regions=None):
    mask = jnp.asarray(mask).astype(bool)
    index, rmask = regions(coords, mask, num_regions)
    return call(PathFLIPModel.tokens, features, coords, mask, index, rmask)

  def slide(features, coords, mask, num_regions=None):
    """Unit-norm slide embeddings [B, E] (the context encoder's global token)."""
    return l2_normalize(tokens(features, coords, mask, num_regions)[0][:, 0])

  def text(ids, mask=None):
    """Unit-norm text embeddings [N, E]."""
    ids = jnp.asarray(ids, jnp.int32)
    mask = ids != pad_id if mask is None else jnp.asarray(mask).astype(bool)
    return l2_normalize(call(PathFLIPModel.text_vectors, ids, mask))

  def visual_tokens(features, coords, mask, num_regions=None):
    """[global; contextualised regions] [B, 1 + L, E] float32 and their mask [B, 1 + L]."""
    return tokens(features, coords, mask, num_regions)

  def region_attention(features, coords, mask, ids, text_mask=None, num_regions=None):
    """For localization, texts ids [T, len] shared by the batch: {"region_weights" [B, T, L]
    (region head, averaged over heads), "patch_weights" [B, L, S] (within-region query ->
    patch cross-attention, averaged over cross-attention layers, heads and queries, scaled
    to mean 1 over the region's real patches),
    "region_index" / "region_mask" [B, L, S] (into the M patches)}. The map of text t is
    sum_l region_weights[t, l] * patch_weights[l, s] painted at patch region_index[l, s]
    (pathjax.evaluate.localization.patch_scores)."""
    mask = jnp.asarray(mask).astype(bool)
    index, rmask = regions(coords, mask, num_regions)
    x, token_mask = call(PathFLIPModel.tokens, features, coords, mask, index, rmask)
    ids = jnp.asarray(ids, jnp.int32)
    text_mask = ids != pad_id if text_mask is None else jnp.asarray(text_mask).astype(bool)
    t = call(PathFLIPModel.text_vectors, ids, text_mask)
    b = x.shape[0]
    texts = jnp.broadcast_to(t[None], (b,) + t.shape)
    _, w = call(PathFLIPModel.condition, texts, x[:, 1:], token_mask[:, 1:])
    kv = call(PathFLIPModel.encode_patches, features, coords, mask)
    _, state = model.apply({"params": params}, kv, index, rmask, method=PathFLIPModel.region_query_out,
                           mutable=["intermediates"])
    maps = jax.tree.leaves(state["intermediates"])                  # per cross layer [B*L, H, Q, S]
    pw = jnp.mean(jnp.stack([jnp.mean(a, axis=(1, 2)) for a in maps]), axis=0)
    pw = jnp.where(rmask.reshape(pw.shape), pw, 0.0).reshape(rmask.shape)
    # Mean 1 over each region's real patches: a patch shows its region's weight, modulated by
    # the attention within the region (a sum-to-1 normalisation would make regions with few
    # patches, at tissue edges, look hot whatever the text).
    pw = pw * jnp.sum(rmask, axis=-1, keepdims=True)
    return {"region_weights": w, "patch_weights": pw, "region_index": index, "region_mask": rmask}

  return {"slide": slide, "text": text, "visual_tokens": visual_tokens,
          "region_attention": region_attention}



def region_attention_focus(weights: jax.Array, valid: jax.Array) -> jax.Array:
  """1 - entropy / log(real regions) of region weights [B, T, L] (valid [B, L]), averaged:
  0 when a text's attention is uniform over the slide's regions (the region head does not
  look, so its maps cannot localize), 1 when it picks one region."""
  valid = jnp.asarray(valid).astype(bool)[:, None, :]
  w = jnp.where(valid, weights.astype(jnp.float32), 0.0)
  ent = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.maximum(w, 1e-30)), 0.0), axis=-1)
  n = jnp.sum(valid, axis=-1).astype(jnp.float32)
  focus = jnp.where(n > 1, 1.0 - ent / jnp.log(jnp.maximum(n, 2.0)), 0.0)
  return jax.lax.stop_gradient(jnp.mean(focus))


def collapse_monitors(out: dict) -> dict[str, jax.Array]:
  """Monitors of PathFLIP alignment (printed by the demo): spreads of the slide, caption,
  region and subcaption embeddings (~1 healthy, 0 collapsed), the cosine of a slide with
  other slides' captions (~0 healthy, 1 collapsed), and the region attention's focus."""
  own = out["own_mask"]
  return {"monitor_slide_spread": spread(out["global"]),
          "monitor_caption_spread": spread(out["caption"]),
          "monitor_region_spread": spread(out["regions"], out["region_valid"]),
          "monitor_subcaption_spread": spread(out["t_own"], own),
          "monitor_slide_unrelated_cos": unrelated_cosine(out["global"][:, None],
                                                          out["caption"][:, None]),
          "monitor_region_attention_focus": region_attention_focus(out["region_weights"],
                                                                   out["region_valid"])}

# ------------------------------------------------------------------------------- recipe


class _SlideElements(SlideElements):
  """PathFLIP: L regions drawn per slide and epoch, the report and K subcaptions."""

  def __init__(self, recipe: "PathFLIPRecipe", data: SlideReportData, m: int):
    super().__init__(recipe, data, m)
    mc = recipe.config.model
    self.method, self.size, self.num_regions = mc.regions, int(mc.region_size), int(mc.num_regions)
    self.sub_tokenizer, self.sampler = recipe.sub_tokenizer, recipe.sampler

  def __call__(self, index: int, position: int) -> dict[str, np.ndarray]:
    sid, sf, epoch = self.slide(index, position)
    out = slide_example(sf.features, sf.grid, method=self.method, size=self.size,
                        num_regions=self.num_regions, m=self.m,
                        rng=slide_rng(self.seed, sid, epoch, stream=1), dtype=self.dtype)
    sub_ids, sub_mask = self.sub_tokenizer(self.sampler(sid, self.texts[position], epoch))
    out.update(self.report(position), sub_ids=sub_ids, sub_mask=sub_mask)
    return out


class PathFLIPRecipe:
  """The trainer's view of PathFLIP alignment (pathjax.recipes.base.Recipe)."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = mesh
    m = config.model
    if m.regions not in regions_lib.METHODS:
      raise ConfigError(f"model.regions={m.regions!r}; valid: {', '.join(regions_lib.METHODS)}")
    if m.regions == "grid" and math.isqrt(int(m.region_size)) ** 2 != int(m.region_size):
      raise ConfigError(f"model.regions=grid needs a square model.region_size (e.g. 256 = 16 x 16), "
                        f"got {m.region_size}")
    if int(config.data.max_patches) < int(m.num_regions) * int(m.region_size):
      raise ConfigError(f"data.max_patches={config.data.max_patches} < model.num_regions * "
                        f"model.region_size = {int(m.num_regions) * int(m.region_size)}: the "
                        "slide pass must see every patch of the drawn regions")
    self.compute_dtype = _dtype(config.precision.compute_dtype)
    self.param_dtype = _dtype(config.precision.param_dtype)
    qf = dict(m.qformer.to_dict())
    self.tokenizer = self.sub_tokenizer = None
    if config.input.tokenizer:
      self.tokenizer = ReportTokenizer(config.input.tokenizer, int(config.input.text_len))
      self.sub_tokenizer = ReportTokenizer(config.input.tokenizer, int(config.input.subcaption_len))
      if not qf.get("vocab_size"):
        qf["vocab_size"] = self.tokenizer.vocab_size
      elif qf["vocab_size"] < self.tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer in {config.input.tokenizer} has {self.tokenizer.vocab_size} "
                          f"tokens, more than model.qformer.vocab_size={qf['vocab_size']}")
    elif not qf.get("vocab_size"):
      raise ConfigError("model.qformer.vocab_size is 0 (take it from the tokenizer) but "
                        "input.tokenizer is empty: set --config.input.tokenizer=DIR")
    if m.init_dir:  # a Q-Former to start from (convert --bert, PathAlign stage 1)
      from pathjax.models import model_dir
      meta = model_dir.read_for_config("model.init_dir", m.init_dir, "qformer")
      stored = dict(meta["towers"]["qformer"]["config"])
      keep = {k: qf[k] for k in ("dropout_rate", "attention_dropout_rate", "deterministic") if k in qf}
      qf = {**stored, **keep}
    if int(qf.get("embed_dim", 0)) != int(m.heads.width):
      raise ConfigError(f"model.heads.width={m.heads.width} must equal the Q-Former's embed_dim "
                        f"({qf.get('embed_dim')}): the context layer works in that space")
    for name, n in (("input.text_len", config.input.text_len),
                    ("input.subcaption_len", config.input.subcaption_len)):
      if int(n) > int(qf.get("max_position", 512)):
        raise ConfigError(f"{name}={n} exceeds the Q-Former's {qf.get('max_position')} positions")
    self.qformer_fields = qf
    self.heads_fields = dict(m.heads.to_dict())
    precomputed = load_subcaptions(config.data.subcaptions) if config.data.subcaptions else None
    self.sampler = SubcaptionSampler(int(m.num_subcaptions), int(config.seed),
                                     p_consecutive=float(config.data.p_consecutive),
                                     precomputed=precomputed)
    self.model = self._model(deterministic=True)
    dropout = (qf.get("dropout_rate") or qf.get("attention_dropout_rate")
               or self.heads_fields.get("dropout_rate"))
    self.train_model = self._model(deterministic=not dropout)

  def _model(self, deterministic: bool) -> PathFLIPModel:
    return PathFLIPModel(qformer_cfg={**self.qformer_fields, "deterministic": deterministic},
                         heads_cfg={**self.heads_fields, "deterministic": deterministic},
                         dtype=self.compute_dtype, param_dtype=self.param_dtype)

  # -- data -----------------------------------------------------------------------------

  def data(self, split: str = "train") -> SlideReportData:
    cache = self.__dict__.setdefault("_data", {})
    if split not in cache:
      cache[split] = load_pairs(self.config.data, self.qformer_fields["encoder_width"], split)
      log.info("pathflip %s data: %s", split, _short(cache[split].summary))
    return cache[split]

  def _num_patches(self) -> int:
    """M: min(max_patches, the longest training slide) -- or max_patches without data --
    and at least L * S slots' worth of the drawn regions."""
    if getattr(self, "_m", None) is None:
      self._m = int(self.config.data.max_patches)
      if self.config.data.embeddings and self.config.data.reports:
        self._m = max(1, min(self._m, max(self.data("train").patches)))
    return self._m

  def example_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    c, mc = self.config, self.config.model
    b, m = global_batch_size, self._num_patches()
    l, s, k = int(mc.num_regions), int(mc.region_size), int(mc.num_subcaptions)
    t, ts = int(c.input.text_len), int(c.input.subcaption_len)
    d = int(self.qformer_fields["encoder_width"])
    sds = jax.ShapeDtypeStruct
    return {"features": sds((b, m, d), np.dtype(c.data.feature_dtype)),
            "coords": sds((b, m, 2), jnp.int32), "patch_mask": sds((b, m), jnp.bool_),
            "region_index": sds((b, l, s), jnp.int32), "region_mask": sds((b, l, s), jnp.bool_),
            "text_ids": sds((b, t), jnp.int32), "text_mask": sds((b, t), jnp.bool_),
            "sub_ids": sds((b, k, ts), jnp.int32), "sub_mask": sds((b, k, ts), jnp.bool_),
            "slide_index": sds((b,), jnp.int32)}

  def init(self, rng, batch):
    d = int(self.qformer_fields["encoder_width"])
    args = (jnp.zeros((1, 4, d), jnp.float32), jnp.zeros((1, 4, 2), jnp.int32), jnp.ones((1, 4), bool),
            jnp.zeros((1, 2, 2), jnp.int32), jnp.ones((1, 2, 2), bool),
            jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
    return self.model.init(rng, *args)["params"]

  def train_iterator(self, process_index: int, process_count: int):
    if self.config.batch_size % process_count:
      raise ConfigError(f"batch_size {self.config.batch_size} is not divisible by "
                        f"{process_count} processes")
    if self.tokenizer is None:
      raise ConfigError("training needs input.tokenizer (a BERT-style tokenizer directory)")
    data = self.data("train")
    elements = _SlideElements(self, data, self._num_patches())
    ds = (grain.MapDataset.range(len(data.slide_ids))
          .shuffle(seed=int(self.config.seed))        # a new permutation every epoch
          .repeat(None)
          .map_with_index(elements)                   # index -> epoch -> regions, subcaptions
          [process_index::process_count]
          .batch(self.config.batch_size // process_count, drop_remainder=True))
    return iter(ds.to_iter_dataset())

  # -- loss -----------------------------------------------------------------------------

  def outputs(self, params, batch, rng, train: bool = True) -> dict[str, jax.Array]:
    """The model's outputs for a batch (the loss's inputs; tests compare them)."""
    own_mask = jnp.any(jnp.asarray(batch["sub_mask"]).astype(bool), axis=-1)
    neg = losses_pathflip.pick_negative_subcaptions(jax.random.fold_in(rng, 1), own_mask)
    model = self.train_model if train else self.model
    rngs = {"dropout": jax.random.fold_in(rng, 0)} if train else {}
    batch = dict(batch)
    for key in ("patch_mask", "region_mask", "text_mask", "sub_mask"):
      batch[key] = jnp.asarray(batch[key]).astype(bool)
    for key in ("text_ids", "sub_ids", "region_index"):
      batch[key] = jnp.asarray(batch[key]).astype(jnp.int32)
    out = model.apply({"params": params}, batch, neg, method=PathFLIPModel.train_outputs, rngs=rngs)
    out["own_mask"], out["neg_index"] = own_mask, neg
    out["same_text"] = losses_pathflip.same_subcaption_text(batch["sub_ids"], batch["sub_mask"], neg)
    return out

  def loss(self, params, batch, rng, train: bool = True):
    cfg = self.config.loss
    out = self.outputs(params, batch, rng, train)
    l_slide = losses_pathflip.slide_infonce(out["global"], out["caption"],
                                            temperature=float(cfg.temperature),
                                            label_smoothing=float(cfg.label_smoothing))
    l_region, metrics = losses_pathflip.region_sigmoid_loss(
        out["v_own"], out["t_own"], out["v_neg"], out["t_neg"], out["scale"], out["bias"],
        own_mask=out["own_mask"], not_negative=out["same_text"])
    total = float(cfg.w_slide) * l_slide + float(cfg.w_region) * l_region
    metrics = dict(metrics, loss=total, slide=l_slide, region=l_region,
                   region_scale=out["scale"], region_bias=out["bias"], **collapse_monitors(out))
    b = out["same_text"].shape[0]
    # Share of (anchor, other slide) pairs whose negative text is one of the anchor's own.
    metrics["region_same_text"] = jnp.sum(out["same_text"] & ~jnp.eye(b, dtype=bool)) / max(b * (b - 1), 1)
    return total, metrics

  def frozen_patterns(self) -> tuple[str, ...]:
    """The Q-Former's ITM / LM heads and ITC temperature: kept so the tower is a complete
    Q-Former, unused by PathFLIP."""
    return (r"qformer/itm_head/.*", r"qformer/lm_head/.*", r"qformer/temp")

  def load_pretrained(self, abstract: dict[str, jax.ShapeDtypeStruct], wanted: set[str]
                      ) -> dict[str, jax.Array]:
    """The Q-Former from model.init_dir (PathAlign stage 1, convert --bert), when set."""
    from pathjax.models import model_dir
    init_dir = self.config.model.init_dir
    if not init_dir:
      return {}
    sub = {p[len("qformer/"):]: x for p, x in abstract.items() if p.startswith("qformer/")}
    only = {p[len("qformer/"):] for p in wanted if p.startswith("qformer/")}
    if not only:
      return {}
    try:
      placed = model_dir.place_tower(init_dir, "qformer", sub, only=only)
    except model_dir.ModelDirError as e:
      raise ConfigError(f"{init_dir} qformer tower: {e}") from None
    return {"qformer/" + k: v for k, v in placed.items()}

  # -- using a trained model ------------------------------------------------------------

  def predict_fns(self, params) -> dict[str, Callable[..., Any]]:
    return make_predict_fns(self.model, params, region_method=self.config.model.regions,
                            region_size=int(self.config.model.region_size),
                            pad_id=self.tokenizer.pad_id if self.tokenizer else 0)

  def export(self, params) -> dict[str, Any]:
    """Towers "qformer" (kind qformer) and "heads" (kind pathflip_heads), named as the
    parameter groups they hold (a frozen encoder of slide_instruct maps towers to groups by
    name), the tokenizer, and the region layout in model.json["pathflip"] (what `load_model`
    needs)."""
    qf = {k: v for k, v in self.qformer_fields.items() if k != "deterministic"}
    heads = {k: v for k, v in self.heads_fields.items() if k != "deterministic"}
    mc, c = self.config.model, self.config
    extra = {"pathflip": {"embeddings": c.data.embeddings, "regions": mc.regions, "region_size": int(mc.region_size),
                          "num_regions": int(mc.num_regions), "max_patches": int(c.data.max_patches),
                          "text_len": int(c.input.text_len),
                          "subcaption_len": int(c.input.subcaption_len)}}
    return {"towers": {"qformer": dict(kind="qformer", module=QFormer(**qf), params=params["qformer"],
                                       projection=None),
                       "heads": dict(kind="pathflip_heads", module=PathFLIPHeads(**heads),
                                        params=params["heads"], projection=None)},
            "tokenizer_dir": c.input.tokenizer or None, "extra_meta": extra}


def make_recipe(config, mesh=None) -> PathFLIPRecipe:
  return PathFLIPRecipe(config, mesh)


# ------------------------------------------------------------------------ model directories


class LoadedPathFLIP:
  """A PathFLIP model directory (the trainer's export): model, params, tokenizer, layout and
  the predict functions (jitted per input shape)."""

  def __init__(self, path: str):
    from pathjax.models import model_dir
    meta = model_dir.read_model_json(path)
    towers = meta["towers"]
    if "qformer" not in towers or "heads" not in towers or "pathflip" not in meta:
      raise model_dir.ModelDirError(f"{path} is not a PathFLIP model directory (needs qformer and "
                                    "heads towers; export one with configs/pathflip.py and "
                                    "--config.export_model=True)")
    loaded = model_dir.load_model_dir(path)
    self.path, self.meta, self.layout = path, meta, dict(meta["pathflip"])
    self.model = PathFLIPModel(qformer_cfg=dict(towers["qformer"]["config"]),
                               heads_cfg=dict(towers["heads"]["config"]))
    self.params = {"qformer": loaded.towers["qformer"].params,
                   "heads": loaded.towers["heads"].params}
    self.encoder_width = int(towers["qformer"]["config"]["encoder_width"])
    tok = meta.get("tokenizer")
    if not tok:
      raise model_dir.ModelDirError(f"{path} has no tokenizer; PathFLIP needs its text tokenizer")
    self.tokenizer = ReportTokenizer(os.path.join(path, tok), int(self.layout["subcaption_len"]))
    self.fns = make_predict_fns(self.model, self.params, region_method=self.layout["regions"],
                                region_size=int(self.layout["region_size"]),
                                pad_id=self.tokenizer.pad_id)
    self.region_attention = jax.jit(self.fns["region_attention"], static_argnums=(5,))

  def heatmaps(self, features: np.ndarray, grid: np.ndarray, texts: list[str],
               shifts: bool = True) -> np.ndarray:
    """Per-patch maps [T, N] of `texts` over one slide (slide_heatmaps)."""
    ids, mask = self.tokenizer(texts)
    return slide_heatmaps(self.region_attention, np.asarray(features, np.float32), grid, ids, mask,
                          method=self.layout["regions"], size=int(self.layout["region_size"]),
                          shifts=shifts)


def load_model(path: str) -> LoadedPathFLIP:
  return LoadedPathFLIP(path)


# ------------------------------------------------------------------------------- heatmaps


def localization_layout(grid: np.ndarray, method: str, size: int) -> tuple[int, int]:
  """(M slots, R regions) that cover every patch of a slide with grid [N, 2], bucketed to
  powers of two of the region count so slides of similar size share one compiled program."""
  n = len(grid)
  if method == "grid":
    side = math.isqrt(size)
    count = len(np.unique(np.asarray(grid) // side, axis=0))
  else:
    count = -(-n // size)
  r = 1 << max(0, (count - 1).bit_length())
  return (r * size if method == "window" else 1 << max(0, (n - 1).bit_length())), r


def slide_heatmaps(region_attention: Callable, features: np.ndarray, grid: np.ndarray,
                   ids: np.ndarray, text_mask: np.ndarray, *, method: str, size: int,
                   shifts: bool = True) -> np.ndarray:
  """Per-patch maps [T, N] of texts (ids [T, len]) over one slide's N patches:
  region attention x within-region patch attention (see make_predict_fns), every patch in
  a region. `region_attention(features, coords, mask, ids, text_mask, num_regions)` is the
  predict function (jitted by the caller, num_regions static).

  With "grid" regions of side k and `shifts`, the map is the mean over the k x k
  translations of the slide by 0..k-1 patches per axis: each patch then sits in k^2
  different blocks, so the map resolves single patches rather than blocks (demo, 2 x 2
  blocks: heatmap AUC 0.76 -> 0.87, pointing game 2.41x -> 2.51x chance, same model)."""
  side = math.isqrt(size) if method == "grid" and shifts else 1
  grid = np.asarray(grid)
  maps = [_heatmaps_once(region_attention, features, grid + np.asarray([dx, dy]), ids, text_mask,
                         method=method, size=size)
          for dy in range(side) for dx in range(side)]
  return np.mean(maps, axis=0)


def _heatmaps_once(region_attention, features, grid, ids, text_mask, *, method, size):
  from pathjax.evaluate.localization import patch_scores
  n = len(features)
  m, r = localization_layout(grid, method, size)
  f = np.zeros((1, m, features.shape[-1]), np.float32)
  f[0, :n] = features
  c = np.zeros((1, m, 2), np.int32)
  c[0, :n] = grid
  mask = np.zeros((1, m), bool)
  mask[0, :n] = True
  out = jax.device_get(region_attention(f, c, mask, ids, text_mask, r))
  index, rmask = out["region_index"][0], out["region_mask"][0] & (out["region_index"][0] < n)
  return np.stack([patch_scores(out["region_weights"][0, t], out["patch_weights"][0], index,
                                rmask, n) for t in range(len(ids))])
