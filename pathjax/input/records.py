"""Records directories: sharded ArrayRecord files of bags plus a manifest written last.

Layout: `DIR/bags-00000-of-00004.array_record`, ..., `DIR/manifest.json`. A shard is written
under a temporary name and renamed when closed, and the manifest is written (atomically)
only when every shard is complete, so a directory without a manifest is never mistaken for
a finished dataset.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable

from array_record.python import array_record_module
import grain

MANIFEST = "manifest.json"
SHARD_PATTERN = "bags-{index:05d}-of-{count:05d}.array_record"


class IncompleteRecordsError(FileNotFoundError):
  """A records directory without a manifest: a `tile` run that did not finish."""


def atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes records to `path` atomically; returns how many were written."""
  tmp = f"{path}.tmp-{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return count


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise IncompleteRecordsError(
        f"{directory} has no {MANIFEST}: it is not a finished records directory (a `pathjax tile` "
        "run was interrupted or is still running); re-run `pathjax tile` with the same --out to "
        "complete it")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def shard_paths(directory: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, "bags-*.array_record")))


def open_records(directory: str) -> tuple[grain.sources.ArrayRecordDataSource, dict[str, Any]]:
  """A random-access source of encoded bags (bytes) and the manifest of a finished directory."""
  manifest = read_manifest(directory)
  paths = shard_paths(directory)
  expected = manifest.get("shards")
  if expected is not None and sorted(os.path.basename(p) for p in paths) != sorted(expected):
    raise IncompleteRecordsError(
        f"{directory}: shards on disk {[os.path.basename(p) for p in paths]} differ from the "
        f"manifest's {expected}; re-run `pathjax tile` with the same --out")
  if not paths:
    raise IncompleteRecordsError(f"{directory}: the manifest lists no shards (no bags were written)")
  return grain.sources.ArrayRecordDataSource(paths), manifest
