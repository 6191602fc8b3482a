"""Python configs: `configs/<name>.py:<variant>` plus `--config.a.b=value` overrides.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`. Variants
are chosen by the argument string; `pick_variant` gives every config the same error for
an unknown one. Overrides are parsed against the type of the value they replace, and an
unknown key is rejected with the valid keys at that level, before anything runs.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A config file, variant or override that cannot be used as written."""


# Fields that were removed or renamed: old dotted path -> what to set instead.
RENAMED = {
    "input.global_batch_size": "batch_size (the global batch over all hosts, the one "
                               "batch-size field: --config.batch_size=N)",
}


def check_renamed(config, prefix: str = "") -> None:
  """ConfigError naming the new field when `config` (at dotted `prefix`) sets a renamed one."""
  for old, new in RENAMED.items():
    head, _, leaf = old.rpartition(".")
    if head != prefix:
      continue
    if isinstance(config, (ml_collections.ConfigDict, dict)) and leaf in config:
      raise ConfigError(f"config field {old} was removed; set {new}")


def _check_renamed_tree(config: ml_collections.ConfigDict) -> None:
  for old in RENAMED:
    head = old.rpartition(".")[0]
    node = config
    for part in head.split(".") if head else ():
      node = node.get(part) if isinstance(node, (ml_collections.ConfigDict, dict)) else None
    if node is not None:
      check_renamed(node, head)


def pick_variant(arg: str | None, variants: Mapping[str, Any], default: str) -> str:
  """Returns the variant name for `arg`, or raises listing the valid ones."""
  name = arg or default
  if name not in variants:
    raise ConfigError(
        f"unknown config variant {name!r}; valid variants: {', '.join(sorted(variants))}")
  return name


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and returns `get_config(arg)`, unlocked."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist (expected configs/<name>.py[:variant])")
  module_name = "pathjax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
  try:
    _check_renamed_tree(config)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return config


def _parse_value(text: str, current: Any, key: str) -> Any:
  """Parses `text` to the type of `current` (the value it overrides)."""
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}: expected true/false, got {text!r}")
  if isinstance(current, str):
    return text
  if current is None or isinstance(current, (tuple, list, dict)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      if current is None:
        return text
      raise ConfigError(f"--config.{key}: cannot parse {text!r} as {type(current).__name__}")
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    return value
  for kind in (int, float):
    if isinstance(current, kind):
      try:
        return kind(text) if kind is int else float(text)
      except ValueError:
        if kind is int:
          try:
            as_float = float(text)
          except ValueError:
            pass
          else:
            if as_float.is_integer():
              return int(as_float)
        raise ConfigError(f"--config.{key}: expected {kind.__name__}, got {text!r}")
  return ast.literal_eval(text)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=value` overrides; unknown keys raise listing the valid ones."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like --config.a.b=value")
    if key in RENAMED:
      raise ConfigError(f"--config.{key} was removed; set {RENAMED[key]}")
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:depth]) or "config"
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(
            f"unknown config key {key!r}: {where} has no field {part!r}; "
            f"valid fields: {', '.join(valid)}")
      if depth < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key} is a group; set one of its fields: "
                        f"{', '.join(sorted(current.keys()))}")
    with node.unlocked():
      node[parts[-1]] = _parse_value(text, current, key)
  return config


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file with variant and applies overrides; the result is locked."""
  config = load_config_file(spec)
  config = apply_overrides(config, overrides)
  config.lock()
  return config


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Splits `--config.a.b=value` / `--config.a.b value` out of argv."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg} needs a value")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()
