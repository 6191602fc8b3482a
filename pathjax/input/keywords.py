"""Deterministic rule-based keyword (noun-phrase) extraction from captions.

1. Lower-case, split into word tokens (letters, digits, hyphens).
2. Known pathology terms (data/pathology_terms.txt, editable, one term per line, '#'
   comments) are matched first, longest first, and kept whole ("lymph node",
   "mantle zone", "plasma cells").
   Words right before a term (up to `max_words` in all) join it as its modifiers.
3. The remaining tokens are split into chunks at stop words, punctuation and verbs of
   description ("with", "showing", "of", ...); each chunk of at most `max_words` words is a
   phrase (longer chunks keep their last `max_words` words: English heads are final).
4. Chunks made only of generic words ("view", "image", "low-power") or numbers/
   magnifications ("40x") are dropped; phrases are de-duplicated in order of appearance.

The same caption always gives the same keywords.
"""

from __future__ import annotations

import functools
import os
import re

_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")

STOP_WORDS = frozenset("""
a an the and or but nor of in on at to from by for with without within into onto over under
between among through across along around about against as than then there here this that these
those it its is are was were be been being has have had having do does did can could may might
shall should will would which who whom whose what where when while also very more most less least
some any each every all both either neither no not only such other another same so too just
showing shows show shown seen see visible appear appears appearing demonstrate demonstrates
demonstrating consistent suggest suggests suggesting likely possibly probably image images picture
view views field fields magnification features feature area areas region regions part parts
characterized composed made forming form forms formed arranged containing contains contain present
presence scattered next near adjacent surrounded surrounding lining lined throughout several many
few numerous multiple various overall main notable prominent typical typically likely histopathology
histopathological histology histological slide section stained staining h&e he low-power high-power
low high power medium cells' note noted
""".split())

GENERIC = frozenset({"view", "image", "low-power", "high-power", "architecture", "cells of"})

_DEFAULT_TERMS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "pathology_terms.txt")


def _tokens(text: str) -> list[str]:
  return _TOKEN.findall(text.lower())


@functools.lru_cache(maxsize=8)
def load_terms(path: str | None = None) -> tuple[tuple[str, ...], ...]:
  """Term list as token tuples, longest first. Missing default file -> no terms."""
  path = path or _DEFAULT_TERMS_PATH
  if not os.path.exists(path):
    return ()
  terms = set()
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        toks = tuple(t for t in _tokens(line) if re.match(r"[a-z0-9]", t))
        if toks:
          terms.add(toks)
  return tuple(sorted(terms, key=lambda t: (-len(t), t)))


def _is_word(tok: str) -> bool:
  return bool(re.match(r"[a-z0-9]", tok))


def _is_noise(tok: str) -> bool:
  return bool(re.fullmatch(r"\d+(\.\d+)?x?|[a-z]", tok))


def extract_keywords(text: str, *, terms: tuple[tuple[str, ...], ...] | None = None,
                     terms_path: str | None = None, max_words: int = 3) -> list[str]:
  """Noun phrases of `text`, in order of first appearance, without duplicates."""
  if terms is None:
    terms = load_terms(terms_path)
  toks = _tokens(text)
  by_first: dict[str, list[tuple[str, ...]]] = {}
  for t in terms:
    by_first.setdefault(t[0], []).append(t)
  out: list[str] = []
  chunk: list[str] = []

  def flush():
    words = [w for w in chunk if not _is_noise(w)]
    chunk.clear()
    if not words:
      return
    words = words[-max_words:]
    phrase = " ".join(words)
    if phrase not in GENERIC and phrase not in out:
      out.append(phrase)

  i = 0
  while i < len(toks):
    tok = toks[i]
    match = None
    for term in by_first.get(tok, ()):
      if tuple(toks[i:i + len(term)]) == term:
        match = term
        break
    if match is not None:
      # Modifiers right before a term belong to it ("large pleomorphic nuclei").
      mods = [w for w in chunk if not _is_noise(w)][-max(0, max_words - len(match)):] if len(match) < max_words else []
      chunk.clear()
      phrase = " ".join(mods + list(match))
      if phrase not in out:
        out.append(phrase)
      i += len(match)
      continue
    if not _is_word(tok) or tok in STOP_WORDS:
      flush()
    else:
      chunk.append(tok)
    i += 1
  flush()
  return out


def bag_keywords(patch_keywords: list[list[str]]) -> list[str]:
  """Union of the patches' keywords, most frequent first (ties: first appearance)."""
  counts: dict[str, int] = {}
  first: dict[str, int] = {}
  n = 0
  for kws in patch_keywords:
    for k in kws:
      counts[k] = counts.get(k, 0) + 1
      if k not in first:
        first[k] = n
        n += 1
  return sorted(counts, key=lambda k: (-counts[k], first[k]))
