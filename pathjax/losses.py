"""Losses shared by the recipes: contrastive (softmax and sigmoid), CVTA, SimSiam, ITM.

Pure jax functions over global arrays. Under `jax.jit` the caller's arrays are sharded over
the mesh's batch axes and XLA inserts the cross-device communication; only
`chunked_sigmoid_contrastive` talks to the mesh itself (a ring of `ppermute`s inside
`jax.shard_map`), because its point is to control memory.

Conventions:
- Every loss computes in float32, whatever the input dtype (bf16 inputs are cast up); the
  gradients come back in the input dtype.
- `logit_scale` is the multiplier applied to cosine similarities, already exponentiated
  (CLIP: `exp(t)` with `t` learnable, clipped at 100; BLIP-2: `1 / temp`; PathFLIP's
  sigmoid loss: the raw `s`). Embeddings are L2-normalised by the caller.
- Masks are boolean (or 0/1) with True = a real example; padded examples contribute neither
  as anchors nor as negatives, and means are taken over the real ones.
- Meshes have Auto axis types (the project's convention, see `pathjax.sharding`); under
  Explicit axes only `chunked_sigmoid_contrastive` works as is.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

_NEG = -1e30  # "minus infinity" that keeps arithmetic finite (no inf - inf, no 0 * inf)


def _f32(*xs):
  return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """x / max(||x||, eps) along `axis`, in float32."""
  x = jnp.asarray(x).astype(jnp.float32)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(x)
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------------------
# Softmax (CLIP InfoNCE) contrastive
# ----------------------------------------------------------------------------------------


def _smoothed_cross_entropy(logits, col_valid, label_smoothing):
  """Row-wise CE of `logits` [N, M] with target column i for row i (diagonal positives).

  Label smoothing follows torch's convention over the valid columns C:
  target = (1 - eps) * onehot + eps / C.
  """
  logits = jnp.where(col_valid[None, :], logits, _NEG)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.diagonal(logp)
  if label_smoothing:
    c = jnp.maximum(jnp.sum(col_valid.astype(jnp.float32)), 1.0)
    smooth = -jnp.sum(jnp.where(col_valid[None, :], logp, 0.0), axis=-1) / c
    nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
  return nll


def softmax_contrastive_from_logits(logits: jax.Array,
                                    logits_t2i: jax.Array | None = None,
                                    *,
                                    label_smoothing: float = 0.0,
                                    valid: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE from precomputed logits [B, B] (image rows, text columns).

  Positives are on the diagonal. `logits_t2i` (text rows, image columns) defaults to
  `logits.T`; pass it when the two directions differ (e.g. BLIP-2's max over queries is
  the same either way, but a recipe may score them differently). `valid` [B] masks padded
  examples out of both the anchors and the negatives.

  Returns (CE(image -> text) + CE(text -> image)) / 2, each averaged over valid anchors.
  """
  (logits,) = _f32(logits)
  logits_t2i = logits.T if logits_t2i is None else _f32(logits_t2i)[0]
  b = logits.shape[0]
  if logits.shape != (b, b) or logits_t2i.shape != (b, b):
    raise ValueError(f"expected square logits, got {logits.shape} and {logits_t2i.shape}")
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)
  i2t = _smoothed_cross_entropy(logits, valid, label_smoothing)
  t2i = _smoothed_cross_entropy(logits_t2i, valid, label_smoothing)
  return 0.5 * (_masked_mean(i2t, valid) + _masked_mean(t2i, valid))


def softmax_contrastive(img: jax.Array, txt: jax.Array, logit_scale: jax.Array | float, *,
                        label_smoothing: float = 0.0,
                        valid: jax.Array | None = None) -> jax.Array:
  """CLIP InfoNCE: symmetric cross-entropy over the global batch.

  img, txt: [B, D] L2-normalised embeddings of the global batch (pairs share an index).
  logit_scale: the multiplier (already exponentiated). valid: optional [B] mask.

  Under jit with img/txt sharded over the batch axes, XLA all-gathers the text (and image)
  embeddings, O(B_global * D) per device, and the [B, B] logits are sharded over their rows,
  so each device holds O(B_global^2 / devices) logits (the column-wise softmax of the
  text -> image direction becomes a cross-device reduction). For global batches where that
  is too much use the sigmoid loss with `chunked_sigmoid_contrastive`.
  """
  img, txt, logit_scale = _f32(img, txt, logit_scale)
  logits = logit_scale * img @ txt.T
  return softmax_contrastive_from_logits(logits, label_smoothing=label_smoothing, valid=valid)


