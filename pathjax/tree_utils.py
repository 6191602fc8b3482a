"""Nested-dict parameter trees as flat "a/b/c" keys (checkpoints, converters, the trainer)."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    parts = key.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return tree
