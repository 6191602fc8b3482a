"""BLIP-2 stage-1 losses (PathAlign): ITC, ITM with hard negatives, ITG.

Pure jax functions over global arrays, as `pathjax.losses`: under `jax.jit` the batch is one
global array sharded over the mesh, so "candidates gathered from all devices" (LAVIS'
`concat_all_gather`) is the plain formula and XLA inserts the communication. Everything is
computed in float32; masks are boolean with True = a real example / token.

Several slides may share an identical report (specimen parts with the same text, or
templated reports): `same_text_mask` marks those pairs, ITC spreads its target over all of
them (BLIP's `image_id` targets) and ITM never samples them as negatives.
See `pathjax.models.qformer` for the flow that feeds these functions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pathjax.losses import _NEG, _f32, _masked_mean, image_text_matching_loss, \
    itm_hard_negative_indices


def same_text_mask(ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """[B, B] True where texts i and j are identical (same real tokens, same length)."""
  ids = jnp.asarray(ids)
  if mask is not None:
    ids = jnp.where(jnp.asarray(mask).astype(bool), ids, -1)
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)


def itc_similarity(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """s[b, c] = max_k <image_embeds[b, k], text_embeds[c]>: [B, Q, E] x [C, E] -> [B, C].

  The max over queries is the same in both directions, so the text -> image similarities
  are s.T (LAVIS computes both). Inputs are unit-norm (QFormer.image_embeds/text_embeds).
  """
  img, txt = _f32(image_embeds, text_embeds)
  return jnp.max(jnp.einsum("bqe,ce->bcq", img, txt), axis=-1)


def _positives(b: int, positive_mask, valid):
  pos = jnp.eye(b, dtype=bool)
  if positive_mask is not None:
    pos = pos | jnp.asarray(positive_mask).astype(bool)
  return pos & valid[None, :]


def _soft_cross_entropy(logits, pos, col_valid, label_smoothing):
  """Row-wise CE against targets spread evenly over `pos`, smoothed over the valid columns
  C as torch does: (1 - eps) * target + eps / C."""
  logits = jnp.where(col_valid[None, :], logits, _NEG)
  logp = jax.nn.log_softmax(logits, axis=-1)
  posf = pos.astype(jnp.float32)
  target = posf / jnp.maximum(jnp.sum(posf, axis=-1, keepdims=True), 1.0)
  if label_smoothing:
    c = jnp.maximum(jnp.sum(col_valid.astype(jnp.float32)), 1.0)
    target = (1.0 - label_smoothing) * target + label_smoothing * col_valid[None, :] / c
  return -jnp.sum(jnp.where(col_valid[None, :], target * logp, 0.0), axis=-1)


def itc_loss(sim: jax.Array, temperature: jax.Array | float, *,
             positive_mask: jax.Array | None = None, valid: jax.Array | None = None,
             label_smoothing: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BLIP-2 image-text contrastive loss from `itc_similarity` [B, B] (image rows).

  logits = sim / temperature; targets: the diagonal plus `positive_mask` [B, B] (e.g.
  `same_text_mask`), spread evenly, label-smoothed; symmetric:
  (CE(image -> text) + CE(text -> image)) / 2, each a mean over valid anchors. `valid` [B]
  drops padded examples as anchors and candidates.

  Returns (loss, {"itc_i2t_accuracy", "itc_t2i_accuracy"}): the argmax lands on a positive.
  """
  sim, temperature = _f32(sim, temperature)
  b = sim.shape[0]
  if sim.shape != (b, b):
    raise ValueError(f"expected square similarities, got {sim.shape}")
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)
  logits = sim / temperature
  pos = _positives(b, positive_mask, valid)
  i2t = _soft_cross_entropy(logits, pos, valid, label_smoothing)
  t2i = _soft_cross_entropy(logits.T, pos.T, valid, label_smoothing)
  loss = 0.5 * (_masked_mean(i2t, valid) + _masked_mean(t2i, valid))

  def accuracy(lg, p):
    hit = jnp.take_along_axis(p, jnp.argmax(jnp.where(valid[None], lg, _NEG), -1)[:, None], 1)
    return jax.lax.stop_gradient(_masked_mean(hit[:, 0].astype(jnp.float32), valid))

  return loss, {"itc_i2t_accuracy": accuracy(logits, pos),
                "itc_t2i_accuracy": accuracy(logits.T, pos.T)}


