"""Captions: a JSON-lines file keyed by (slide, magnification, x, y).

One caption per line, as any captioner (Quilt-LLaVA in the MR-PLIP paper) can write it:

    {"slide": "TCGA-XX-0001", "magnification": 20, "x": 1792, "y": 3584,
     "caption": "...", "keywords": ["..."], "label": "tumor"}

`slide` is the slide id (file name without extension), `x`, `y` are level-0 pixel
coordinates of the patch's top-left corner, `keywords` (optional) are supplied keywords
that replace extraction, `label` (optional) is a ground-truth class (synthetic slides).

Nothing is dropped silently: a line that is not valid UTF-8, not a JSON object, lacks a
field or has a wrong type, holds text that cannot be written as UTF-8 (an unpaired
surrogate such as `"\\ud800"`), or repeats a key already seen is an issue with its line
number; the first entry of a repeated key is kept. `parse_line` and `merge_entries` are the
two steps, so a distributed tiler (pathjax.input.tile_beam) can parse lines anywhere and
join them by slide id; `load_captions` is both in one process. Patches without a caption are counted by the
tiler as missing, and no caption is ever invented.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from typing import Any, Iterable

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
  kind: str  # invalid_utf8 | malformed_json | not_an_object | missing_field | bad_value | invalid_unicode | duplicate_key
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
    return summarize(self.path, self.lines, len(self.entries), self.issues, max_issues)


def summarize(path: str | None, lines: int, entries: int, issues: list[CaptionIssue],
              max_issues: int = 20) -> dict[str, Any]:
  """The manifest's summary of a captions file (counts, issues by kind, the first issues)."""
  return {
      "path": path, "lines": lines, "entries": entries, "issues": len(issues),
      "issues_by_kind": dict(collections.Counter(i.kind for i in issues)),
      "first_issues": [i.to_json() for i in issues[:max_issues]],
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
  for name, text in [("slide", slide), ("caption", caption), ("label", label or "")] + [
      ("keywords", k) for k in keywords or []]:
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      return CaptionIssue(lineno, "invalid_unicode",
                          f"'{name}' holds an unpaired surrogate {text[e.start]!r} at character "
                          f"{e.start}, which cannot be stored as UTF-8; fix the captioner's output")
  return make_key(slide, mag, x, y), CaptionEntry(caption=caption, line=lineno, keywords=keywords, label=label)


def parse_line(raw: bytes, lineno: int) -> tuple[Key, CaptionEntry] | CaptionIssue | None:
  """One line of a captions file: (key, entry), an issue, or None for a blank line."""
  if not raw.strip():
    return None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return CaptionIssue(lineno, "invalid_utf8", f"not valid UTF-8 at byte {e.start}: {e.reason}")
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return CaptionIssue(lineno, "malformed_json", f"not JSON: {e.msg} (column {e.colno})")
  return _parse_line(obj, lineno)


def merge_entries(parsed: Iterable[tuple[Key, CaptionEntry]]
                  ) -> tuple[dict[Key, CaptionEntry], list[CaptionIssue]]:
  """Entries in line order with repeated keys dropped (the first is kept) as issues."""
  entries: dict[Key, CaptionEntry] = {}
  issues: list[CaptionIssue] = []
  for key, entry in sorted(parsed, key=lambda kv: kv[1].line):
    if key in entries:
      first = entries[key]
      same = "same caption" if first.caption == entry.caption else "different caption"
      issues.append(CaptionIssue(
          entry.line, "duplicate_key",
          f"key (slide={key[0]!r}, magnification={key[1]:g}, x={key[2]}, y={key[3]}) already "
          f"given at line {first.line} ({same}); the first is kept"))
      continue
    entries[key] = entry
  return entries, issues


def digest(entries: dict[Key, CaptionEntry]) -> str:
  """A digest of one slide's captions (not their line numbers): records made with other
  captions are out of date."""
  h = hashlib.sha256()
  for key in sorted(entries):
    e = entries[key]
    h.update(json.dumps([list(key), e.caption, e.keywords, e.label], ensure_ascii=True).encode())
  return h.hexdigest()[:32]


def read_lines(path: str) -> Iterable[tuple[int, bytes]]:
  """(line number, raw bytes) of a local or remote (fsspec URL) captions file."""
  from pathjax.input import storage
  if storage.isdir(path):
    raise IsADirectoryError(f"captions file {path} is a directory; pass the JSON-lines file itself")
  if not storage.exists(path):
    raise FileNotFoundError(f"captions file {path} does not exist")
  with storage.open_binary(path) as f:
    yield from enumerate(f, start=1)


def load_captions(path: str) -> CaptionIndex:
  """Reads a captions file; problems are returned as issues (see module doc), not raised.

  Raises FileNotFoundError if the file does not exist, IsADirectoryError for a directory.
  """
  parsed: list[tuple[Key, CaptionEntry]] = []
  issues: list[CaptionIssue] = []
  lines = 0
  for lineno, raw in read_lines(path):
    item = parse_line(raw, lineno)
    if item is None:
      continue
    lines += 1
    if isinstance(item, CaptionIssue):
      issues.append(item)
    else:
      parsed.append(item)
  entries, duplicates = merge_entries(parsed)
  issues = sorted(issues + duplicates, key=lambda i: i.line)
  return CaptionIndex(path=path, entries=entries, issues=issues, lines=lines)
