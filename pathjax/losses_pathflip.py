"""PathFLIP losses (specs/pathflip.md): L = L_slide + L_region.

Pure jax functions over global arrays, as `pathjax.losses`: under `jax.jit` with the batch
sharded over the mesh, "negatives gathered across devices" is the plain formula over the
global batch and XLA inserts the communication. Everything is computed in float32; masks
are boolean with True = real.

- `slide_infonce`: symmetric InfoNCE between the global slide vectors and caption
  embeddings (L2-normalised here), logits = cos / 0.1, label smoothing 0.1 (torch's
  convention), every other slide of the global batch a negative: `losses.softmax_contrastive`.
- `region_sigmoid_loss`: the text-conditioned sigmoid loss. For slide b the texts are its K
  own subcaptions (label +1) and one subcaption of every other slide c != b (label -1):

      z_{b,j} = s * <normalize(v_{b,j}), normalize(t_j)> + beta
      L_region = -(1 / P) * sum_{b, j} log sigmoid(y_{b,j} z_{b,j})

  with P the number of (real) positive pairs, B * K when no slide or subcaption is padded
  (the spec's normaliser). v_{b,j} is `RegionHead`'s embedding of slide b conditioned on
  text j. The negative subcaption of slide c is one index drawn per step
  (`pick_negative_subcaptions`) and shared by all anchors b, so the region head runs on
  K + B texts per slide (own + every slide's negative; the anchor's own negative is masked
  out) and each anchor still sees one random subcaption of every other slide.
  A negative whose text is one of the anchor's own subcaptions (`same_subcaption_text`:
  reports written from templates repeat phrases such as "focal necrosis") describes the
  anchor too: the pair is left out (`not_negative`), not labelled both +1 and -1.
  (Otherwise, with 6 tissue classes shared by most synthetic slides, most negatives named
  tissue present on the anchor and the region head learned to attend *away* from the
  named tissue: localization maps anti-correlated with the class masks, heatmap AUC 0.35.)
  `s` is a raw multiplier (paper-era init log(1/0.07) = 2.66; the later code uses s = 10,
  beta = -10); both are learnable parameters of the recipe.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pathjax.losses import _f32, l2_normalize, sigmoid_loss_from_logits, softmax_contrastive

PAPER_SCALE_INIT = math.log(1 / 0.07)   # s, used as a raw multiplier (paper-era code)
PAPER_BIAS_INIT = 0.0
LATER_SCALE_INIT, LATER_BIAS_INIT = 10.0, -10.0


def slide_infonce(img: jax.Array, txt: jax.Array, *, temperature: float = 0.1,
                  label_smoothing: float = 0.1, valid: jax.Array | None = None) -> jax.Array:
  """L_slide: symmetric InfoNCE of global slide vectors img [B, D] and caption embeddings
  txt [B, D] (normalised here), logits = cos / temperature; valid [B] masks padded slides
  out of anchors and negatives. Mean over valid anchors of the two directions' CE, halved."""
  return softmax_contrastive(l2_normalize(img), l2_normalize(txt), 1.0 / temperature,
                             label_smoothing=label_smoothing, valid=valid)


def pick_negative_subcaptions(rng: jax.Array, own_mask: jax.Array) -> jax.Array:
  """One random real subcaption index per slide: own_mask [B, K] -> [B] int32 (0 for a slide
  without any, which `region_sigmoid_loss` then leaves out as a negative)."""
  own_mask = jnp.asarray(own_mask).astype(bool)
  any_real = jnp.any(own_mask, axis=-1)
  logits = jnp.where(own_mask | ~any_real[:, None], 0.0, -jnp.inf)
  idx = jax.random.categorical(rng, logits)
  return jnp.where(any_real, idx, 0).astype(jnp.int32)


def region_texts(t_own: jax.Array, t_neg: jax.Array) -> jax.Array:
  """The texts each slide's region head attends with: [B, K + B, D] = its own K subcaption
  embeddings t_own [B, K, D], then every slide's negative subcaption t_neg [B, D]. Split the
  head's output [B, K + B, D] with `v[:, :K], v[:, K:]` into `v_own`, `v_neg`."""
  b = t_own.shape[0]
  return jnp.concatenate([t_own, jnp.broadcast_to(t_neg[None], (b, *t_neg.shape))], axis=1)


