"""`pathjax bench NAME`: benchmarks that print figures measured side by side in one run."""

from __future__ import annotations

import importlib

BENCHES = {
    "encoders": "pathjax.bench.encoders",
    "tiling": "pathjax.bench.tiling",
    "input": "pathjax.bench.input",
    "train": "pathjax.bench.train",
    "eval": "pathjax.bench.eval",
    "embed-slides": "pathjax.bench.embed_slides",
    "load": "pathjax.bench.load",
    "generate": "pathjax.bench.generate",
}


def register(parser):
  sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
  for name, module_name in BENCHES.items():
    bench_parser = sub.add_parser(name)
    try:
      importlib.import_module(module_name).register(bench_parser)
    except ModuleNotFoundError as e:
      if not e.name or not e.name.startswith(module_name):
        raise


def main(args) -> int:
  return importlib.import_module(BENCHES[args.bench]).main(args)