# ----------------------------------------------------------------------------------------
# Sigmoid (SigLIP) contrastive
# ----------------------------------------------------------------------------------------


def sigmoid_loss_from_logits(logits: jax.Array, labels: jax.Array,
                             mask: jax.Array | None = None,
                             normalizer: jax.Array | float | None = None) -> jax.Array:
  """-sum(log sigmoid(labels * logits) * mask) / normalizer.

  labels in {+1, -1}; mask (optional, same shape or broadcastable) zeroes pairs out;
  normalizer defaults to logits.shape[0] (SigLIP divides by the number of images).
  PathFLIP's text-conditioned region loss is this with its own [B, K + B - 1] labels.
  """
  logits, labels = _f32(logits, labels)
  nll = -jax.nn.log_sigmoid(labels * logits)
  if mask is not None:
    nll = jnp.where(jnp.broadcast_to(jnp.asarray(mask).astype(bool), nll.shape), nll, 0.0)
  if normalizer is None:
    normalizer = logits.shape[0]
  return jnp.sum(nll) / normalizer


def sigmoid_contrastive(img: jax.Array, txt: jax.Array, logit_scale: jax.Array | float,
                        logit_bias: jax.Array | float, *,
                        valid: jax.Array | None = None) -> jax.Array:
  """SigLIP loss over the global batch: -1/B sum_ij log sigmoid(y_ij (s <x_i, t_j> + b)).

  y_ij = +1 on the diagonal, -1 elsewhere. img, txt: [B, D] L2-normalised. valid: optional
  [B] mask; pairs with a padded image or text are dropped and B counts real examples. The
  [B, B] logits are materialised (sharded by XLA under jit); see
  `chunked_sigmoid_contrastive` for the memory-bounded form.
  """
  img, txt, logit_scale, logit_bias = _f32(img, txt, logit_scale, logit_bias)
  logits = logit_scale * img @ txt.T + logit_bias
  b = img.shape[0]
  labels = 2.0 * jnp.eye(b, txt.shape[0], dtype=jnp.float32) - 1.0
  if valid is None:
    return sigmoid_loss_from_logits(logits, labels, normalizer=b)
  valid = jnp.asarray(valid).astype(bool)
  return sigmoid_loss_from_logits(logits, labels, valid[:, None] & valid[None, :],
                                  normalizer=jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32))


def _axes_tuple(batch_axes) -> tuple[str, ...]:
  if batch_axes is None:
    return ()
  if isinstance(batch_axes, str):
    return (batch_axes,)
  return tuple(batch_axes)


def _ring_perm(n: int):
  # Device i sends to i + 1: after k shifts device d holds the chunk that started on d - k.
  return [(i, (i + 1) % n) for i in range(n)]


def _sig_block(x, t, vx, vt, s, bias, positive: bool):
  """Raw similarities, logits, labels and pair mask of one [b, b] block."""
  raw = x @ t.astype(jnp.float32).T  # text chunks travel in their input dtype (less traffic)
  z = s * raw + bias
  if positive:
    y = 2.0 * jnp.eye(x.shape[0], t.shape[0], dtype=jnp.float32) - 1.0
  else:
    y = -jnp.ones_like(z)
  return raw, z, y, (vx[:, None] * vt[None, :])


def _ring_normalizer(vx, axes):
  return jnp.maximum(jax.lax.psum(jnp.sum(vx), axes), 1.0)


def _ring_forward(x, t, vx, vt, s, bias, *, axes, n):
  x, vx, vt, s, bias = _f32(x, vx, vt, s, bias)

  def nll(t, vt, positive):
    _, z, y, m = _sig_block(x, t, vx, vt, s, bias, positive)
    return -jnp.sum(jax.nn.log_sigmoid(y * z) * m)

  def body(_, carry):
    t, vt, total = carry
    t, vt = jax.lax.ppermute((t, vt), axes, _ring_perm(n))
    return t, vt, total + nll(t, vt, False)

  total = nll(t, vt, True)
  _, _, total = jax.lax.fori_loop(1, n, body, (t, vt, total))
  return jax.lax.psum(total, axes) / _ring_normalizer(vx, axes)


