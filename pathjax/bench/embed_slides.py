"""`pathjax bench embed-slides`: embed-slides patches/s against the encoder's bare forward rate.

Measured in one run on the same slides and the same fixed-shape batches:
1. `embed_slides` end to end (open, tissue mask, read and cut patches on a host thread,
   sharded forward, fetch, cast, write, markers, manifest): patches/s over the wall time of
   the whole call;
2. the encoder alone: the same batches, already in host memory, through the same compiled
   function with the same dispatch pattern: patches/s;
3. the host side alone (plans and patch batches, no encoder): patches/s.
The ratio (1)/(2) says how much of the encoder's speed the slide pipeline keeps (goal
>= 0.9). Forward and embed runs alternate (F E F E F) and each embed run is compared with
the forward runs on either side, so a shared machine's changing load shows in the spread. Without --model a random ViT of --variant is built into a temporary model
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
  parser.add_argument("--rounds", type=int, default=2,
                      help="embed runs, each between two forward runs (the ratio is their median)")
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

  def embed_once(k):
    out = os.path.join(work, f"out-{os.getpid()}-{k}")
    t0 = time.perf_counter()
    result = es.embed_slides(model, out, magnification=args.magnification, slides=slides,
                             encoder=encoder, dtype=args.dtype, patch_size=args.patch_size,
                             progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    manifest = result["manifest"]
    if not manifest["counts"]["patches"]:
      raise SystemExit(f"no patches embedded; skipped: {manifest['skipped']['by_reason']}")
    return wall, manifest

  # The same batches, in host memory, through the same compiled function; collecting them
  # times the host side alone (tissue mask, reads, cutting, batching).
  opts = es.EmbedOptions(magnification=args.magnification, patch_size=args.patch_size)
  jobs = es.list_jobs(slides)
  try:  # imports (scipy, tiffslide) and first file opens happen here, outside every timing
    next(es.patch_batches(es.plan_slide(jobs[0].path, opts), encoder.batch_size), None)
  except es.SkipSlide:
    pass
  batches = []
  t0 = time.perf_counter()
  for job in jobs:
    try:
      plan = es.plan_slide(job.path, opts)
    except es.SkipSlide:
      continue
    batches += list(es.patch_batches(plan, encoder.batch_size))
  res["host_read_s"] = time.perf_counter() - t0
  real = sum(r for _, r in batches)

  def forward_all():
    pending = []
    for b, _ in batches:
      pending.append(encoder(b))
      if len(pending) > 1:
        np.asarray(jax.device_get(pending.pop(0)))
    for p in pending:
      np.asarray(jax.device_get(p))

  def forward_once():
    return common.time_calls(forward_all, warmup=0, min_seconds=0.0, min_calls=1)

  # Forward and embed alternate (F E F E ... F), so a change in machine load between the
  # measurements shows up instead of biasing the ratio; each embed is compared with the mean
  # of the forward runs on either side of it.
  forward_all()  # warm up
  forwards, embeds = [forward_once()], []
  for k in range(args.rounds):
    wall, manifest = embed_once(k)
    embeds.append(wall)
    forwards.append(forward_once())
  patches = manifest["counts"]["patches"]
  if patches != real:
    raise SystemExit(f"embed-slides embedded {patches} patches, the forward batches hold {real}")
  res.update(slides=manifest["counts"]["slides_embedded"], patches=patches,
             embed_wall_s=embeds, forward_s=forwards,
             embed_read_and_embed_s=manifest["counts"]["embed_seconds"])
  ratios = [(patches / e) / (real / ((forwards[k] + forwards[k + 1]) / 2))
            for k, e in enumerate(embeds)]
  res["ratios"] = ratios
  res["ratio"] = float(np.median(ratios))
  res["embed_patches_per_s"] = patches / float(np.median(embeds))
  res["forward_patches_per_s"] = real / float(np.median(forwards))
  res["host_read_patches_per_s"] = real / res["host_read_s"]
  res["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return res


def report(res: dict[str, Any]) -> str:
  n = res["patches"]
  fwd_runs = ", ".join(f"{n / t:.1f}" for t in res["forward_s"])
  emb_runs = ", ".join(f"{n / t:.1f}" for t in res["embed_wall_s"])
  return "\n".join([
      res["machine"] + f" (load average after: {res['load_after']:.2f})",
      f"encoder {res['encoder']} (dim {res['dim']}), {res['magnification']:g}x {res['patch_size']} px, "
      f"batch {res['batch_size']} over {res['devices']} device(s), {res['dtype']} output",
      f"slides {res['slides']}, patches {res['patches']} (last batch of each slide padded)",
      f"host side alone (mask, reads, batching):   {res['host_read_patches_per_s']:9.1f} patches/s",
      f"encoder forward alone (same batches):      {res['forward_patches_per_s']:9.1f} patches/s "
      f"(runs: {fwd_runs})",
      f"embed-slides end to end (wall of the call): {res['embed_patches_per_s']:8.1f} patches/s "
      f"(runs: {emb_runs})",
      f"embed-slides / forward: {res['ratio']:.2f} (median of {len(res['ratios'])}: "
      f"{', '.join(f'{r:.2f}' for r in res['ratios'])}; goal >= 0.9)",
  ])


def main(args) -> int:
  res = run(args)
  print(report(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0
