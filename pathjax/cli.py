"""The `pathjax` command. Each subcommand lives in its own module, imported on use.

A subcommand module defines `register(parser)` (its arguments) and `main(args) -> int`.
`--config.a.b=value` overrides are split off before argparse and reach the subcommand as
`args.config_overrides`; a subcommand that takes `--config` applies them with
`pathjax.config_lib.load_config`.

Exit codes (every subcommand): 0 done; 1 an unexpected failure (a bug: traceback); 2 a user
error (bad argument, config, missing or unwritable path), printed as one line naming the input
and the fix; 74 a write failed for lack of disk space (train: a checkpoint save; the message
names the path and the free space); 75 `train` was preempted (SIGTERM) after saving its
state; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import errno
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import sys

from pathjax import __version__
from pathjax.config_lib import ConfigError, split_config_overrides

# name -> (module, one-line help)
COMMANDS = {
    "convert": ("pathjax.convert.cli", "import published weights (safetensors) into a model directory"),
    "embed": ("pathjax.embed", "embed images or text with a model directory"),
    "embed-slides": ("pathjax.embed_slides", "embed every tissue patch of whole slides with a frozen patch encoder"),
    "synth-slides": ("pathjax.wsi.synth_cli", "write synthetic pyramidal slides with labels and captions"),
    "tile": ("pathjax.input.tile_cli", "tile slides into multi-resolution bag records"),
    "inspect": ("pathjax.input.inspect_cli", "print a records directory's manifest and records"),
    "tokenizer": ("pathjax.input.tokenizer_cli", "train a BPE tokenizer on captions"),
    "train": ("pathjax.train_cli", "train a recipe from a config"),
    "eval": ("pathjax.evaluate.cli", "evaluate a model: zero-shot, cross-magnification, probes, retrieval"),
    "compile": ("pathjax.compile_cli", "AOT-compile a config's train step for a TPU topology"),
    "bench": ("pathjax.bench.cli", "benchmarks that print measured figures"),
    "generate": ("pathjax.generate", "generate text with a decoder LLM model directory, or a slide's report (PathAlign stage 2)"),
    "chat": ("pathjax.chat", "answer questions about a slide with a slide chat model"),
    "localize": ("pathjax.localize", "heatmap of where a PathFLIP model finds a text on a slide"),
}


EXIT_USAGE = 2
EXIT_NO_SPACE = 74

_TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_NAME", "CLOUD_TPU_TASK_ID",
            "TPU_WORKER_ID")


def _has_tpu() -> bool:
  """TPU chips attached (device files) or a TPU VM's environment."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
              or any(os.environ.get(k) for k in _TPU_ENV))


def keep_off_absent_tpu(environ=os.environ) -> None:
  """With libtpu installed (`make setup-tpu`, for `pathjax compile`) jax probes for a TPU at
  its first use and, on a machine without one, prints libtpu start-up errors
  ("could not determine TPU accelerator type", TPU_WORKER_HOSTNAMES) that bury real output.
  Without TPU hardware and without a GPU plugin, pin jax to the CPU (JAX_PLATFORMS=cpu)
  unless the user chose platforms. `pathjax compile` still loads libtpu for its topology.
  """
  if environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _has_tpu():
    return
  try:
    if list(importlib.metadata.entry_points(group="jax_plugins")):
      return  # a GPU plugin decides for itself
  except Exception:  # pragma: no cover - broken metadata: leave jax's default
    return
  environ["JAX_PLATFORMS"] = "cpu"


def _os_error_line(e: OSError) -> str:
  where = e.filename or ""
  reason = e.strerror or str(e)
  return f"{where}: {reason}" if where else reason


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
  keep_off_absent_tpu()
  try:
    code = _load(args.command).main(args)
  except ConfigError as e:
    print(f"pathjax {args.command}: config error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
          FileExistsError) as e:  # a path the user gave: name it, no traceback
    print(f"pathjax {args.command}: error: {_os_error_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    from pathjax.workdir import format_bytes, free_bytes
    free = f" ({format_bytes(free_bytes(e.filename))} free)" if e.filename else ""
    print(f"pathjax {args.command}: error: no space left on device writing "
          f"{e.filename or 'the output'}{free}; free space and rerun", file=sys.stderr)
    return EXIT_NO_SPACE
  except KeyboardInterrupt:
    return 130
  return int(code or 0)


if __name__ == "__main__":
  sys.exit(main())
