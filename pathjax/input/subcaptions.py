"""PathFLIP subcaptions: sentences of a slide caption, and K subcaptions drawn from them.

`split_sentences(text)` splits a report-style caption at sentence ends (".", "!", "?", ";"
followed by whitespace or the end) and at newlines. Unlike the public PathFLIP code (which
splits on every "."), a period does not end a sentence inside a number ("3.5 cm",
"0.2 x 0.1 cm"), after an abbreviation ("e.g.", "Dr.", "approx.", "no."; the list is
`pathjax.input.reports.ABBREVIATIONS`; "No."/"Fig." only before a number), after an initial ("J. Smith") or after list
numbering ("1. Adenocarcinoma. 2. Margins free." gives "1. Adenocarcinoma" and
"2. Margins free"). Each sentence loses its final "." (the sampler joins with ". ").

`SubcaptionSampler` draws the spec's K subcaptions per slide: for each, m ~ U{1, 2, 3}
(capped at the number of sentences n); m = 1: one sentence uniformly at random; m > 1:
with probability `p_consecutive` (0.5) a run of m consecutive sentences with a uniform
start, else m distinct sentences uniformly at random (kept in caption order), joined with
". ". Draws are deterministic per (seed, slide id, epoch) through numpy's SeedSequence, so
a resumed run and every host draw the same subcaptions. A precomputed per-slide list (the
later PathFLIP version's LLM-written region descriptions, `load_subcaptions`) overrides
sampling for the slides it names.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Mapping, Sequence

import numpy as np

from pathjax.config_lib import ConfigError
from pathjax.input.json_lines import json_objects
from pathjax.input.reports import ABBREVIATIONS

# A sentence-ending mark followed by whitespace or the end of the text.
_END = re.compile(r"[.!?;](?=\s|$)")
_LIST_NUMBER = re.compile(r"^(?:\d{1,2}|[ivxIVX]{1,4}|[a-zA-Z])$")
# Abbreviations that also end sentences when a capitalised word follows.
_FINAL_ABBREVIATIONS = frozenset({"etc", "al"})
# Abbreviations only when a number follows ("No. 3", "Fig. 2"; "invasion: No." and
# "carcinoma, NOS." end sentences).
_NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "fig", "figs", "ref"})


def _last_word(before: str) -> str:
  words = before.split()
  return words[-1] if words else ""


def _is_sentence_end(line: str, pos: int, sentence_start: int) -> bool:
  """Whether the mark at line[pos] ends the sentence that began at `sentence_start`."""
  if line[pos] != ".":
    return True
  before = line[sentence_start:pos]
  word = _last_word(before)
  if not word:
    return False  # a lone "." at the start of a sentence
  key = word.lower().lstrip("([{\"'")
  after = line[pos + 1:].lstrip()
  if key in _NUMBER_ABBREVIATIONS:
    return not after[:1].isdigit()
  if key in ABBREVIATIONS or key.replace(".", "") in ABBREVIATIONS:
    return key in _FINAL_ABBREVIATIONS and after[:1].isupper()
  words_before = before.split()
  # List numbering: "1." / "a." / "iv." as the first word of a sentence, or after a colon.
  if _LIST_NUMBER.match(word) and (len(words_before) == 1 or words_before[-2].endswith(":")):
    return False
  if len(word) == 1 and word.isalpha() and word.isupper():
    return False  # an initial: "J. Smith"
  return True


def split_sentences(text: str) -> list[str]:
  """The sentences of `text` (stripped, non-empty, without their final ".")."""
  sentences = []
  for line in str(text).splitlines():
    start = 0
    for m in _END.finditer(line):
      if m.start() < start or not _is_sentence_end(line, m.start(), start):
        continue
      sentences.append(line[start:m.end()])
      start = m.end()
    sentences.append(line[start:])
  out = []
  for s in sentences:
    s = s.strip()
    if s.endswith(".") or s.endswith(";"):
      s = s[:-1].rstrip()
    if s:
      out.append(s)
  return out


def _slide_entropy(slide: str) -> int:
  """A stable integer for a slide id (Python's hash() differs between processes)."""
  return int.from_bytes(hashlib.blake2b(str(slide).encode("utf-8"), digest_size=8).digest(), "little")


def slide_rng(seed: int, slide: str, epoch: int, stream: int = 0) -> np.random.Generator:
  """A numpy Generator fixed by (seed, slide id, epoch, stream): the same on every host and
  after a resume. Streams keep independent draws apart (subcaptions 0, regions 1)."""
  return np.random.default_rng(np.random.SeedSequence(
      [int(seed), _slide_entropy(slide), int(epoch), int(stream)]))


def draw_sentence_indices(n: int, rng: np.random.Generator, p_consecutive: float = 0.5,
                          max_sentences: int = 3) -> list[int]:
  """Sentence indices of one subcaption out of n sentences (see the module docstring)."""
  m = min(int(rng.integers(1, max_sentences + 1)), n)
  if m == 1:
    return [int(rng.integers(n))]
  if rng.random() < p_consecutive:
    start = int(rng.integers(n - m + 1))
    return list(range(start, start + m))
  return sorted(int(i) for i in rng.choice(n, size=m, replace=False))


class SubcaptionSampler:
  """K subcaptions per (slide, caption, epoch); see the module docstring.

  `precomputed` maps slide id -> its own list of subcaptions. A slide with exactly K gets
  them in order; with more, K distinct ones drawn per epoch; with fewer, all of them plus
  random repeats (as regions are duplicated when a slide has fewer than L).
  """

  def __init__(self, k: int = 8, seed: int = 0, *, p_consecutive: float = 0.5,
               max_sentences: int = 3,
               precomputed: Mapping[str, Sequence[str]] | None = None):
    if k < 1:
      raise ValueError(f"k (subcaptions per slide) must be >= 1, got {k}")
    if not 0.0 <= p_consecutive <= 1.0 or max_sentences < 1:
      raise ValueError(f"need 0 <= p_consecutive <= 1 and max_sentences >= 1, got "
                       f"{p_consecutive}, {max_sentences}")
    self.k, self.seed = k, int(seed)
    self.p_consecutive, self.max_sentences = p_consecutive, max_sentences
    self.precomputed = dict(precomputed or {})

  def rng(self, slide: str, epoch: int) -> np.random.Generator:
    return slide_rng(self.seed, slide, epoch, stream=0)

  def __call__(self, slide: str, caption: str, epoch: int = 0) -> list[str]:
    rng = self.rng(slide, epoch)
    given = self.precomputed.get(slide)
    if given:
      given = list(given)
      if len(given) == self.k:
        return given
      if len(given) > self.k:
        return [given[i] for i in sorted(rng.choice(len(given), size=self.k, replace=False))]
      extra = rng.integers(len(given), size=self.k - len(given))
      return given + [given[int(i)] for i in extra]
    sentences = split_sentences(caption)
    if not sentences:
      return [str(caption).strip()] * self.k  # nothing to split: the caption itself
    return [". ".join(sentences[i] for i in draw_sentence_indices(
        len(sentences), rng, self.p_consecutive, self.max_sentences)) for _ in range(self.k)]


def load_subcaptions(path: str) -> dict[str, list[str]]:
  """Precomputed subcaptions from JSON lines `{"slide": ID, "subcaptions": [str, ...]}`.

  Raises ConfigError naming the file and line for anything unusable (a missing file, bad
  JSON, a missing or empty list, non-string entries, a slide listed twice).
  """
  if not os.path.isfile(path):
    raise ConfigError(f"subcaption file {path} does not exist; write one JSON object per line: "
                      '{"slide": ID, "subcaptions": ["...", ...]}')
  out: dict[str, list[str]] = {}
  for where, row in json_objects(path, ConfigError):
    if "slide" not in row or "subcaptions" not in row:
      raise ConfigError(f'{where}: needs "slide" and "subcaptions" fields')
    subs = row["subcaptions"]
    if (not isinstance(subs, list) or not subs
        or not all(isinstance(s, str) and s.strip() for s in subs)):
      raise ConfigError(f"{where}: subcaptions must be a non-empty list of non-empty strings")
    slide = str(row["slide"])
    if slide in out:
      raise ConfigError(f"{where}: slide {slide!r} is listed twice; keep one line per slide")
    out[slide] = [s.strip() for s in subs]
  return out