def _ring_backward(x, t, vx, vt, s, bias, g, *, axes, n):
  """Gradients of `_ring_forward` by a second ring pass; the text gradient travels with t."""
  in_dtypes = (x.dtype, t.dtype)
  x, vx, vt, s, bias, g = _f32(x, vx, vt, s, bias, g)
  coef = g / _ring_normalizer(vx, axes)

  def block(t, vt, positive):
    raw, z, y, m = _sig_block(x, t, vx, vt, s, bias, positive)
    dz = coef * m * (-y) * jax.nn.sigmoid(-y * z)  # d/dz of -log sigmoid(y z), times upstream
    return s * (dz @ t.astype(jnp.float32)), s * (dz.T @ x), jnp.sum(dz * raw), jnp.sum(dz)

  def body(_, carry):
    t, vt, dt, dx, ds, db = carry
    t, vt, dt = jax.lax.ppermute((t, vt, dt), axes, _ring_perm(n))
    dx_k, dt_k, ds_k, db_k = block(t, vt, False)
    return t, vt, dt + dt_k, dx + dx_k, ds + ds_k, db + db_k

  dx, dt, ds, db = block(t, vt, True)
  _, _, dt, dx, ds, db = jax.lax.fori_loop(1, n, body, (t, vt, dt, dx, ds, db))
  dt = jax.lax.ppermute(dt, axes, _ring_perm(n))  # the n-th shift brings it home
  return (dx.astype(in_dtypes[0]), dt.astype(in_dtypes[1]),
          jax.lax.psum(ds, axes), jax.lax.psum(db, axes))


def chunked_sigmoid_contrastive(img: jax.Array, txt: jax.Array,
                                logit_scale: jax.Array | float,
                                logit_bias: jax.Array | float, *,
                                mesh: Mesh,
                                batch_axes: str | Sequence[str] | None,
                                valid: jax.Array | None = None) -> jax.Array:
  """`sigmoid_contrastive`'s value and gradients, computed as a ring over the batch axes.

  Each device keeps its image chunk [b, D] (b = B / n, n = product of the batch axes'
  sizes) and the text chunks travel around the ring with `ppermute`; at step k the device
  scores its images against the texts that started k devices back, so only step 0 holds
  positives. The backward pass (a custom VJP) runs the ring again, carrying each text
  chunk's gradient along with it, and a last shift brings that gradient home. Per-device
  memory is O(b * D + b^2), independent of the global batch (plain autodiff of the ring
  would save every step's [b, b] block, O(B * b)); compute equals the unchunked loss, and
  on TPU/GPU the shifts overlap with the block matmuls. This is big_vision's SigLIP
  "chunked" loss.

  img, txt: [B, D] global arrays (B divisible by n), L2-normalised. valid: optional [B]
  mask as in `sigmoid_contrastive`. batch_axes: a mesh axis name or a tuple of them (the
  "act_batch" rule), e.g. ("data", "fsdp"); mesh axes not named (tensor parallel) see
  replicated inputs. Callable inside or outside jit.
  """
  axes = _axes_tuple(batch_axes)
  n = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if n == 1:
    return sigmoid_contrastive(img, txt, logit_scale, logit_bias, valid=valid)
  if img.shape[0] % n or txt.shape[0] != img.shape[0]:
    raise ValueError(f"batch {img.shape[0]} (texts {txt.shape[0]}) must be equal and "
                     f"divisible by the {n} devices of batch axes {axes}")
  vmask = (jnp.ones((img.shape[0],), jnp.float32) if valid is None
           else jnp.asarray(valid).astype(jnp.float32))
  row, vec = P(axes, None), P(axes)
  fwd = jax.shard_map(functools.partial(_ring_forward, axes=axes, n=n), mesh=mesh,
                      in_specs=(row, row, vec, vec, P(), P()), out_specs=P())
  bwd = jax.shard_map(functools.partial(_ring_backward, axes=axes, n=n), mesh=mesh,
                      in_specs=(row, row, vec, vec, P(), P(), P()),
                      out_specs=(row, row, P(), P()))

  @jax.custom_vjp
  def loss(x, t, v, s, bias):
    return fwd(x, t, v, v, s, bias)

  def loss_fwd(x, t, v, s, bias):
    return fwd(x, t, v, v, s, bias), (x, t, v, s, bias)

  def loss_bwd(res, g):
    x, t, v, s, bias = res
    dx, dt, ds, db = bwd(x, t, v, v, s, bias, g)
    return dx, dt, jnp.zeros_like(v), ds.astype(s.dtype), db.astype(bias.dtype)

  loss.defvjp(loss_fwd, loss_bwd)
  scale = jnp.asarray(logit_scale, jnp.result_type(logit_scale))
  bias = jnp.asarray(logit_bias, jnp.result_type(logit_bias))
  if any(mesh.axis_types[mesh.axis_names.index(a)] == AxisType.Explicit for a in axes):
    # Explicit-axes meshes (jax.make_mesh's default) need inputs already laid out as the
    # shard_map in_specs say; Auto meshes reshard implicitly.
    put = lambda x, spec: jax.reshard(x, NamedSharding(mesh, spec))
    img, txt, vmask = put(img, row), put(txt, row), put(vmask, vec)
    scale, bias = put(scale, P()), put(bias, P())
  return loss(img, txt, vmask, scale, bias)


