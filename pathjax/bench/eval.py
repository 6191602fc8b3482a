"""`pathjax bench eval`: feature-extraction throughput against the training forward pass.

Prints, for one model and one batch size, measured side by side in one run:

1. training forward: the jitted image tower (uint8 -> normalise -> ViT -> projection) on a
   device-resident batch, as inside a train step (no gradient);
2. evaluation extraction: `Embedder.image` on host uint8 batches (what every evaluation
   task runs: host-to-device copy, normalise, forward, projection, copy back, L2
   normalisation);
3. with `--data SPEC`: end to end `extract_features` over that dataset (image reading and
   decoding on threads included);

as images/s, and the ratio of each to the training forward rate (1.0 = evaluation costs
no more than the forward pass). Without `--model` a random ViT of `--variant` is written
to a temporary model directory, so the same loading code is measured.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def register(parser) -> None:
  parser.add_argument("--model", help="a model directory (default: a random ViT of --variant)")
  parser.add_argument("--variant", default="S/16", help="ViT variant without --model (default S/16)")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed batches per measurement")
  parser.add_argument("--data", help="also time extract_features end to end over this data spec")
  parser.add_argument("--workers", type=int, default=4, help="image-reading threads for --data")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")


def _random_model_dir(variant: str, image_size: int, out: str) -> str:
  import jax
  from pathjax.models.model_dir import abstract_params, save_model_dir
  from pathjax.models.vit import ViT
  vit = ViT.from_variant(variant, image_size=image_size)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, abstract_params("vit", vit))
  proj = (0.02 * rng.standard_normal((vit.width, 512))).astype(np.float32)
  return save_model_dir(out, {"vision": dict(kind="vit", module=vit, params=params, projection=proj)},
                        source=f"random ViT-{variant} (pathjax bench eval)")


def _rate(fn, n_images: int, steps: int) -> float:
  fn()  # compile / warm up
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return n_images * steps / (time.perf_counter() - t0)


def measure(model_dir: str, batch_size: int, steps: int, data: str | None = None, workers: int = 4,
            image_size: int | None = None, rounds: int = 3) -> dict[str, float]:
  import jax
  import jax.numpy as jnp
  from pathjax.evaluate import features as features_lib
  from pathjax.models.model_dir import IMAGENET_MEAN, IMAGENET_STD, load_model_dir

  model = load_model_dir(model_dir, towers=["vision"])
  size = image_size or model.image_size
  tower = model.towers["vision"]
  mean = jnp.asarray(model.preprocess.get("mean", IMAGENET_MEAN), jnp.float32) * 255.0
  std = jnp.asarray(model.preprocess.get("std", IMAGENET_STD), jnp.float32) * 255.0
  proj = tower.projection

  @jax.jit
  def train_forward(params, images):
    x = (images.astype(jnp.float32) - mean) / std
    f = tower.module.apply({"params": params}, x)["pooled"]
    return f if proj is None else f @ proj

  rng = np.random.default_rng(0)
  host = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  device = jax.device_put(host)
  embedder = features_lib.Embedder.from_model_dir(model)
  fwd_fn = lambda: train_forward(tower.params, device).block_until_ready()
  eval_fn = lambda: embedder.image(host)
  # Alternate the two measurements and keep each one's best round, so load from other
  # processes on a shared machine biases neither.
  forward = extraction = 0.0
  for _ in range(rounds):
    forward = max(forward, _rate(fwd_fn, batch_size, steps))
    extraction = max(extraction, _rate(eval_fn, batch_size, steps))
  out = {"forward_images_per_s": forward, "eval_images_per_s": extraction,
         "eval_to_forward": extraction / forward, "batch_size": float(batch_size), "image_size": float(size)}
  if data:
    from pathjax.evaluate import data as data_lib
    ds = data_lib.load_dataset(data)
    n = min(len(ds), batch_size * max(steps, 2))
    ds = ds.limit(n)
    features_lib.extract_features(ds.limit(batch_size), embedder, batch_size=batch_size, workers=workers,
                                  progress=False, report=None)
    t0 = time.perf_counter()
    features_lib.extract_features(ds, embedder, batch_size=batch_size, workers=workers, progress=False,
                                  report=None)
    e2e = len(ds) / (time.perf_counter() - t0)
    out.update(e2e_images_per_s=e2e, e2e_to_forward=e2e / forward)
  return out


def main(args) -> int:
  import jax
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = args.model or _random_model_dir(args.variant, args.image_size, os.path.join(tmp, "model"))
    r = measure(model_dir, args.batch_size, args.steps, args.data, args.workers,
                None if args.model else args.image_size, rounds=args.rounds)
  what = args.model or f"random ViT-{args.variant}"
  print(f"pathjax bench eval: {what}, batch {args.batch_size}, {int(r['image_size'])} px, "
        f"{args.rounds} x {args.steps} timed batches (best round), {jax.devices()[0].platform} x{jax.local_device_count()}")
  print(f"  training forward (device-resident uint8 batch): {r['forward_images_per_s']:9.1f} images/s")
  print(f"  eval feature extraction (host uint8 batches):   {r['eval_images_per_s']:9.1f} images/s"
        f"   ratio to forward {r['eval_to_forward']:.2f}")
  if "e2e_images_per_s" in r:
    print(f"  eval end to end over {args.data}: {r['e2e_images_per_s']:9.1f} images/s"
          f"   ratio to forward {r['e2e_to_forward']:.2f}")
  return 0