def same_subcaption_text(sub_ids: jax.Array, sub_mask: jax.Array, neg_index: jax.Array) -> jax.Array:
  """[B, B] bool: True where slide c's negative subcaption (sub_ids[c, neg_index[c]]) is, token
  for token, one of slide b's own real subcaptions. sub_ids [B, K, T] int, sub_mask [B, K, T]
  (token mask; a subcaption is real when any token is)."""
  sub_ids = jnp.asarray(sub_ids)
  tok = jnp.asarray(sub_mask).astype(bool)
  ids = jnp.where(tok, sub_ids, -1)                                             # pads compare equal
  neg = jnp.take_along_axis(ids, neg_index[:, None, None], axis=1)[:, 0]      # [B, T]
  equal = jnp.all(ids[:, :, None, :] == neg[None, None, :, :], axis=-1)       # [B, K, B]
  real = jnp.any(tok, axis=-1)                                                  # [B, K]
  return jnp.any(equal & real[:, :, None], axis=1)


def region_logits(v_own: jax.Array, t_own: jax.Array, v_neg: jax.Array, t_neg: jax.Array,
                  scale: jax.Array | float, bias: jax.Array | float) -> jax.Array:
  """[B, K + B] logits z: own subcaptions first, then every slide's negative subcaption.

  v_own [B, K, D]: slide b conditioned on its own subcaption k, t_own [B, K, D] those
  subcaptions' embeddings; v_neg [B, B, D]: slide b conditioned on slide c's negative
  subcaption t_neg [B, D] (c on the second axis).
  """
  scale, bias = _f32(scale, bias)
  own = jnp.sum(l2_normalize(v_own) * l2_normalize(t_own), axis=-1)           # [B, K]
  neg = jnp.einsum("bcd,cd->bc", l2_normalize(v_neg), l2_normalize(t_neg))    # [B, B]
  return scale * jnp.concatenate([own, neg], axis=1) + bias


def region_sigmoid_loss(v_own: jax.Array, t_own: jax.Array, v_neg: jax.Array, t_neg: jax.Array,
                        scale: jax.Array | float, bias: jax.Array | float, *,
                        own_mask: jax.Array | None = None,
                        valid: jax.Array | None = None,
                        not_negative: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_region (see the module docstring). Shapes as `region_logits`; own_mask [B, K] marks
  real subcaptions, valid [B] real slides, not_negative [B, B] (anchor b, slide c's
  negative text) pairs to leave out (`same_subcaption_text`). Pairs with a padded slide or
  subcaption count neither as positives nor as negatives; a slide without real
  subcaptions offers no negative. Normaliser: the number of real positive pairs (B * K
  unpadded).

  Returns (loss, {"region_pos_prob", "region_neg_prob"}: mean sigmoid(z) over positive and
  over negative pairs).
  """
  b, k = v_own.shape[:2]
  if t_own.shape[:2] != (b, k) or v_neg.shape[:2] != (b, b) or t_neg.shape[0] != b:
    raise ValueError(f"region loss shapes disagree: v_own {v_own.shape}, t_own {t_own.shape}, "
                     f"v_neg {v_neg.shape} (want [B, B, D]), t_neg {t_neg.shape} (want [B, D])")
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)
  own_mask = (jnp.ones((b, k), bool) if own_mask is None
              else jnp.asarray(own_mask).astype(bool)) & valid[:, None]
  has_neg = jnp.any(own_mask, axis=-1)                                          # [B] slides c
  neg_mask = ~jnp.eye(b, dtype=bool) & valid[:, None] & has_neg[None, :]
  if not_negative is not None:
    neg_mask = neg_mask & ~jnp.asarray(not_negative).astype(bool)
  z = region_logits(v_own, t_own, v_neg, t_neg, scale, bias)
  labels = jnp.concatenate([jnp.ones((b, k)), -jnp.ones((b, b))], axis=1)
  mask = jnp.concatenate([own_mask, neg_mask], axis=1)
  n_pos = jnp.sum(own_mask).astype(jnp.float32)
  loss = sigmoid_loss_from_logits(z, labels, mask, normalizer=jnp.maximum(n_pos, 1.0))
  p = jax.lax.stop_gradient(jax.nn.sigmoid(z))
  mean = lambda m: jnp.sum(jnp.where(m, p, 0.0)) / jnp.maximum(jnp.sum(m), 1)
  zeros = jnp.zeros((b, b), bool)
  return loss, {"region_pos_prob": mean(jnp.concatenate([own_mask, zeros], 1)),
                "region_neg_prob": mean(jnp.concatenate([jnp.zeros((b, k), bool), neg_mask], 1))}
