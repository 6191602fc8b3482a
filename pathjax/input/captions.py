"""Captions: a JSON-lines file keyed by (slide, magnification, x, y).

One caption per line, as any captioner (Quilt-LLaVA in the MR-PLIP paper) can write it:

    {"slide": "TCGA-XX-0001", "magnification": 20, "x": 1792, "y": 3584,
     "caption": "...", "keywords": ["..."], "label": "tumor"}

`slide` is the slide id (file name without extension), `x`, `y` are level-0 pixel
coordinates of the patch's top-left corner, `keywords` (optional) are supplied keywords
that replace extraction, `label` (optional) is a ground-truth class (synthetic slides).

Nothing is dropped silently: a line that is not valid UTF-8, not a JSON object, lacks a
field or has a wrong type, or repeats a key already seen is an issue with its line number;
the first entry of a repeated key is kept. Patches without a caption are counted by the
tiler as missing, and no caption is ever invented.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

Key = tuple[str, float, int, int]


def make_key(slide: str, magnification: float, x: int, y: int) -> Key:
  return (str(slide), round(float(magnification), 3), int(x), int(y))


@dataclasses.dataclass
class CaptionEntry:
  caption: str
  line: int
  keywords: list[str] | None = None
  label: str | None = None


@dataclasses.dataclass
class CaptionIssue:
  line: int
  kind: str  # invalid_utf8 | malformed_json | not_an_object | missing_field | bad_value | duplicate_key
  message: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class CaptionIndex:
  path: str | None
  entries: dict[Key, CaptionEntry]
  issues: list[CaptionIssue]
  lines: int  # non-blank lines read

  def get(self, slide: str, magnification: float, x: int, y: int) -> CaptionEntry | None:
    return self.entries.get(make_key(slide, magnification, x, y))

  def for_slide(self, slide: str) -> dict[Key, CaptionEntry]:
    return {k: v for k, v in self.entries.items() if k[0] == slide}

  def issue_counts(self) -> dict[str, int]:
    return dict(collections.Counter(i.kind for i in self.issues))

  def summary(self, max_issues: int = 20) -> dict[str, Any]:
    return {
        "path": self.path, "lines": self.lines, "entries": len(self.entries),
        "issues": len(self.issues), "issues_by_kind": self.issue_counts(),
        "first_issues": [i.to_json() for i in self.issues[:max_issues]],
    }


def empty_index() -> CaptionIndex:
  return CaptionIndex(path=None, entries={}, issues=[], lines=0)


def _parse_line(obj: Any, lineno: int) -> tuple[Key, CaptionEntry] | CaptionIssue:
  if not isinstance(obj, dict):
    return CaptionIssue(lineno, "not_an_object", f"expected a JSON object, got {type(obj).__name__}")
  missing = [f for f in ("slide", "magnification", "x", "y", "caption") if f not in obj]
  if missing:
    return CaptionIssue(lineno, "missing_field", f"missing field(s) {missing}")
  slide, mag, x, y, caption = (obj[f] for f in ("slide", "magnification", "x", "y", "caption"))
  if not isinstance(slide, str) or not slide:
    return CaptionIssue(lineno, "bad_value", f"'slide' must be a non-empty string, got {slide!r}")
  if isinstance(mag, bool) or not isinstance(mag, (int, float)) or not mag > 0:
    return CaptionIssue(lineno, "bad_value", f"'magnification' must be a positive number, got {mag!r}")
  for name, v in (("x", x), ("y", y)):
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or v < 0:
      return CaptionIssue(lineno, "bad_value", f"'{name}' must be a non-negative integer, got {v!r}")
  if not isinstance(caption, str):
    return CaptionIssue(lineno, "bad_value", f"'caption' must be a string, got {type(caption).__name__}")
  keywords = obj.get("keywords")
  if keywords is not None and not (isinstance(keywords, list) and all(isinstance(k, str) for k in keywords)):
    return CaptionIssue(lineno, "bad_value", "'keywords' must be a list of strings")
  label = obj.get("label")
  if label is not None and not isinstance(label, str):
    return CaptionIssue(lineno, "bad_value", "'label' must be a string")
  return make_key(slide, mag, x, y), CaptionEntry(caption=caption, line=lineno, keywords=keywords, label=label)


def load_captions(path: str) -> CaptionIndex:
  """Reads a captions file; problems are returned as issues (see module doc), not raised.

  Raises FileNotFoundError if the file does not exist.
  """
  entries: dict[Key, CaptionEntry] = {}
  issues: list[CaptionIssue] = []
  lines = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      lines += 1
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        issues.append(CaptionIssue(lineno, "invalid_utf8", f"not valid UTF-8 at byte {e.start}: {e.reason}"))
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        issues.append(CaptionIssue(lineno, "malformed_json", f"not JSON: {e.msg} (column {e.colno})"))
        continue
      parsed = _parse_line(obj, lineno)
      if isinstance(parsed, CaptionIssue):
        issues.append(parsed)
        continue
      key, entry = parsed
      if key in entries:
        first = entries[key]
        same = "same caption" if first.caption == entry.caption else "different caption"
        issues.append(CaptionIssue(
            lineno, "duplicate_key",
            f"key (slide={key[0]!r}, magnification={key[1]:g}, x={key[2]}, y={key[3]}) already "
            f"given at line {first.line} ({same}); the first is kept"))
        continue
      entries[key] = entry
  return CaptionIndex(path=path, entries=entries, issues=issues, lines=lines)