# ----------------------------------------------------------------------------------------
# CVTA: cross-resolution vision-text alignment (MR-PLIP)
# ----------------------------------------------------------------------------------------


def cvta_loss(v: jax.Array, w: jax.Array, w_mask: jax.Array, *, k: int,
              temperature: jax.Array | float, negatives: str = "bag",
              v_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Multi-positive InfoNCE between each patch of a bag and the bag's text items.

  v: [B, L, D] normalised visual features of each bag's L patches (one per magnification on
  the sampled chain, or the whole bag). w: [B, K, D] normalised keyword (or caption)
  embeddings of each bag's text bag, w_mask [B, K] marking real ones. v_mask: optional
  [B, L] marking real patches. temperature: T (logits = cos / T).

    L_bag = -(1/L) sum_a (1/k) sum_{p in topk(a)} log( exp(v_a.w_p/T) / sum_{b'} exp(v_a.w_b'/T) )

  Positives topk(a): the k valid keywords of the bag most similar to v_a, chosen under
  stop-gradient (gradients flow into the chosen similarities, not into the choice).
  Denominator: the bag's valid keywords (`negatives='bag'`, the paper's form) or every
  valid keyword of the global batch (`'global'`: the bag's own plus all other bags').
  Bags with fewer than k + 1 valid keywords (or no valid patch) are masked out; the loss is
  the mean over the remaining bags.

  Returns (loss, {"cvta_valid_bags", "cvta_masked_bags", "cvta_pos_prob"}). With 'global'
  the [B, L, B * K] logits are materialised (row-sharded under jit).
  """
  if negatives not in ("bag", "global"):
    raise ValueError(f"negatives must be 'bag' or 'global', got {negatives!r}")
  v, w, temperature = _f32(v, w, temperature)
  bsz, num_l, _ = v.shape
  num_k = w.shape[1]
  if k < 1 or k >= num_k:
    raise ValueError(f"k={k} needs at least k + 1 keyword slots, have {num_k}")
  w_mask = jnp.asarray(w_mask).astype(bool)
  v_mask = (jnp.ones((bsz, num_l), bool) if v_mask is None
            else jnp.asarray(v_mask).astype(bool))

  own = jnp.einsum("bld,bkd->blk", v, w) / temperature                   # [B, L, K]
  own = jnp.where(w_mask[:, None, :], own, _NEG)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(own), k)                   # [B, L, k]
  pos = jnp.take_along_axis(own, idx, axis=-1)                            # [B, L, k]
  if negatives == "bag":
    lse = jax.nn.logsumexp(own, axis=-1)
  else:
    allw = w.reshape(bsz * num_k, -1)
    glob = jnp.einsum("bld,nd->bln", v, allw) / temperature               # [B, L, B*K]
    glob = jnp.where(w_mask.reshape(-1)[None, None, :], glob, _NEG)
    lse = jax.nn.logsumexp(glob, axis=-1)
  per_patch = -jnp.mean(pos - lse[..., None], axis=-1)                    # [B, L]

  n_valid_kw = jnp.sum(w_mask, axis=-1)
  bag_ok = (n_valid_kw >= k + 1) & jnp.any(v_mask, axis=-1)               # [B]
  patch_ok = v_mask & bag_ok[:, None]
  per_patch = jnp.where(patch_ok, per_patch, 0.0)
  per_bag = jnp.sum(per_patch, axis=-1) / jnp.maximum(jnp.sum(patch_ok, axis=-1), 1)
  n_bags = jnp.sum(bag_ok)
  loss = jnp.sum(jnp.where(bag_ok, per_bag, 0.0)) / jnp.maximum(n_bags, 1)
  pos_prob = jnp.sum(jnp.where(patch_ok[..., None], jnp.exp(pos - lse[..., None]), 0.0))
  metrics = {
      "cvta_valid_bags": n_bags.astype(jnp.int32),
      "cvta_masked_bags": (bsz - n_bags).astype(jnp.int32),
      # mean probability mass of one positive (chance is 1 / #keywords in the denominator)
      "cvta_pos_prob": jax.lax.stop_gradient(
          pos_prob / jnp.maximum(jnp.sum(patch_ok) * k, 1)),
  }
  return loss, metrics


# ----------------------------------------------------------------------------------------
# SimSiam (MR-PLIP's MRTVA)
# ----------------------------------------------------------------------------------------


def negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
  """D(p, z) = -<p/|p|, sg(z)/|z|> along the last axis (stop-gradient on z)."""
  z = jax.lax.stop_gradient(z)
  return -jnp.sum(l2_normalize(p) * l2_normalize(z), axis=-1)


def simsiam_loss(p1: jax.Array, z2: jax.Array, p2: jax.Array, z1: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
  """1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)), D = negative cosine, mean over examples.

  p = predictor outputs, z = projector outputs, [..., D]; mask [...] selects real pairs.
  In [-1, 1]; -1 when predictions align perfectly.
  """
  d = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
  return _masked_mean(d, None if mask is None else jnp.asarray(mask))


# ----------------------------------------------------------------------------------------
# Image-text matching (BLIP-2 / mPLUG)
# ----------------------------------------------------------------------------------------


def itm_hard_negative_indices(sim_i2t: jax.Array, sim_t2i: jax.Array, rng: jax.Array, *,
                              positive_mask: jax.Array | None = None,
                              valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One hard negative text per image and one hard negative image per text.

  sim_i2t [B, B] (image rows, text columns) and sim_t2i [B, B] (text rows, image columns)
  are the scaled ITC similarities over the global batch. Each row samples from
  softmax(sim) with its positive (the diagonal, plus `positive_mask` [B, B] entries, e.g.
  other captions of the same slide, True = also a positive) and padded candidates (`valid`
  [B] False) given probability zero. Sampling is under stop-gradient.

  Returns (neg_text_for_image [B], neg_image_for_text [B]) int32 indices. A row with no
  admissible candidate (B = 1) gets its own index.
  """
  sim_i2t, sim_t2i = _f32(jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i))
  b = sim_i2t.shape[0]
  excl = jnp.eye(b, dtype=bool)
  if positive_mask is not None:
    excl = excl | jnp.asarray(positive_mask).astype(bool)
  excl_t2i = excl.T
  if valid is not None:
    invalid = ~jnp.asarray(valid).astype(bool)
    excl = excl | invalid[None, :]
    excl_t2i = excl_t2i | invalid[None, :]
  r1, r2 = jax.random.split(rng)

  def sample(key, sim, ex):
    logits = jnp.where(ex, -jnp.inf, sim)
    idx = jax.random.categorical(key, logits, axis=-1)
    return jnp.where(jnp.all(ex, axis=-1), jnp.arange(b), idx).astype(jnp.int32)

  return sample(r1, sim_i2t, excl), sample(r2, sim_t2i, excl_t2i)


