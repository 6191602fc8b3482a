"""`pathjax compile`: AOT-compile a config's train step for a TPU topology (pathjax.aot).

  pathjax compile --config=configs/mrplip.py:vitl16,v5e_256 --topology v5e:16x16
  pathjax compile --config=configs/mrplip.py:vitl16 --topology v4-128 --config.batch_size=2048
  pathjax compile --config=configs/mrplip.py:vitl16,v5e_256 --topology v5e:16x16 --max-batch
  pathjax compile --config=configs/mrplip.py:vitl16 --topology v5e:16x16 --num-slices 2 \
      --config.mesh.shape='(2,1,-1,1)'

Prints per-chip memory (arguments, outputs, aliased, temporaries, total vs HBM), FLOPs per
step, the mesh and the largest arrays' shardings. Exits 1 when the step does not fit (or
the compiler fails), 2 for a config or set-up error (libtpu missing, unknown topology).
Needs libtpu (`pip install "libtpu==0.0.42.*"`, `make setup-tpu`); it installs nothing.
"""

from __future__ import annotations

import json
import sys
import time

# Compiling needs no accelerator: keep jax off any local TPU/GPU runtime.
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def register(parser) -> None:
  parser.add_argument("--config", required=True, help="configs/<recipe>.py[:variant]")
  parser.add_argument("--topology", required=True,
                      help="TPU topology: v5e:16x16, v4:4x4x4, v5p:4x4x8, v6e:8x8, or v5e-256, v4-128")
  parser.add_argument("--num-slices", type=int, default=1,
                      help="multi-slice: slices over DCN (put a 'slice' axis > 1 in config.mesh.shape)")
  parser.add_argument("--max-batch", action="store_true",
                      help="binary-search the largest per-chip batch that fits (powers of two, then bisect)")
  parser.add_argument("--start-batch", type=int, default=0,
                      help="--max-batch: first per-chip batch tried (default: the config's)")
  parser.add_argument("--limit-batch", type=int, default=1024,
                      help="--max-batch: largest per-chip batch tried")
  parser.add_argument("--contrastive-loss", choices=("chunked", "plain"), default="",
                      help="compile only the sigmoid image-text loss (value and gradients) over "
                           "batch_size bags x images per bag pairs: 'chunked' is the ring "
                           "(losses.chunked_sigmoid_contrastive), 'plain' the gathered [B, B] loss")
  parser.add_argument("--mfu", type=float, default=0.5,
                      help="model FLOPs utilisation for the step-time estimate (default 0.5)")
  parser.add_argument("--json", default="", help="also write the result(s) to this JSON file")


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _as_json(result, args) -> dict:
  row = result.table_row(args.mfu)
  row.update(mesh=result.mesh, memory_bytes=result.memory, flops_per_chip=result.flops,
             compile_seconds=round(result.compile_seconds, 1), largest=result.largest,
             attention=result.attention,
             error=(result.error or "")[:2000], oom=result.oom,
             config=args.config, overrides=list(args.config_overrides), mfu=args.mfu,
             versions=_versions(), commit=_commit())
  return row


def _write_json(path: str, data) -> None:
  """Whole record or none: a compile takes minutes, and README's plan table reads these."""
  from pathjax.input.storage import write_text_atomic  # pylint: disable=import-outside-toplevel
  write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _versions() -> dict:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = {}
  for name in ("jax", "jaxlib", "libtpu", "flax"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def _commit() -> str:
  """The pathjax checkout's commit (+ "-dirty" with uncommitted changes), or "" outside git."""
  import subprocess  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return ""
  if head.returncode:
    return ""
  return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(args) -> int:
  from pathjax import aot, config_lib  # pylint: disable=import-outside-toplevel
  folder = os.path.dirname(os.path.abspath(args.json)) if args.json else ""
  if folder and not os.path.isdir(folder):  # say so before minutes of compiling, not after
    print(f"pathjax compile: --json {args.json}: folder {folder} does not exist; create it first",
          file=sys.stderr)
    return 2
  config = config_lib.load_config(args.config, args.config_overrides)
  try:
    topology = aot.get_topology(args.topology, args.num_slices)
  except aot.AOTError as e:
    print(f"pathjax compile: {e}", file=sys.stderr)
    return 2
  _log(topology.describe())
  try:
    if args.contrastive_loss:
      return _contrastive(args, config, topology)
    if args.max_batch:
      start = args.start_batch or max(int(config.batch_size) // topology.num_chips, 1)
      best, tried = aot.max_batch(config, topology, start=start, limit=args.limit_batch, log=_log)
      print(aot.format_table(tried, args.mfu))
      if args.json:
        _write_json(args.json, [_as_json(r, args) for r in tried])
      if best is None:
        print(f"pathjax compile: even a per-chip batch of {start} does not fit on {topology.name}",
              file=sys.stderr)
        return 1
      print()
      print(aot.format_result(best, mfu=args.mfu))
      capped = " (the search stopped at --limit-batch)" if all(r.fits for r in tried) else ""
      print(f"\nlargest per-chip batch that fits: {best.per_chip_batch:g} "
            f"(global batch {best.global_batch} on {topology.num_chips} chips){capped}")
      return 0
    result = aot.compile_train_step(config, topology, log=_log)
  except aot.AOTError as e:
    print(f"pathjax compile: {e}", file=sys.stderr)
    return 1
  except (config_lib.ConfigError, ValueError) as e:
    print(f"pathjax compile: cannot set up the step: {e}", file=sys.stderr)
    return 2
  print(aot.format_result(result, mfu=args.mfu))
  if args.json:
    _write_json(args.json, _as_json(result, args))
  if result.error:
    what = "does not fit (the compiler ran out of memory)" if result.oom else "failed to compile"
    print(f"pathjax compile: {args.config} {what} on {topology.name} at global batch "
          f"{result.global_batch}; lower --config.batch_size, raise accumulate_steps, use "
          f"model.remat=full or shard more (config.mesh / config.axis_rules)", file=sys.stderr)
    return 1
  if not result.fits:
    print(f"pathjax compile: {args.config} does not fit on {topology.name}: "
          f"{result.total_bytes / aot.GiB:.2f} GiB per chip > {aot.HBM_GIB[topology.generation]} GiB HBM",
          file=sys.stderr)
    return 1
  return 0


def _contrastive(args, config, topology) -> int:
  from pathjax import aot, sharding  # pylint: disable=import-outside-toplevel
  from pathjax.recipes.base import make_recipe  # pylint: disable=import-outside-toplevel
  images = make_recipe(config).example_batch(1).get("images")
  per_bag = int(images.shape[1]) if images is not None and images.ndim == 5 else 1
  pairs = int(config.batch_size) * per_bag
  result = aot.compile_contrastive_loss(
      topology, pairs, embed_dim=int(config.model.embed_dim),
      chunked=args.contrastive_loss == "chunked", mesh_shape=tuple(config.mesh.shape),
      rules=sharding.rules_from_config(config))
  print(f"{args.contrastive_loss} sigmoid loss over {config.batch_size} bags x {per_bag} "
        f"images = {pairs} image-text pairs")
  print(aot.format_result(result, mfu=args.mfu))
  if args.json:
    _write_json(args.json, _as_json(result, args))
  return 0 if result.fits else 1
