"""JSON-lines input files (subcaptions, instructions): one object per non-blank line, and
errors that name the file and line."""

from __future__ import annotations

import json
from typing import Iterator


def json_objects(path: str, error: type[Exception]) -> Iterator[tuple[str, dict]]:
  """("FILE line N", object) for every non-blank line of `path`; a line that is not JSON, or
  not a JSON object, raises `error` naming the file and line."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} line {number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{where}: not JSON ({e.msg}); fix or remove the line") from None
      if not isinstance(row, dict):
        raise error(f"{where}: not a JSON object; write one {{...}} per line")
      yield where, row
