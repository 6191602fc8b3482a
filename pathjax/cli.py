"""The `pathjax` command. Each subcommand lives in its own module, imported on use.

A subcommand module defines `register(parser)` (its arguments) and `main(args) -> int`.
`--config.a.b=value` overrides are split off before argparse and reach the subcommand as
`args.config_overrides`; a subcommand that takes `--config` applies them with
`pathjax.config_lib.load_config`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pathjax import __version__
from pathjax.config_lib import ConfigError, split_config_overrides

# name -> (module, one-line help)
COMMANDS = {
    "convert": ("pathjax.convert.cli", "import published weights (safetensors) into a model directory"),
    "embed": ("pathjax.embed", "embed images or text with a model directory"),
    "synth-slides": ("pathjax.wsi.synth_cli", "write synthetic pyramidal slides with labels and captions"),
    "tile": ("pathjax.input.tile_cli", "tile slides into multi-resolution bag records"),
    "inspect": ("pathjax.input.inspect_cli", "print a records directory's manifest and records"),
    "tokenizer": ("pathjax.input.tokenizer_cli", "train a BPE tokenizer on captions"),
    "train": ("pathjax.train_cli", "train a recipe from a config"),
    "eval": ("pathjax.evaluate.cli", "evaluate a model: zero-shot, cross-magnification, probes, retrieval"),
    "compile": ("pathjax.compile_cli", "AOT-compile a config's train step for a TPU topology"),
    "bench": ("pathjax.bench.cli", "benchmarks that print measured figures"),
    "generate": ("pathjax.generate", "generate text with a decoder LLM model directory"),
}


def _load(name: str):
  module_name, _ = COMMANDS[name]
  return importlib.import_module(module_name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="pathjax", description="Pathology vision-language models in JAX/Flax.")
  parser.add_argument("--version", action="version", version=f"pathjax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module_name, help_text) in COMMANDS.items():
    sub_parser = sub.add_parser(name, help=help_text, description=help_text)
    if only is None or name == only:
      try:
        _load(name).register(sub_parser)
      except ModuleNotFoundError as e:
        if only == name or not e.name or not e.name.startswith(module_name):
          raise
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv, overrides = split_config_overrides(argv)
  except ConfigError as e:
    print(f"pathjax: error: {e}", file=sys.stderr)
    return 2
  command = next((a for a in argv if not a.startswith("-")), None)
  parser = build_parser(command if command in COMMANDS else None)
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  args.config_overrides = overrides
  try:
    code = _load(args.command).main(args)
  except ConfigError as e:
    print(f"pathjax {args.command}: config error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  return int(code or 0)


if __name__ == "__main__":
  sys.exit(main())
