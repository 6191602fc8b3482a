"""MR-PLIP: multi-resolution pathology-language pretraining (specs/mrplip.md).

Model: a ViT (UNI layout) and a CLIP text tower embed every sampled patch of a bag and every
text item; a fusion encoder turns each patch and its top-k keywords into a text-guided
visual representation z; SimSiam heads align z of parents and children.

Loss = w_bl * (ITC + w_itm * ITM) + w_cvta * CVTA + w_mrtva * MRTVA, every choice a config
field (configs/mrplip.py documents them).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathjax import losses, sharding
from pathjax.config_lib import ConfigError
from pathjax.input import transforms
from pathjax.models import heads, layers
from pathjax.models.fusion import FusionEncoder
from pathjax.models.text import TextTransformer
from pathjax.models.vit import ViT

TEXT_UNITS = ("keyword", "caption")
MRTVA_PAIRS = ("adjacent", "all")
ITM_NEGATIVES = ("hard", "random")
CONTRASTIVE = ("softmax", "sigmoid")


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class MRPLIPModel(nn.Module):
  """All MR-PLIP parameters. Methods are the pieces the loss and the encoders call."""
  vision: dict[str, Any]
  text: dict[str, Any]
  fusion: dict[str, Any]
  embed_dim: int = 512
  projector_dims: tuple[int, ...] = (2048, 2048, 2048)
  predictor_dims: tuple[int, ...] = (512, 2048)
  head_norm: str = "batch"
  temperature_init: float = 0.07
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_tower = ViT(**self.vision, **common)
    self.text_tower = TextTransformer(**self.text, embed_dim=self.embed_dim, **common)
    self.vision_proj = layers.dense(self.embed_dim, ("embed", "mlp"), use_bias=False,
                                    name="vision_proj", **common)
    self.fusion_encoder = FusionEncoder(**self.fusion, **common)
    self.projector = heads.MlpHead(tuple(self.projector_dims), final_norm=True,
                                   norm=self.head_norm, **common)
    self.predictor = heads.MlpHead(tuple(self.predictor_dims), norm=self.head_norm, **common)
    self.itm_head = layers.dense(2, ("embed", "classes"), name="itm_head", **common)
    scale_init = nn.initializers.constant(math.log(1.0 / self.temperature_init))
    self.itc_log_scale = self.param("itc_log_scale", nn.with_logical_partitioning(scale_init, ()), ())
    self.cvta_log_scale = self.param("cvta_log_scale", nn.with_logical_partitioning(scale_init, ()), ())
    self.sigmoid_bias = self.param("sigmoid_bias", nn.with_logical_partitioning(
        nn.initializers.constant(-10.0), ()), ())

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalised float images [N, H, W, 3] -> (pooled [N, width], embedding [N, E] normalised)."""
    pooled = self.vision_tower(images)["pooled"]
    return pooled, losses.l2_normalize(self.vision_proj(pooled))

  def encode_text(self, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token ids [N, T] -> (tokens [N, T, width], end-of-text [N, width], embedding [N, E]).

    The fusion encoder reads width-dim text features (tokens or end-of-text); the
    contrastive losses read the normalised embedding.
    """
    out = self.text_tower(ids)
    return out["tokens"], out["eot"], losses.l2_normalize(out["pooled"])

  def fuse(self, visual: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
    """Visual feature [N, width_v] with context tokens [N, S, D] -> fused [N, width_f]."""
    return self.fusion_encoder(visual[:, None, :], context, mask)[:, 0]

  def simsiam(self, z: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Projector g and predictor h of z [N, width_f]; BatchNorm statistics over `mask`ed rows.

    Apply with mutable=["batch_stats"] and discard that collection (statistics of the
    current batch are used in every pass; the heads serve training only).
    """
    g = self.projector(z, mask)
    return g, self.predictor(g, mask)

  def match(self, fused: jax.Array) -> jax.Array:
    return self.itm_head(fused).astype(jnp.float32)

  def __call__(self, images, ids):
    """Touches every parameter (for init)."""
    pooled, v = self.encode_image(images)
    tokens, _, t = self.encode_text(ids)
    fused = self.fuse(pooled, tokens, jnp.ones(tokens.shape[:2], bool))
    g, h = self.simsiam(fused)
    return v, t, self.match(fused), g, h


def _ancestor_pairs(parent: jax.Array, mode: str, depth: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """(ancestor index [B, P, A], pair valid [B, P, A]) for each patch of a selection.

  `adjacent` keeps the parent only (A = 1); `all` follows parent pointers to every
  ancestor: A = `depth` hops (the tree depth, levels - 1: 3 for a 5/10/20/40x bag, so a
  full 85-patch bag gathers [B, 85, 3, D], not [B, 85, 84, D]); depth None falls back to
  the bound P - 1.
  """
  bound = max(parent.shape[-1] - 1, 1)
  hops = 1 if mode == "adjacent" else max(min(depth or bound, bound), 1)
  ancestors, current = [], parent
  for _ in range(hops):
    ancestors.append(current)
    current = jnp.where(current >= 0, jnp.take_along_axis(parent, jnp.maximum(current, 0), -1), -1)
  anc = jnp.stack(ancestors, axis=-1)
  return jnp.maximum(anc, 0), anc >= 0


class MRPLIPRecipe:
  """The trainer's view of MR-PLIP (pathjax.recipes.base.Recipe)."""

  def __init__(self, config, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.mesh = mesh  # the training mesh: the sigmoid loss runs as a ring over its batch axes
    m, loss_cfg = config.model, config.loss
    if loss_cfg.cvta_text_unit not in TEXT_UNITS:
      raise ConfigError(f"loss.cvta_text_unit {loss_cfg.cvta_text_unit!r}; valid: {TEXT_UNITS}")
    if loss_cfg.mrtva_pairs not in MRTVA_PAIRS:
      raise ConfigError(f"loss.mrtva_pairs {loss_cfg.mrtva_pairs!r}; valid: {MRTVA_PAIRS}")
    if loss_cfg.get("itm_negatives", "hard") not in ITM_NEGATIVES:
      raise ConfigError(f"loss.itm_negatives {loss_cfg.itm_negatives!r}; valid: {ITM_NEGATIVES}")
    if loss_cfg.contrastive not in CONTRASTIVE:
      raise ConfigError(f"loss.contrastive {loss_cfg.contrastive!r}; valid: {CONTRASTIVE}")
    vision = _variant(ViT, m.vision.variant)
    text = _variant(TextTransformer, m.text.variant)
    vision_over, text_over = m.vision.overrides.to_dict(), m.text.overrides.to_dict()
    if not text_over.get("vocab_size", 1):
      text_over.pop("vocab_size")              # 0: the tokenizer's (or the model directory's)
    self._from_init_dir(m, {"vision": (vision, vision_over), "text": (text, text_over)})
    vision.update(vision_over)
    text.update(text_over, context_length=config.input.context_length)
    text.update(self._tokenizer_fields(config, text.get("vocab_size", 0)))
    attention = m.get("attention", "auto")
    vision.update(scan=m.scan, remat=m.remat, image_size=config.input.image_size,
                  attention=attention)
    text.update(scan=m.scan, remat=m.remat, attention=attention)
    fusion = {**m.fusion.to_dict(), "scan": m.scan, "remat": m.remat}
    self.compute_dtype = _dtype(config.precision.compute_dtype)
    head_norm = m.get("head_norm", "batch")
    if head_norm not in heads.NORMS:
      raise ConfigError(f"model.head_norm {head_norm!r}; valid: {', '.join(heads.NORMS)}")
    self.model = MRPLIPModel(
        vision=vision, text=text, fusion=fusion, embed_dim=m.embed_dim,
        projector_dims=tuple(m.projector_dims), predictor_dims=tuple(m.predictor_dims),
        head_norm=head_norm, temperature_init=loss_cfg.temperature_init,
        dtype=self.compute_dtype, param_dtype=_dtype(config.precision.param_dtype))

  def _from_init_dir(self, m, towers: dict[str, tuple[dict, dict]]) -> None:
    """Architecture fields of the towers loaded from `model.init_dir` come from its model.json.

    The variant's defaults give way to the directory; an explicit override
    (`model.<tower>.overrides.X`) that disagrees with it is a ConfigError naming both values,
    so a text tower converted with `gelu` never trains as `quick_gelu` unnoticed.
    """
    if not m.init_dir:
      return
    from pathjax.models import model_dir
    try:
      meta = model_dir.read_model_json(m.init_dir)
    except model_dir.ModelDirError as e:
      raise ConfigError(f"model.init_dir: {e}") from e
    kinds = {"vision": "vit", "text": "clip_text"}
    for tower in m.init_towers:
      if tower not in towers:
        raise ConfigError(f"model.init_towers: unknown tower {tower!r}; valid: {', '.join(towers)}")
      spec = meta["towers"].get(tower)
      if spec is None:
        raise ConfigError(f"model.init_towers names the {tower} tower but {m.init_dir} has "
                          f"only {', '.join(meta['towers'])}: drop it from model.init_towers")
      if spec.get("kind") != kinds[tower]:
        raise ConfigError(f"{m.init_dir}: the {tower} tower is a {spec.get('kind')!r} tower, "
                          f"MR-PLIP needs {kinds[tower]!r}")
      fields, overrides = towers[tower]
      arch = {k: v for k, v in spec.get("config", {}).items() if k not in _RUNTIME_FIELDS}
      if tower == "text" and arch.get("embed_dim", m.embed_dim) != m.embed_dim:
        raise ConfigError(f"model.embed_dim={m.embed_dim} but the text tower in {m.init_dir} "
                          f"projects to {arch['embed_dim']}: set --config.model.embed_dim="
                          f"{arch['embed_dim']}")
      arch.pop("embed_dim", None)
      for key, value in overrides.items():
        if key in arch and _norm_value(arch[key]) != _norm_value(value):
          raise ConfigError(
              f"model.{tower}.overrides.{key}={value!r} disagrees with {m.init_dir}/model.json, "
              f"whose {tower} tower has {key}={arch[key]!r}: drop the override (the model "
              f"directory's value is used) or convert the tower with {key}={value!r}")
      fields.update(arch)

  def _tokenizer_fields(self, config, vocab_size: int) -> dict[str, int]:
    """Vocabulary size (0 = the tokenizer's), end-of-text id and pad id from the tokenizer."""
    self.pad_id = 0
    if not config.input.tokenizer:
      if not vocab_size:
        raise ConfigError("model.text.overrides.vocab_size is 0 (take it from the tokenizer) but "
                         "input.tokenizer is empty: set one of them, e.g. "
                         "--config.input.tokenizer=DIR or --config.model.text.overrides.vocab_size=1024 "
                         "(synthetic batches, as `pathjax bench train` and `pathjax compile` use)")
      return {}
    from pathjax.input.tokenize import TextTokenizer
    tok = TextTokenizer(config.input.tokenizer, config.input.context_length)
    if vocab_size and tok.vocab_size > vocab_size:
      raise ConfigError(f"the tokenizer in {config.input.tokenizer} has {tok.vocab_size} tokens, "
                       f"more than model.text.overrides.vocab_size={vocab_size}")
    self.pad_id = tok.pad_id
    return {"vocab_size": vocab_size or tok.vocab_size, "eos_id": tok.eos_id}

  # -- trainer interface ----------------------------------------------------------------

  def example_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    from pathjax.input import pipeline
    return pipeline.batch_shapes(self.config.input, global_batch_size)

  def init(self, rng, batch):
    size = self.config.input.image_size
    images = jnp.zeros((1, size, size, 3), self.compute_dtype)
    ids = jnp.zeros((1, self.config.input.context_length), jnp.int32)
    return self.model.init(rng, images, ids)["params"]

  def load_pretrained(self, abstract: dict[str, jax.ShapeDtypeStruct], wanted: set[str]
                      ) -> dict[str, jax.Array]:
    """Towers from `model.init_dir` (a `pathjax convert` model directory), for the paths in
    `wanted`: each tower is checked whole against the model, then its wanted tensors are
    streamed from the file straight into their shardings."""
    m = self.config.model
    if not m.init_dir:
      return {}
    from pathjax.models import model_dir
    targets = {"vision": "vision_tower", "text": "text_tower"}
    meta = model_dir.read_model_json(m.init_dir)
    out: dict[str, jax.Array] = {}
    for tower in m.init_towers:
      if tower not in targets:
        raise ConfigError(f"model.init_towers: unknown tower {tower!r}; valid: {', '.join(targets)}")
      name = targets[tower]
      tower_abstract = {p[len(name) + 1:]: x for p, x in abstract.items() if p.startswith(name + "/")}
      only = {p[len(name) + 1:] for p in wanted if p.startswith(name + "/")}
      try:
        placed = model_dir.place_tower(m.init_dir, tower, tower_abstract, only=only)
      except model_dir.ModelDirError as e:
        raise ValueError(f"{m.init_dir} {tower} tower: {e}") from None
      out.update({f"{name}/{k}": v for k, v in placed.items()})
      has_projection = meta["towers"].get(tower, {}).get("projection")
      if tower == "vision" and has_projection and "vision_proj/kernel" in wanted:
        reader = model_dir.params_reader(m.init_dir)
        want = abstract["vision_proj/kernel"]
        if tuple(reader.shape("vision/projection")) != tuple(want.shape):
          raise ValueError(f"{m.init_dir} vision projection: shape mismatch for vision_proj/kernel: "
                           f"file has {tuple(reader.shape('vision/projection'))}, the model "
                           f"expects {tuple(want.shape)}")
        out["vision_proj/kernel"] = jax.device_put(
            np.asarray(reader.get("vision/projection"), want.dtype), want.sharding)
    return out

  def train_iterator(self, process_index: int, process_count: int):
    from pathjax.input import pipeline
    return pipeline.make_train_iterator(self.config.input, batch_size=self.config.batch_size,
                                        process_index=process_index,
                                        process_count=process_count, seed=self.config.seed)

  def loss(self, params, batch, rng, train: bool = True):
    cfg = self.config.loss
    apply = lambda method, *a: self.model.apply({"params": params}, *a, method=method)
    batch = {k: jnp.asarray(v) for k, v in batch.items()
             if not (isinstance(v, np.ndarray) and v.dtype.kind in "USO")}  # drop raw texts
    images = batch["images"]                                   # uint8 [B, P, H, W, 3]
    b, p = images.shape[:2]
    valid = batch["patch_mask"].astype(bool)                   # [B, P]
    flat = lambda x: None if x is None else x.reshape((b * p,) + x.shape[2:])
    # Pixels stay split over the batch axes through the on-device augmentation (without the
    # constraints XLA may all-gather the [B*P, H, W, 3] images before the patch embedding).
    pixel_axes = ("act_batch", None, None, None)
    x = transforms.normalize_on_device(layers.constrain(flat(images), pixel_axes),
                                       dtype=self.compute_dtype,
                                       color=flat(batch.get("color_transform")),
                                       dihedral=flat(batch.get("dihedral")))
    x = layers.constrain(x, pixel_axes)
    pooled, v = apply(MRPLIPModel.encode_image, x)            # [B*P, Wv], [B*P, E]
    cap_ids = batch["caption_ids"].reshape(b * p, -1)
    cap_tokens, cap_eot, t = apply(MRPLIPModel.encode_text, cap_ids)
    cap_valid = (batch["caption_mask"].astype(bool) & valid).reshape(-1)
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    # Collapse monitors (heads.spread: ~1 healthy, 0 collapsed; unrelated_cosine: ~0 healthy).
    vb, tb, cvb = v.reshape(b, p, -1), t.reshape(b, p, -1), cap_valid.reshape(b, p)
    metrics["monitor_image_spread"] = heads.spread(vb, valid)

    # Baseline: image-caption contrastive over the global batch (+ ITM with hard negatives).
    if cfg.w_bl:
      scale = jnp.exp(params["itc_log_scale"]).clip(max=100.0)
      if cfg.contrastive == "softmax":
        itc = losses.softmax_contrastive(v, t, scale, valid=cap_valid)
      else:
        itc = self._sigmoid_itc(v, t, scale, params["sigmoid_bias"], cap_valid)
      metrics["itc"] = itc
      metrics["monitor_caption_spread"] = heads.spread(tb, cvb)
      metrics["monitor_itc_unrelated_cos"] = heads.unrelated_cosine(vb, tb, cvb, cvb)
      bl = itc
      if cfg.w_itm:
        itm, itm_metrics = self._itm(apply, pooled, cap_tokens, cap_ids, v, t, scale,
                                     cap_valid, rng)
        metrics.update(itm=itm, **itm_metrics)
        bl = bl + cfg.w_itm * itm
      total = total + cfg.w_bl * bl
      metrics["temperature"] = 1.0 / scale

    # Text bag: the bag's distinct keywords (or the captions of the sampled patches).
    if cfg.cvta_text_unit == "keyword":
      kb = self._keyword_context(batch["keyword_ids"], metrics)
      # One text pass over every keyword slot of the batch; CVTA and the fusion share it.
      _, w_eot, w = apply(MRPLIPModel.encode_text, kb.reshape((-1, kb.shape[-1])))
      w, w_eot = w.reshape(b, kb.shape[1], -1), w_eot.reshape(b, kb.shape[1], -1)
      w_mask = batch["keyword_mask"].astype(bool)
      metrics["keywords_per_bag"] = jnp.mean(jnp.sum(w_mask, axis=-1).astype(jnp.float32))
    else:
      w, w_eot, w_mask = tb, cap_eot.reshape(b, p, -1), cvb

    if cfg.w_cvta:
      temp = 1.0 / jnp.exp(params["cvta_log_scale"]).clip(max=100.0)
      cvta, cvta_metrics = losses.cvta_loss(vb, w, w_mask, k=cfg.cvta_k,
                                            temperature=temp, negatives=cfg.cvta_negatives,
                                            v_mask=valid)
      metrics.update(cvta=cvta, **cvta_metrics)
      metrics["monitor_keyword_spread"] = heads.spread(w, w_mask)
      metrics["monitor_cvta_unrelated_cos"] = heads.unrelated_cosine(vb, w, valid, w_mask)
      total = total + cfg.w_cvta * cvta

    if cfg.w_mrtva:
      mrtva, mrtva_metrics = self._mrtva(params, pooled.reshape(b, p, -1), vb, w, w_eot,
                                         w_mask, batch["parent"], valid)
      metrics.update(mrtva=mrtva, **mrtva_metrics)
      total = total + cfg.w_mrtva * mrtva

    metrics["loss"] = total
    return total, metrics

  # -- loss pieces ------------------------------------------------------------------------

  def _keyword_context(self, ids: jax.Array, metrics: dict) -> jax.Array:
    """Keyword ids [B, K, T] cut to `loss.keyword_context` tokens (keywords are a few tokens).

    A keyword longer than that keeps its first tokens and ends with end-of-text, as the
    tokenizer truncates (bos + tokens + eos); `keywords_truncated` counts them.
    """
    length = int(self.config.loss.get("keyword_context", 0) or 0)
    if not length or length >= ids.shape[-1]:
      return ids
    if length < 3:
      raise ConfigError(f"loss.keyword_context={length}: needs room for bos, a token and eos")
    text = self.model.text
    eos = text.get("eos_id", -1)
    eos = eos if eos >= 0 else text["vocab_size"] - 1   # OpenAI CLIP: end-of-text is the last id
    short = ids[..., :length]
    cut = ~jnp.any(short == eos, axis=-1) & jnp.any(ids[..., length:] == eos, axis=-1)
    metrics["keywords_truncated"] = jnp.sum(cut).astype(jnp.int32)
    return short.at[..., -1].set(jnp.where(cut, eos, short[..., -1]))

  def _sigmoid_itc(self, v, t, scale, bias, valid):
    # Padded pairs are replaced by zero vectors: they score `bias` against everything and
    # add the same constant for every parameter value, so gradients are unaffected.
    v = jnp.where(valid[:, None], v, 0.0)
    t = jnp.where(valid[:, None], t, 0.0)
    if self.mesh is not None:
      # Training: a ring over the batch axes of the mesh, memory per device O(B / n).
      rules = sharding.rules_from_config(self.config)
      return losses.chunked_sigmoid_contrastive(v, t, scale, bias, mesh=self.mesh,
                                                batch_axes=sharding.batch_axes(self.mesh, rules))
    return losses.sigmoid_contrastive(v, t, scale, bias)

  def _itm(self, apply, pooled, cap_tokens, cap_ids, v, t, scale, valid, rng):
    """Image-caption matching through the fusion encoder with in-batch hard negatives.

    Hard negatives are sampled from softmax(ITC similarity); captions that say the same as
    the positive are not negatives: identical token ids, or text embeddings with cosine >=
    `loss.itm_false_negative_cos` to the positive caption. Without that filter the hardest
    "negatives" are paraphrases of the positive (the demo's template captions: same class,
    same magnification), ITM cannot tell them apart, and it learns the prior p(match) = 1/3.
    Rows left without an admissible negative are masked. `loss.itm_negatives = 'random'`
    samples negatives uniformly instead (the smoke config: with six classes of template
    captions even filtered hard negatives are mostly paraphrases early in training).
    """
    cfg = self.config.loss
    sim = scale * v @ t.T
    t_sg = jax.lax.stop_gradient(t).astype(jnp.float32)
    same = jnp.all(cap_ids[:, None, :] == cap_ids[None, :, :], axis=-1)
    threshold = float(cfg.get("itm_false_negative_cos", 1.0))
    if threshold < 1.0:
      same = same | (t_sg @ t_sg.T >= threshold)
    if cfg.get("itm_negatives", "hard") == "random":
      sim = jnp.zeros_like(sim)      # uniform over the admissible captions / images
    neg_t, neg_i = losses.itm_hard_negative_indices(sim, sim.T, rng, positive_mask=same,
                                                    valid=valid)
    n = pooled.shape[0]
    admissible = ~(same | jnp.eye(n, dtype=bool)) & valid[None, :]
    has_neg = jnp.any(admissible, axis=-1) & valid             # symmetric: both directions
    tok_mask = cap_ids != self.pad_id
    visual = jnp.concatenate([pooled, pooled, pooled[neg_i]], axis=0)
    # Negative captions come from anywhere in the global batch. Their token features
    # ([N, T, width] per caption) are recomputed from the gathered ids rather than gathered
    # themselves: an all-gather of every device's token features would put a batch-sized
    # activation on every chip (tests/test_sharding_plan.py), the ids are T int32 each.
    neg_tokens, _, _ = apply(MRPLIPModel.encode_text, cap_ids[neg_t])
    context = jnp.concatenate([cap_tokens, neg_tokens, cap_tokens], axis=0)
    mask = jnp.concatenate([tok_mask, tok_mask[neg_t], tok_mask], axis=0)
    logits = apply(MRPLIPModel.match, apply(MRPLIPModel.fuse, visual, context, mask))
    labels = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
    pair_valid = jnp.concatenate([valid, has_neg, has_neg])
    loss, itm_metrics = losses.image_text_matching_loss(logits, labels, mask=pair_valid)
    p_match = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1]
    mean = lambda x, m: jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m), 1)
    itm_metrics.update(
        itm_p_match_pos=jax.lax.stop_gradient(mean(p_match[:n], valid)),
        itm_p_match_neg=jax.lax.stop_gradient(mean(p_match[n:], pair_valid[n:])),
        itm_rows_with_negative=jnp.sum(has_neg).astype(jnp.int32))
    return loss, itm_metrics

  def _mrtva(self, params, pooled, v, w, w_eot, w_mask, parent, valid):
    """SimSiam between text-guided representations of parents and their descendants.

    Returns (loss, collapse monitors of the fused z, projector g and predictor h).
    """
    cfg = self.config.loss
    apply = lambda method, *a: self.model.apply({"params": params}, *a, method=method)
    b, p, _ = pooled.shape
    # Each patch's top-k keywords by similarity, chosen under stop-gradient.
    sim = jnp.einsum("bpe,bke->bpk", jax.lax.stop_gradient(v), jax.lax.stop_gradient(w))
    sim = jnp.where(w_mask[:, None, :], sim, -jnp.inf)
    k = min(cfg.fusion_keywords, w.shape[1])
    top_sim, top = jax.lax.top_k(sim, k)                                  # [B, P, k]
    context = jnp.take_along_axis(w_eot[:, None], top[..., None], axis=2)  # [B, P, k, Wt]
    ctx_mask = jnp.isfinite(top_sim)
    z = apply(MRPLIPModel.fuse, pooled.reshape(b * p, -1), context.reshape(b * p, k, -1),
              ctx_mask.reshape(b * p, k))
    # BatchNorm heads: statistics of this batch's real patches; batch_stats are discarded.
    (g, h), _ = self.model.apply({"params": params}, z, valid.reshape(-1),
                                 method=MRPLIPModel.simsiam, mutable=["batch_stats"])
    g, h, z = g.reshape(b, p, -1), h.reshape(b, p, -1), z.reshape(b, p, -1)
    anc, pair_ok = _ancestor_pairs(parent, cfg.mrtva_pairs,
                                   _tree_depth(self.config.input, p))    # [B, P, A]
    take = lambda x: jnp.take_along_axis(x[:, :, None], anc[..., None], axis=1)
    g_anc, h_anc = take(g), take(h)                                       # [B, P, A, D]
    anc_valid = jnp.take_along_axis(valid[:, :, None], anc, axis=1)
    mask = pair_ok & valid[:, :, None] & anc_valid
    loss = losses.simsiam_loss(h_anc, g[:, :, None], h[:, :, None], g_anc,
                               mask=jnp.broadcast_to(mask, mask.shape))
    monitors = {
        "monitor_fused_spread": heads.spread(z, valid),
        "monitor_projector_spread": heads.spread(g, valid),
        "monitor_predictor_spread": heads.spread(h, valid),
        "monitor_mrtva_unrelated_cos": heads.unrelated_cosine(h, g, valid, valid),
    }
    return loss, monitors

  # -- using a trained model --------------------------------------------------------------

  def predict_fns(self, params):
    def image(images_uint8):
      x = transforms.normalize_on_device(images_uint8, dtype=self.compute_dtype)
      return self.model.apply({"params": params}, x, method=MRPLIPModel.encode_image)[1]

    def text(ids):
      return self.model.apply({"params": params}, ids, method=MRPLIPModel.encode_text)[2]

    return {"image": image, "text": text, "match": self.match_fn(params)}

  def match_fn(self, params):
    """(uint8 images [N, H, W, 3], caption ids [N, T]) -> p(match) [N] through the fusion
    encoder and the ITM head (held-out ITM checks; a "match" entry for predict_fns)."""
    def match(images_uint8, ids):
      x = transforms.normalize_on_device(images_uint8, dtype=self.compute_dtype)
      apply = lambda method, *a: self.model.apply({"params": params}, *a, method=method)
      pooled, _ = apply(MRPLIPModel.encode_image, x)
      tokens, _, _ = apply(MRPLIPModel.encode_text, ids)
      logits = apply(MRPLIPModel.match, apply(MRPLIPModel.fuse, pooled, tokens, ids != self.pad_id))
      return jax.nn.softmax(logits, axis=-1)[:, 1]
    return match

  def export(self, params) -> dict[str, Any]:
    """Vision tower + projection and text tower, for pathjax.models.model_dir."""
    model = self.model
    return {
        "towers": {
            "vision": dict(kind="vit", module=ViT(**model.vision),
                           params=params["vision_tower"],
                           projection=np.asarray(params["vision_proj"]["kernel"])),
            "text": dict(kind="clip_text",
                         module=TextTransformer(**model.text, embed_dim=model.embed_dim),
                         params=params["text_tower"], projection=None),
        },
        "preprocess": dict(image_size=self.config.input.image_size,
                           mean=list(transforms.IMAGENET_MEAN), std=list(transforms.IMAGENET_STD)),
        "tokenizer_dir": self.config.input.tokenizer,
    }