class ItmNegatives(NamedTuple):
  """Hard negatives: a text per image and an image per text (indices into the global batch),
  and whether each is a real negative (False when a row had no admissible candidate)."""
  text_for_image: jax.Array
  image_for_text: jax.Array
  text_ok: jax.Array
  image_ok: jax.Array


def itm_negatives(sim_scaled: jax.Array, rng: jax.Array, *,
                  positive_mask: jax.Array | None = None, valid: jax.Array | None = None,
                  floor: float = 1e-4) -> ItmNegatives:
  """Samples BLIP-2's hard negatives from the scaled ITC similarities [B, B] (image rows).

  As LAVIS: per row, weights = softmax(row over the valid candidates) + floor, zero for the
  row's positives (the diagonal and `positive_mask`, e.g. identical reports) and padded
  candidates, then one draw proportional to the weights. Under stop-gradient.
  """
  sim = _f32(jax.lax.stop_gradient(sim_scaled))[0]
  b = sim.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)

  def weights(s):
    p = jax.nn.softmax(jnp.where(valid[None, :], s, _NEG), axis=-1)
    return jnp.log(p + floor)

  text_for_image, image_for_text = itm_hard_negative_indices(
      weights(sim), weights(sim.T), rng, positive_mask=positive_mask, valid=valid)
  pos = _positives(b, positive_mask, jnp.ones((b,), bool))
  ok = lambda idx, p: valid & valid[idx] & ~jnp.take_along_axis(p, idx[:, None], 1)[:, 0]
  return ItmNegatives(text_for_image, image_for_text, ok(text_for_image, pos),
                      ok(image_for_text, pos.T))


def itm_loss(logits_pos: jax.Array, logits_neg_image: jax.Array, logits_neg_text: jax.Array,
             *, negatives: ItmNegatives | None = None,
             valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy over 3B pairs, as LAVIS orders them: (image b, text b) label 1, (negative
  image for text b, text b) label 0, (image b, negative text for image b) label 0.

  logits_*: [B, 2] (QFormer.itm_logits). `negatives` drops pairs whose row had no real
  negative; `valid` drops padded examples. Mean over the remaining pairs.
  """
  b = logits_pos.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)
  img_ok = txt_ok = valid
  if negatives is not None:
    img_ok, txt_ok = valid & negatives.image_ok, valid & negatives.text_ok
  logits = jnp.concatenate([logits_pos, logits_neg_image, logits_neg_text], axis=0)
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  mask = jnp.concatenate([valid, img_ok, txt_ok])
  return image_text_matching_loss(logits, labels, mask)


def itg_loss(logits: jax.Array, ids: jax.Array, mask: jax.Array, *,
             label_smoothing: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Image-grounded text generation: next-token cross-entropy, label-smoothed, pads ignored.

  logits [B, T, V] of the text rows of a causal (UniLM) pass over [queries; [DEC] text];
  position t predicts ids[t + 1] (the [DEC] at 0 is never a target); mask [B, T] marks real
  tokens. As torch's CrossEntropyLoss(ignore_index, label_smoothing): mean over real target
  tokens of (1 - eps) * nll + eps * mean_v(-log p_v).

  Returns (loss, {"itg_accuracy", "itg_tokens"}).
  """
  (logits,) = _f32(logits)
  pred = logits[:, :-1]
  target = jnp.asarray(ids)[:, 1:].astype(jnp.int32)
  w = jnp.asarray(mask)[:, 1:].astype(bool)
  logp = jax.nn.log_softmax(pred, axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  loss = _masked_mean(nll, w)
  acc = (jnp.argmax(pred, axis=-1) == target).astype(jnp.float32)
  return loss, {"itg_accuracy": jax.lax.stop_gradient(_masked_mean(acc, w)),
                "itg_tokens": jnp.sum(w).astype(jnp.int32)}


__all__ = ["same_text_mask", "itc_similarity", "itc_loss", "ItmNegatives", "itm_negatives",
           "itm_loss", "itg_loss"]
