"""`pathjax bench encoders`: ViT forward / forward+backward throughput, side by side.

Measured in one run: the jax fp32 matmul peak (4096^3), the pathjax ViT (default B/16 at
224 px, batch 8, fp32) forward and forward+backward in images/s and achieved GFLOP/s, their
ratio to the matmul peak, and, when torch and timm import, the same model in timm (torch
using every core) and the ratio pathjax/timm.

FLOPs: the analytic count of the ViT's matmuls (2 per multiply-add; forward+backward = 3x
forward), which GFLOP/s figures use. XLA's cost analysis of the compiled functions is printed
beside it with --no-scan (with scan, XLA counts the scanned layer body once). timm's GFLOP/s uses the same FLOP counts
(the same model), so the GFLOP/s ratio equals the images/s ratio.

  pathjax bench encoders                      # ViT-B/16, 224 px, batch 8
  pathjax bench encoders --variant S/16 --batch-size 16 --iters 10 --no-timm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

from pathjax.bench import common


def register(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--iters", type=int, default=5, help="timed iterations per measurement")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--matmul-size", type=int, default=4096)
  parser.add_argument("--no-scan", dest="scan", action="store_false",
                      help="unrolled layers instead of nn.scan")
  parser.add_argument("--no-timm", dest="timm", action="store_false",
                      help="skip the timm reference even when torch and timm import")
  parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def _time(fn: Callable[[], Any], iters: int, warmup: int) -> float:
  """Median seconds per call (fn blocks until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def analytic_vit_flops(model, batch: int, image_size: int) -> float:
  """Forward FLOPs of the ViT's matmuls (2 per multiply-add), all images."""
  p, d, m = model.patch_size, model.width, model.mlp_dim
  n = (image_size // p) ** 2
  t = n + int(model.class_token) + model.reg_tokens
  mlp_in = 2 * m if model.mlp_activation == "swiglu" else m
  per_layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * t * d * mlp_in + 2 * t * m * d
  return batch * (2 * n * p * p * 3 * d + model.depth * per_layer)


def matmul_peak(n: int) -> float:
  """GFLOP/s of an n^3 fp32 matmul (pathjax.bench.common)."""
  return common.matmul_peak_flops(n=n) / 1e9


def bench_pathjax(variant: str, batch: int, image_size: int, iters: int, warmup: int,
                  scan: bool) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from pathjax.models.vit import ViT
  model = ViT.from_variant(variant, image_size=image_size, num_classes=0, scan=scan)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, image_size, image_size, 3), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])
  import flax.linen as nn
  params = nn.unbox(params)

  fwd = jax.jit(lambda p, x: model.apply(p, x)["pooled"])

  def loss(p, x):
    return jnp.mean(model.apply(p, x)["pooled"] ** 2)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  fwd_c = fwd.lower(params, x).compile()
  bwd_c = fwd_bwd.lower(params, x).compile()
  t_fwd = _time(lambda: fwd_c(params, x).block_until_ready(), iters, warmup)
  t_bwd = _time(lambda: jax.block_until_ready(bwd_c(params, x)), iters, warmup)
  analytic = analytic_vit_flops(model, batch, image_size)
  return {"fwd_s": t_fwd, "fwd_bwd_s": t_bwd, "fwd_flops_xla": common.compiled_flops(fwd_c),
          "fwd_bwd_flops_xla": common.compiled_flops(bwd_c), "fwd_flops_analytic": analytic,
          "fwd_bwd_flops_analytic": 3 * analytic}


def timm_available() -> bool:
  try:
    import timm  # noqa: F401
    import torch  # noqa: F401
  except Exception:  # noqa: BLE001 - broken installs count as absent
    return False
  return True


def torch_matmul_peak(n: int) -> float:
  """GFLOP/s of an n^3 fp32 torch matmul (every core), timed like the jax one."""
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  a, b = torch.randn(n, n), torch.randn(n, n)
  return 2.0 * n ** 3 / common.time_calls(lambda: torch.matmul(a, b)) / 1e9


def bench_timm(variant: str, batch: int, image_size: int, iters: int, warmup: int) -> dict[str, Any]:
  import torch
  from timm.models.vision_transformer import VisionTransformer

  from pathjax.models.vit import variant_fields
  torch.set_num_threads(os.cpu_count() or 1)
  f = variant_fields(variant)
  model = VisionTransformer(img_size=image_size, patch_size=f["patch_size"], embed_dim=f["width"],
                            depth=f["depth"], num_heads=f["num_heads"],
                            mlp_ratio=f["mlp_dim"] / f["width"], num_classes=0)
  x = torch.randn(batch, 3, image_size, image_size)

  def fwd():
    model.eval()
    with torch.no_grad():
      model(x)

  def fwd_bwd():
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    loss.backward()
  return {"fwd_s": _time(fwd, iters, warmup), "fwd_bwd_s": _time(fwd_bwd, iters, warmup),
          "threads": torch.get_num_threads(), "torch": torch.__version__}