# Fields of a model directory's tower config that the run decides, not the architecture.
_RUNTIME_FIELDS = ("scan", "remat", "attention", "dropout_rate", "deterministic", "image_size",
                   "context_length", "eos_id")


def _norm_value(v):
  return tuple(v) if isinstance(v, list) else v


def _tree_depth(input_config, num_patches: int) -> int | None:
  """Parent hops from the deepest sampled patch to the root: levels - 1.

  From config.input.levels, else from the number of patches an example holds (the levels
  L with num_selected(range(L)) == P: 4 for both a 4-patch chain and an 85-patch bag).
  None when that cannot be told (the caller falls back to P - 1).
  """
  from pathjax.input import pipeline, sampling
  levels = input_config.get("levels")
  if levels is not None:
    return max(len(tuple(levels)) - 1, 1)
  per_level = pipeline.children_per_level(input_config)
  for num_levels in range(1, num_patches + 1):
    if sampling.num_selected(range(num_levels), per_level) == num_patches:
      return max(num_levels - 1, 1)
  return None


def _variant(cls, variant: str) -> dict[str, Any]:
  from pathjax.models import text as text_lib, vit as vit_lib
  module = vit_lib if cls is ViT else text_lib
  return module.variant_fields(variant)


def make_recipe(config, mesh=None) -> MRPLIPRecipe:
  return MRPLIPRecipe(config, mesh)
