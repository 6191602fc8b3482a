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
from flax import traverse_util
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
    self.projector = heads.MlpHead(tuple(self.projector_dims), final_norm=True, **common)
    self.predictor = heads.MlpHead(tuple(self.predictor_dims), **common)
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

  def simsiam(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    g = self.projector(z)
    return g, self.predictor(g)

  def match(self, fused: jax.Array) -> jax.Array:
    return self.itm_head(fused).astype(jnp.float32)

  def __call__(self, images, ids):
    """Touches every parameter (for init)."""
    pooled, v = self.encode_image(images)
    tokens, _, t = self.encode_text(ids)
    fused = self.fuse(pooled, tokens, jnp.ones(tokens.shape[:2], bool))
    g, h = self.simsiam(fused)
    return v, t, self.match(fused), g, h


def _ancestor_pairs(parent: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
  """(ancestor index [B, P, A], pair valid [B, P, A]) for each patch of a selection.

  `adjacent` keeps the parent only (A = 1); `all` follows parent pointers to every
  ancestor (A = P - 1 at most), so the pairs cover every parent/descendant pair.
  """
  hops = 1 if mode == "adjacent" else max(parent.shape[-1] - 1, 1)
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
    if loss_cfg.contrastive not in CONTRASTIVE:
      raise ConfigError(f"loss.contrastive {loss_cfg.contrastive!r}; valid: {CONTRASTIVE}")
    vision = {**_variant(ViT, m.vision.variant), **m.vision.overrides.to_dict()}
    text = {**_variant(TextTransformer, m.text.variant), **m.text.overrides.to_dict(),
            "context_length": config.input.context_length}
    text.update(self._tokenizer_fields(config, text.get("vocab_size", 0)))
    vision.update(scan=m.scan, remat=m.remat, image_size=config.input.image_size)
    text.update(scan=m.scan, remat=m.remat)
    fusion = {**m.fusion.to_dict(), "scan": m.scan, "remat": m.remat}
    self.compute_dtype = _dtype(config.precision.compute_dtype)
    self.model = MRPLIPModel(
        vision=vision, text=text, fusion=fusion, embed_dim=m.embed_dim,
        projector_dims=tuple(m.projector_dims), predictor_dims=tuple(m.predictor_dims),
        temperature_init=loss_cfg.temperature_init, dtype=self.compute_dtype,
        param_dtype=_dtype(config.precision.param_dtype))

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
    `wanted`, each placed in its sharding; the whole tower is checked against the model."""
    m = self.config.model
    if not m.init_dir:
      return {}
    from pathjax.models import model_dir
    targets = {"vision": "vision_tower", "text": "text_tower"}
    for tower in m.init_towers:
      if tower not in targets:
        raise ConfigError(f"model.init_towers: unknown tower {tower!r}; valid: {', '.join(targets)}")
    loaded = model_dir.load_model_dir(m.init_dir, towers=tuple(m.init_towers))
    source: dict[str, np.ndarray] = {}
    for tower in m.init_towers:
      name = targets[tower]
      tower_flat = traverse_util.flatten_dict(loaded.towers[tower].params, sep="/")
      _check_tower(abstract, name, tower_flat, f"{m.init_dir} {tower} tower")
      source.update({f"{name}/{k}": v for k, v in tower_flat.items()})
      projection = loaded.towers[tower].projection
      if tower == "vision" and projection is not None:
        _check_tower(abstract, "vision_proj", {"kernel": projection}, f"{m.init_dir} vision projection")
        source["vision_proj/kernel"] = projection
    return {path: jax.device_put(np.asarray(value, abstract[path].dtype), abstract[path].sharding)
            for path, value in source.items() if path in wanted}

  def train_iterator(self, process_index: int, process_count: int):
    from pathjax.input import pipeline
    return pipeline.make_train_iterator(self.config.input, process_index=process_index,
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
    cap_tokens, cap_eot, t = apply(MRPLIPModel.encode_text, batch["caption_ids"].reshape(b * p, -1))
    cap_valid = (batch["caption_mask"].astype(bool) & valid).reshape(-1)
    metrics = {}
    total = jnp.zeros((), jnp.float32)

    # Baseline: image-caption contrastive over the global batch (+ ITM with hard negatives).
    if cfg.w_bl:
      scale = jnp.exp(params["itc_log_scale"]).clip(max=100.0)
      if cfg.contrastive == "softmax":
        itc = losses.softmax_contrastive(v, t, scale, valid=cap_valid)
      else:
        itc = self._sigmoid_itc(v, t, scale, params["sigmoid_bias"], cap_valid)
      metrics["itc"] = itc
      bl = itc
      if cfg.w_itm:
        itm, itm_acc = self._itm(apply, pooled, cap_tokens, batch["caption_ids"].reshape(b * p, -1),
                                 v, t, scale, cap_valid, rng)
        metrics.update(itm=itm, itm_accuracy=itm_acc)
        bl = bl + cfg.w_itm * itm
      total = total + cfg.w_bl * bl
      metrics["temperature"] = 1.0 / scale

    # Text bag: keywords of the whole bag (or the captions of the sampled patches).
    if cfg.cvta_text_unit == "keyword":
      kb = batch["keyword_ids"]
      _, w_eot, w = apply(MRPLIPModel.encode_text, kb.reshape((-1, kb.shape[-1])))
      w, w_eot = w.reshape(b, kb.shape[1], -1), w_eot.reshape(b, kb.shape[1], -1)
      w_mask = batch["keyword_mask"].astype(bool)
    else:
      w, w_eot, w_mask = t.reshape(b, p, -1), cap_eot.reshape(b, p, -1), cap_valid.reshape(b, p)

    if cfg.w_cvta:
      temp = 1.0 / jnp.exp(params["cvta_log_scale"]).clip(max=100.0)
      cvta, cvta_metrics = losses.cvta_loss(v.reshape(b, p, -1), w, w_mask, k=cfg.cvta_k,
                                            temperature=temp, negatives=cfg.cvta_negatives,
                                            v_mask=valid)
      metrics.update(cvta=cvta, **cvta_metrics)
      total = total + cfg.w_cvta * cvta

    if cfg.w_mrtva:
      mrtva = self._mrtva(apply, pooled.reshape(b, p, -1), v.reshape(b, p, -1), w, w_eot,
                          w_mask, batch["parent"], valid)
      metrics["mrtva"] = mrtva
      total = total + cfg.w_mrtva * mrtva

    metrics["loss"] = total
    return total, metrics

  # -- loss pieces ------------------------------------------------------------------------

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
    """Image-caption matching through the fusion encoder with in-batch hard negatives."""
    sim = scale * v @ t.T
    neg_t, neg_i = losses.itm_hard_negative_indices(sim, sim.T, rng, valid=valid)
    tok_mask = cap_ids != self.pad_id
    visual = jnp.concatenate([pooled, pooled, pooled[neg_i]], axis=0)
    context = jnp.concatenate([cap_tokens, cap_tokens[neg_t], cap_tokens], axis=0)
    mask = jnp.concatenate([tok_mask, tok_mask[neg_t], tok_mask], axis=0)
    logits = apply(MRPLIPModel.match, apply(MRPLIPModel.fuse, visual, context, mask))
    n = pooled.shape[0]
    labels = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
    pair_valid = jnp.concatenate([valid, valid, valid])
    loss, itm_metrics = losses.image_text_matching_loss(logits, labels, mask=pair_valid)
    return loss, itm_metrics["itm_accuracy"]

  def _mrtva(self, apply, pooled, v, w, w_eot, w_mask, parent, valid):
    """SimSiam between text-guided representations of parents and their descendants."""
    cfg = self.config.loss
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
    g, h = apply(MRPLIPModel.simsiam, z)
    g, h = g.reshape(b, p, -1), h.reshape(b, p, -1)
    anc, pair_ok = _ancestor_pairs(parent, cfg.mrtva_pairs)               # [B, P, A]
    take = lambda x: jnp.take_along_axis(x[:, :, None], anc[..., None], axis=1)
    g_anc, h_anc = take(g), take(h)                                       # [B, P, A, D]
    anc_valid = jnp.take_along_axis(valid[:, :, None], anc, axis=1)
    mask = pair_ok & valid[:, :, None] & anc_valid
    return losses.simsiam_loss(h_anc, g[:, :, None], h[:, :, None], g_anc,
                               mask=jnp.broadcast_to(mask, mask.shape))

  # -- using a trained model --------------------------------------------------------------

  def predict_fns(self, params):
    def image(images_uint8):
      x = transforms.normalize_on_device(images_uint8, dtype=self.compute_dtype)
      return self.model.apply({"params": params}, x, method=MRPLIPModel.encode_image)[1]

    def text(ids):
      return self.model.apply({"params": params}, ids, method=MRPLIPModel.encode_text)[2]

    return {"image": image, "text": text}

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


def _check_tower(abstract: dict[str, Any], prefix: str, flat: dict[str, np.ndarray], what: str) -> None:
  """Raises naming the differences between a loaded tower and the model's parameters."""
  expected = {p[len(prefix) + 1:]: x for p, x in abstract.items() if p.startswith(prefix + "/")}
  missing, extra = sorted(expected.keys() - flat.keys()), sorted(flat.keys() - expected.keys())
  if missing or extra:
    raise ValueError(f"{what}: parameters differ from the config's model (scan and sizes must "
                     f"match); missing {missing[:10]}, unexpected {extra[:10]}")
  for key, value in expected.items():
    if tuple(value.shape) != tuple(np.shape(flat[key])):
      raise ValueError(f"{what}: shape mismatch for {key}: file has {tuple(np.shape(flat[key]))}, "
                       f"the model expects {tuple(value.shape)}")


def _variant(cls, variant: str) -> dict[str, Any]:
  from pathjax.models import text as text_lib, vit as vit_lib
  module = vit_lib if cls is ViT else text_lib
  return module.variant_fields(variant)


def make_recipe(config, mesh=None) -> MRPLIPRecipe:
  return MRPLIPRecipe(config, mesh)
