"""Slide-report pairs: a JSON-lines report file, a part parser, and pairing by part label.

Report file (one JSON object per line):

    {"slide": "S1-A", "report": "A. Colon, biopsy: adenocarcinoma. B. Liver: ...", "part": "A"}

`part` is optional: the slide's specimen part (from the slide record), or it comes from a
mapping file (`load_part_map`: JSON {slide: part}, or CSV/JSON lines with slide and part).
Several slides of one case carry the same multi-part report, each with its own part.

`split_parts(text)` splits a multi-part report at part headers: "A.", "A)", "A:", "(A)",
"Part 1:", "PART A.", "Specimen A:", "SPECIMEN #2 -". A header counts only at the start of
the text or of a line, or after a sentence end (".", ";") that is not an abbreviation
("Dr.", "e.g.", initials), and only if the labels run in order (A, B, C... or 1, 2, 3...),
so "3.5 cm", "Dr. A. Smith" and "grade B" do not split a report. A report without headers
is one part.

`pair_reports` gives each slide the text of its part: the whole report when the report
has one part; the matching part when it has several (labels compared without "Part",
"Specimen", punctuation and case; a number n matches the n-th letter when the report and
the slide label parts differently). Nothing is dropped silently: slides whose part is not
found, slides without a label for a multi-part report, parts no slide claims, report lines
for unknown slides, slides without a report, empty reports and bad lines are all counted
and listed in `Pairing.summary()`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence


class ReportError(ValueError):
  """A report or part-map file that cannot be used at all (the message names it)."""


# Words after which a period does not end a sentence.
# Units (cm, mm) are left out on purpose: "measuring 3.5 cm. B. Liver" ends a sentence.
ABBREVIATIONS = frozenset("""dr mr mrs ms prof st no nos vs approx fig figs e.g i.e etc cf al
incl ca pt pts hx dx sx tx rx yo y.o wt vol op ref sp spp var""".split())

_KEYWORD = r"(?:part|specimen|spec|container|site)"
# A header: optional keyword + label + delimiter, then whitespace or the end.
_HEADER = re.compile(
    r"(?<!\w)(?P<head>(?:(?P<kw>" + _KEYWORD + r")\s*#?\s*(?P<kwlabel>[A-Za-z]|\d{1,2})\s*[.):\-]?"
    r"|(?P<paren>\()?(?P<label>[A-Z])(?:\)|[.:])))(?=\s|$)", re.IGNORECASE)


@dataclasses.dataclass
class ReportEntry:
  slide: str
  report: str
  part: str | None
  line: int


@dataclasses.dataclass
class ReportIssue:
  line: int
  reason: str     # bad_json, missing_field, empty_report, duplicate_slide
  message: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class ReportFile:
  path: str
  entries: dict[str, ReportEntry]   # slide id -> entry
  issues: list[ReportIssue]


def read_reports(path: str) -> ReportFile:
  """Reads a report JSON-lines file; bad lines become issues (with line numbers), not errors."""
  if not os.path.isfile(path):
    raise ReportError(f"report file {path} does not exist")
  entries: dict[str, ReportEntry] = {}
  issues: list[ReportIssue] = []
  with open(path, encoding="utf-8") as f:
    for n, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except json.JSONDecodeError as e:
        issues.append(ReportIssue(n, "bad_json", f"{path}:{n}: not JSON ({e.msg})"))
        continue
      if not isinstance(obj, dict) or not isinstance(obj.get("slide"), str) or not obj["slide"]:
        issues.append(ReportIssue(n, "missing_field", f"{path}:{n}: needs a string \"slide\""))
        continue
      text = obj.get("report")
      if not isinstance(text, str):
        issues.append(ReportIssue(n, "missing_field", f"{path}:{n}: slide {obj['slide']!r} has no "
                                  "string \"report\""))
        continue
      if not text.strip():
        issues.append(ReportIssue(n, "empty_report", f"{path}:{n}: slide {obj['slide']!r} has an "
                                  "empty report"))
        continue
      part = obj.get("part")
      part = None if part is None or str(part).strip() == "" else str(part).strip()
      if obj["slide"] in entries:
        issues.append(ReportIssue(n, "duplicate_slide", f"{path}:{n}: slide {obj['slide']!r} "
                                  f"already has a report on line {entries[obj['slide']].line}; "
                                  "the first is kept"))
        continue
      entries[obj["slide"]] = ReportEntry(obj["slide"], text, part, n)
  if not entries and not issues:
    raise ReportError(f"report file {path} is empty")
  return ReportFile(path, entries, issues)


def write_reports(path: str, lines: Iterable[Mapping[str, Any]]) -> None:
  """Writes report lines (dicts with slide, report and optional part) atomically."""
  from pathjax.input.records import atomic_write_text
  atomic_write_text(path, "".join(json.dumps(dict(l), ensure_ascii=False) + "\n" for l in lines))


def load_part_map(path: str) -> dict[str, str]:
  """slide id -> part label from a JSON object, JSON lines or a CSV with slide,part columns."""
  if not os.path.isfile(path):
    raise ReportError(f"part map {path} does not exist")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  out: dict[str, str] = {}
  try:
    if path.endswith(".csv"):
      rows = list(csv.DictReader(text.splitlines()))
      if rows and not {"slide", "part"} <= set(rows[0]):
        raise ReportError(f"{path}: a CSV part map needs columns slide,part; has {list(rows[0])}")
      pairs = [(r["slide"], r["part"]) for r in rows]
    elif text.lstrip().startswith("{") and not path.endswith(".jsonl"):
      obj = json.loads(text)
      pairs = list(obj.items())
    else:
      pairs = [(o["slide"], o["part"]) for o in map(json.loads, filter(str.strip, text.splitlines()))]
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise ReportError(f"{path}: not a part map (JSON {{slide: part}}, JSON lines or CSV with "
                      f"slide,part): {e}") from e
  for slide, part in pairs:
    out[str(slide)] = str(part)
  return out


# --------------------------------------------------------------------------------- parts


def normalize_label(label: str) -> str:
  """'Part 1:' -> '1', 'SPECIMEN a' -> 'A', '(B)' -> 'B'."""
  s = re.sub(_KEYWORD, "", str(label), flags=re.IGNORECASE)
  s = re.sub(r"[^A-Za-z0-9]", "", s).upper()
  return s.lstrip("0") or s


def _ends_sentence(before: str) -> bool:
  """True if text `before` (up to a header) ends a sentence or is empty / ends a line."""
  stripped = before.rstrip(" \t")
  if not stripped or stripped.endswith("\n") or before.endswith("\n"):
    return True
  if "\n" in before[len(stripped):]:
    return True
  if stripped.endswith(";"):
    return True
  if not stripped.endswith("."):
    return False
  word = re.split(r"\s", stripped)[-1].lower().rstrip(".")
  if word in ABBREVIATIONS or word.replace(".", "") in ABBREVIATIONS:
    return False
  if len(word.rstrip(".")) == 1 and word.isalpha():  # an initial: "J. A. Smith"
    return False
  return True


def _successor(label: str) -> str:
  return str(int(label) + 1) if label.isdigit() else chr(ord(label) + 1)


def split_parts(text: str) -> list[tuple[str, str]]:
  """[(label, part text)] of a report; [("", text)] when it has no part headers."""
  candidates = []
  for m in _HEADER.finditer(text):
    label = m.group("kwlabel") or m.group("label")
    if m.group("label") is not None and not m.group("label").isupper():
      continue
    # "(B)" is explicit enough anywhere; "B." needs a sentence or line before it.
    if not (m.group("paren") and text[m.end() - 1] == ")") and not _ends_sentence(text[:m.start()]):
      continue
    candidates.append((m.start(), m.end(), normalize_label(label)))
  # Keep the headers whose labels run in order from A or 1.
  chosen, expect = [], None
  for start, end, label in candidates:
    if expect is None:
      if label in ("A", "1"):
        chosen.append((start, end, label))
        expect = _successor(label)
    elif label == expect:
      chosen.append((start, end, label))
      expect = _successor(label)
  if len(chosen) < 2:  # one header (or none) describes one specimen: the whole report
    return [("", text.strip())]
  # Text before the first header (e.g. "FINAL DIAGNOSIS:") belongs to no part.
  parts = []
  for i, (start, end, label) in enumerate(chosen):
    stop = chosen[i + 1][0] if i + 1 < len(chosen) else len(text)
    parts.append((label, text[end:stop].strip(" \t\n;")))
  return parts


def _match_part(parts: Sequence[tuple[str, str]], label: str) -> str | None:
  want = normalize_label(label)
  by_label = {l: t for l, t in parts}
  if want in by_label:
    return by_label[want]
  # Letters against numbers: the n-th letter is part n.
  if want.isdigit() and all(l.isalpha() for l in by_label):
    return by_label.get(chr(ord("A") + int(want) - 1))
  if want.isalpha() and len(want) == 1 and all(l.isdigit() for l in by_label):
    return by_label.get(str(ord(want) - ord("A") + 1))
  return None


# ------------------------------------------------------------------------------- pairing


@dataclasses.dataclass
class Pairing:
  pairs: dict[str, str]                       # slide id -> its part's text
  part_of: dict[str, str]                     # slide id -> matched part label ("" = whole report)
  unmatched_slides: list[dict[str, str]]      # {slide, reason, message}
  unmatched_parts: list[dict[str, Any]]       # {slides, part, text}
  unknown_slides: list[str]                   # report lines for slides not in the slide list
  slides_without_report: list[str]
  issues: list[ReportIssue]

  def summary(self) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for u in self.unmatched_slides:
      reasons[u["reason"]] = reasons.get(u["reason"], 0) + 1
    issue_counts: dict[str, int] = {}
    for i in self.issues:
      issue_counts[i.reason] = issue_counts.get(i.reason, 0) + 1
    return {
        "paired": len(self.pairs),
        "unmatched_slides": len(self.unmatched_slides), "unmatched_by_reason": reasons,
        "unmatched_parts": len(self.unmatched_parts), "unknown_slides": len(self.unknown_slides),
        "slides_without_report": len(self.slides_without_report),
        "report_issues": issue_counts,
        "lists": {"unmatched_slides": self.unmatched_slides, "unmatched_parts": self.unmatched_parts,
                  "unknown_slides": self.unknown_slides,
                  "slides_without_report": self.slides_without_report,
                  "issues": [i.to_json() for i in self.issues]},
    }


def pair_reports(reports: ReportFile | str, slide_ids: Sequence[str] | None = None, *,
                 part_map: Mapping[str, str] | None = None,
                 whole_report_fallback: bool = False) -> Pairing:
  """Pairs each slide with the part of its report that describes it (see the module doc).

  `slide_ids`: the slides that exist (e.g. the embedded ones); report lines for others are
  listed as unknown, slides without a line as without report. `part_map` (slide -> part)
  overrides the report file's `part` fields. `whole_report_fallback` pairs a slide whose
  part cannot be found with the whole report instead of leaving it unmatched (still counted).
  """
  if isinstance(reports, str):
    reports = read_reports(reports)
  known = None if slide_ids is None else set(slide_ids)
  pairs, part_of = {}, {}
  unmatched: list[dict[str, str]] = []
  claimed: dict[str, set[str]] = {}   # report text -> part labels claimed
  slides_of: dict[str, list[str]] = {}
  parts_cache: dict[str, list[tuple[str, str]]] = {}
  unknown = []
  for slide, entry in reports.entries.items():
    if known is not None and slide not in known:
      unknown.append(slide)
      continue
    parts = parts_cache.get(entry.report)
    if parts is None:
      parts = parts_cache[entry.report] = split_parts(entry.report)
    slides_of.setdefault(entry.report, []).append(slide)
    label = (part_map or {}).get(slide, entry.part)
    if len(parts) == 1 and parts[0][0] == "" or len(parts) == 1 and label is None:
      pairs[slide], part_of[slide] = parts[0][1], parts[0][0]
      claimed.setdefault(entry.report, set()).add(parts[0][0])
      continue
    if label is None:
      reason, message = "no_part_label", (
          f"slide {slide!r}: its report has parts {[l for l, _ in parts]} but the slide has no part "
          "label (add \"part\" to its report line or a part map)")
    else:
      text = _match_part(parts, label)
      if text is not None and text:
        pairs[slide], part_of[slide] = text, normalize_label(label)
        claimed.setdefault(entry.report, set()).add(_matched_label(parts, label))
        continue
      reason = "empty_part" if text == "" else "part_not_found"
      message = (f"slide {slide!r}: part {label!r} " + ("is empty in its report" if text == "" else
                 f"is not among its report's parts {[l for l, _ in parts]}"))
    if whole_report_fallback:
      pairs[slide], part_of[slide] = entry.report.strip(), ""
    unmatched.append({"slide": slide, "reason": reason, "message": message,
                      "paired_with_whole_report": whole_report_fallback})
  unmatched_parts = []
  for report, parts in parts_cache.items():
    if report not in slides_of:
      continue
    for label, text in parts:
      if label not in claimed.get(report, set()):
        unmatched_parts.append({"slides": sorted(slides_of[report]), "part": label, "text": text[:200]})
  without = sorted(known - set(reports.entries)) if known is not None else []
  return Pairing(pairs, part_of, unmatched, unmatched_parts, sorted(unknown), without,
                 list(reports.issues))


def _matched_label(parts, label) -> str:
  text = _match_part(parts, label)
  for l, t in parts:
    if t is text:
      return l
  return normalize_label(label)
