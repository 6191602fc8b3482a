"""`pathjax bench embed-slides`: embed-slides patches/s against the encoder's bare forward rate.

Measured in one run on the same slides and the same fixed-shape batches:
1. `embed_slides` end to end (open, tissue mask, read and cut patches on a host thread,
   sharded forward, fetch, cast, write, markers, manifest): patches/s over the wall time of
   the whole call, and over each slide's read-and-embed time (without the tissue mask and
   the write);
2. the encoder alone: the same batches, already in host memory, through the same compiled
   function with the same dispatch pattern: patches/s.
The ratio (1)/(2) says how much of the encoder's speed the slide pipeline keeps (goal
>= 0.9). Without --model a random ViT of --variant is built into a temporary model
directory; without --slides synthetic slides are drawn.

  pathjax bench embed-slides                                  # ViT-S/16, 2 synthetic 4096 px slides, 20x
  pathjax bench embed-slides --model models/uni --slides 'slides/*.svs' --magnification 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from pathjax.bench import common


def register(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__
  parser.add_argument("--model", metavar="DIR", help="a model directory (default: a random ViT)")
  parser.add_argument("--variant", default="S/16", help="random ViT variant when no --model")
  parser.add_argument("--slides", metavar="GLOB", help="slides (default: synthetic)")
  parser.add_argument("--n-slides", type=int, default=2, help="synthetic slides to draw")
  parser.add_argument("--size", type=int, default=4096, help="synthetic slide side (40x px)")
  parser.add_argument("--magnification", type=float, default=20.0)
  parser.add_argument("--patch-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
  parser.add_argument("--work", metavar="DIR", help="keep slides and outputs here (default: a temp dir)")
  parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def _random_model(path: str, variant: str, image_size: int) -> str:
  import flax.linen as nn
  import jax

  from pathjax.models import model_dir as md
  from pathjax.models.vit import ViT
  vit = ViT.from_variant(variant, image_size=image_size, num_classes=0)
  params = jax.jit(vit.init)(jax.random.PRNGKey(0), np.zeros((1, image_size, image_size, 3), np.float32))
  return md.save_model_dir(path, {"vision": dict(kind="vit", module=vit, params=nn.unbox(params)["params"],
                                                 projection=None)}, source=f"random-vit-{variant}")


def run(args) -> dict[str, Any]:
  import jax

  from pathjax import embed_slides as es
  from pathjax.wsi import synth
  work = args.work or tempfile.mkdtemp(prefix="pathjax-bench-embed-slides-")
  os.makedirs(work, exist_ok=True)
  res: dict[str, Any] = {"machine": common.machine_line(), "magnification": args.magnification,
                         "patch_size": args.patch_size, "dtype": args.dtype}
  t0 = time.perf_counter()
  model = args.model or _random_model(os.path.join(work, "model"), args.variant, args.patch_size)
  if args.slides:
    slides: Any = args.slides
  else:
    slides = synth.write_synthetic_slides(os.path.join(work, "slides"), args.n_slides, size=args.size,
                                          magnifications=(5, 10, 20, 40), patch_size=args.patch_size,
                                          reports_name=None).slide_paths
  res["setup_seconds"] = time.perf_counter() - t0
  encoder = es.load_encoder(model, batch_size=args.batch_size, patch_size=args.patch_size)
  res.update(encoder=encoder.name, dim=encoder.dim, batch_size=encoder.batch_size,
             devices=encoder.in_sharding.mesh.size)
  zeros = np.zeros((encoder.batch_size, args.patch_size, args.patch_size, 3), np.uint8)
  common.block(encoder(zeros))  # compile outside both timings

  out = os.path.join(work, f"out-{int(time.time())}")
  t0 = time.perf_counter()
  result = es.embed_slides(model, out, magnification=args.magnification, slides=slides,
                           encoder=encoder, dtype=args.dtype, patch_size=args.patch_size,
                           progress=False, log=lambda s: None)
  wall = time.perf_counter() - t0
  manifest = result["manifest"]
  patches = manifest["counts"]["patches"]
  if not patches:
    raise SystemExit(f"no patches embedded; skipped: {manifest['skipped']['by_reason']}")
  res.update(slides=manifest["counts"]["slides_embedded"], patches=patches, embed_wall_s=wall,
             embed_read_and_embed_s=manifest["counts"]["embed_seconds"])

  # The same batches, in host memory, through the same compiled function.
  opts = es.EmbedOptions(magnification=args.magnification, patch_size=args.patch_size)
  batches = []
  for job in es.list_jobs(slides):
    try:
      plan = es.plan_slide(job.path, opts)
    except es.SkipSlide:
      continue
    batches += list(es.patch_batches(plan, encoder.batch_size))
  real = sum(r for _, r in batches)

  def forward_all():
    pending = []
    for b, _ in batches:
      pending.append(encoder(b))
      if len(pending) > 1:
        np.asarray(jax.device_get(pending.pop(0)))
    for p in pending:
      np.asarray(jax.device_get(p))
  res["forward_s"] = common.time_calls(forward_all, warmup=1, min_seconds=1.0, min_calls=2)
  res["forward_patches"] = real
  res["embed_patches_per_s"] = patches / wall
  res["embed_core_patches_per_s"] = patches / max(res["embed_read_and_embed_s"], 1e-9)
  res["forward_patches_per_s"] = real / res["forward_s"]
  res["ratio"] = res["embed_patches_per_s"] / res["forward_patches_per_s"]
  res["ratio_core"] = res["embed_core_patches_per_s"] / res["forward_patches_per_s"]
  return res


def report(res: dict[str, Any]) -> str:
  return "\n".join([
      res["machine"],
      f"encoder {res['encoder']} (dim {res['dim']}), {res['magnification']:g}x {res['patch_size']} px, "
      f"batch {res['batch_size']} over {res['devices']} device(s), {res['dtype']} output",
      f"slides {res['slides']}, patches {res['patches']} "
      f"({res['patches'] / res['batch_size']:.1f} batches' worth; last batch of each slide padded)",
      f"encoder forward alone (same batches in memory): {res['forward_patches_per_s']:9.1f} patches/s",
      f"embed-slides end to end (wall of the call):     {res['embed_patches_per_s']:9.1f} patches/s"
      f" = {res['ratio']:.2f} of the forward rate",
      f"embed-slides read+embed per slide (no mask/write): {res['embed_core_patches_per_s']:7.1f} patches/s"
      f" = {res['ratio_core']:.2f} of the forward rate",
  ])


def main(args) -> int:
  res = run(args)
  print(report(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0