def _load() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def run(args) -> dict[str, Any]:
  import jax
  load_before = _load()
  res: dict[str, Any] = {"variant": args.variant, "image_size": args.image_size,
                         "batch_size": args.batch_size, "dtype": "float32",
                         "backend": jax.default_backend(), "devices": jax.device_count(),
                         "cpu_count": os.cpu_count(), "scan": args.scan,
                         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  res["matmul_gflops"] = matmul_peak(args.matmul_size)
  res["pathjax"] = bench_pathjax(args.variant, args.batch_size, args.image_size, args.iters,
                                 args.warmup, args.scan)
  if args.timm and timm_available():
    res["timm"] = bench_timm(args.variant, args.batch_size, args.image_size, args.iters,
                             args.warmup)
    res["torch_matmul_gflops"] = torch_matmul_peak(args.matmul_size)
  res["load_avg_before"], res["load_avg_after"] = load_before, _load()
  return res


def report(res: dict[str, Any]) -> str:
  b = res["batch_size"]
  pj = res["pathjax"]
  peak = res["matmul_gflops"]
  lines = [f"ViT-{res['variant']} {res['image_size']}px batch {b} {res['dtype']} on "
           f"{res['backend']} ({res['cpu_count']} cores; load avg before/after "
           f"{res['load_avg_before']} / {res['load_avg_after']})",
           f"jax matmul {res.get('matmul_size', '')}fp32 peak: {peak:8.1f} GFLOP/s"]
  fl = {"fwd": pj["fwd_flops_analytic"], "fwd_bwd": pj["fwd_bwd_flops_analytic"]}
  if res["scan"]:
    xla = "n/a with scan (XLA counts the scanned layer once; --no-scan shows it)"
  else:
    xla = (f"fwd {(pj['fwd_flops_xla'] or 0) / 1e9:.1f} G, fwd+bwd "
           f"{(pj['fwd_bwd_flops_xla'] or 0) / 1e9:.1f} G")
  lines.append(f"FLOPs per batch (analytic matmul count; fwd+bwd = 3x fwd): fwd "
               f"{fl['fwd'] / 1e9:.1f} G, fwd+bwd {fl['fwd_bwd'] / 1e9:.1f} G; XLA cost "
               f"analysis: {xla}")
  lines.append(f"{'':10s} {'pass':8s} {'img/s':>8s} {'GFLOP/s':>9s} {'of peak':>8s}")
  for name in ("fwd", "fwd_bwd"):
    ips = b / pj[f"{name}_s"]
    gf = fl[name] / pj[f"{name}_s"] / 1e9
    lines.append(f"{'pathjax':10s} {name:8s} {ips:8.2f} {gf:9.1f} {gf / peak:8.0%}")
  if "timm" in res:
    tm = res["timm"]
    for name in ("fwd", "fwd_bwd"):
      ips = b / tm[f"{name}_s"]
      gf = fl[name] / tm[f"{name}_s"] / 1e9
      lines.append(f"{'timm':10s} {name:8s} {ips:8.2f} {gf:9.1f} {gf / peak:8.0%}")
    for name in ("fwd", "fwd_bwd"):
      lines.append(f"pathjax / timm {name}: {tm[f'{name}_s'] / pj[f'{name}_s']:.2f}x")
    lines.append(f"(timm: torch {tm['torch']}, {tm['threads']} threads)")
    # Both run the same FLOPs, almost all in fp32 GEMMs: neither can beat the GEMM rate.
    ceiling = max(peak, res.get("torch_matmul_gflops", 0.0))
    timm_gf = fl["fwd_bwd"] / tm["fwd_bwd_s"] / 1e9
    lines.append(f"GEMM ceiling: torch matmul {res.get('torch_matmul_gflops', 0.0):.1f} GFLOP/s, jax "
                 f"{peak:.1f}; timm fwd+bwd runs at {timm_gf / ceiling:.0%} of the faster one, so "
                 f"1.3x timm would need {1.3 * timm_gf:.1f} GFLOP/s = {1.3 * timm_gf / ceiling:.0%} of it")
  else:
    lines.append("timm reference: not run (torch+timm not importable, or --no-timm)")
  return "\n".join(lines)


def main(args) -> int:
  res = run(args)
  res["matmul_size"] = args.matmul_size
  print(report(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0