def image_text_matching_loss(logits: jax.Array, labels: jax.Array,
                             mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Cross-entropy of ITM logits [N, 2] against labels [N] (1 = matching pair).

  Returns (loss, {"itm_accuracy"}).
  """
  (logits,) = _f32(logits)
  labels = jnp.asarray(labels).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  acc = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  m = None if mask is None else jnp.asarray(mask)
  return _masked_mean(nll, m), {"itm_accuracy": jax.lax.stop_gradient(_masked_mean(acc, m))}


def masked_token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean token cross-entropy over `mask` [B, T] of logits [B, T, V] against targets [B, T]
  (the caller aligns position t with the token it predicts). Returns (loss, accuracy, tokens),
  the accuracy under stop-gradient."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  w = jnp.asarray(mask).astype(jnp.float32)
  count = jnp.sum(w)
  n = jnp.maximum(count, 1.0)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(ce * w) / n, jax.lax.stop_gradient(jnp.sum(correct * w) / n), count


__all__ = [
    "l2_normalize", "softmax_contrastive", "softmax_contrastive_from_logits",
    "sigmoid_contrastive", "sigmoid_loss_from_logits", "chunked_sigmoid_contrastive",
    "cvta_loss", "negative_cosine", "simsiam_loss", "itm_hard_negative_indices",
    "image_text_matching_loss", "masked_token_cross_entropy",
]
