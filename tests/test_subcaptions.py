"""Sentence splitter and subcaption sampler (PathFLIP)."""

import itertools
import json
import math

import numpy as np
import pytest

from pathjax.config_lib import ConfigError
from pathjax.input import subcaptions as sc


@pytest.mark.parametrize("text, want", [
    ("Tumor measures 3.5 cm. Margins are free.", ["Tumor measures 3.5 cm", "Margins are free"]),
    ("Size 0.2 x 0.1 x 0.05 cm.", ["Size 0.2 x 0.1 x 0.05 cm"]),
    ("Reviewed by Dr. Smith. Agreed.", ["Reviewed by Dr. Smith", "Agreed"]),
    ("Stains (e.g. CK7, CK20) positive. Ki-67 approx. 30%.",
     ["Stains (e.g. CK7, CK20) positive", "Ki-67 approx. 30%"]),
    ("Findings: 1. Adenocarcinoma. 2. Margins free.",
     ["Findings: 1. Adenocarcinoma", "2. Margins free"]),
    ("1. Colon, biopsy\n2. Liver, biopsy", ["1. Colon, biopsy", "2. Liver, biopsy"]),
    ("Seen by J. Smith today", ["Seen by J. Smith today"]),
    ("Necrosis present; mitoses frequent", ["Necrosis present", "mitoses frequent"]),
    ("Is it invasive? Yes! Grade 2.", ["Is it invasive?", "Yes!", "Grade 2"]),
    ("Lymphocytes, plasma cells, etc. Fibrosis.", ["Lymphocytes, plasma cells, etc", "Fibrosis"]),
    ("pT2.N0 stage\n\n  \nGleason 3 + 4 = 7.", ["pT2.N0 stage", "Gleason 3 + 4 = 7"]),
    ("Lymphovascular invasion: No. Margins clear.", ["Lymphovascular invasion: No", "Margins clear"]),
    ("See block No. 3 for details. Adenocarcinoma, NOS. Grade 2.",
     ["See block No. 3 for details", "Adenocarcinoma, NOS", "Grade 2"]),
    ("", []),
    ("   . ", []),
])
def test_split_sentences(text, want):
  assert sc.split_sentences(text) == want


def _spec_distribution(n: int, p_consecutive: float = 0.5) -> dict[tuple[int, ...], float]:
  """P(sentence index set) of one subcaption, straight from the spec (n sentences)."""
  probs: dict[tuple[int, ...], float] = {}
  for m_drawn in (1, 2, 3):
    m = min(m_drawn, n)
    if m == 1:
      for i in range(n):
        probs[(i,)] = probs.get((i,), 0.0) + 1 / 3 / n
      continue
    for start in range(n - m + 1):
      key = tuple(range(start, start + m))
      probs[key] = probs.get(key, 0.0) + 1 / 3 * p_consecutive / (n - m + 1)
    for key in itertools.combinations(range(n), m):
      probs[key] = probs.get(key, 0.0) + 1 / 3 * (1 - p_consecutive) / math.comb(n, m)
  return probs


@pytest.mark.parametrize("n", [1, 2, 5])
def test_sampler_matches_spec_distribution(n):
  sentences = [f"s{i}" for i in range(n)]
  caption = ". ".join(sentences) + "."
  sampler = sc.SubcaptionSampler(k=8, seed=3)
  want = _spec_distribution(n)
  text_of = {". ".join(f"s{i}" for i in key): key for key in want}
  counts = dict.fromkeys(want, 0)
  draws = 0
  for slide in range(300):
    for epoch in range(10):
      for sub in sampler(f"slide{slide}", caption, epoch):
        counts[text_of[sub]] += 1  # a KeyError would be an outcome the spec never makes
        draws += 1
  for key, p in want.items():
    sd = math.sqrt(p * (1 - p) / draws)
    assert abs(counts[key] / draws - p) < 5 * sd + 1e-12, (key, counts[key] / draws, p)


def test_sampler_deterministic_per_seed_slide_epoch():
  caption = "A one. B two. C three. D four. E five. F six."
  a = sc.SubcaptionSampler(k=8, seed=1)
  b = sc.SubcaptionSampler(k=8, seed=1)
  assert a("s1", caption, 0) == b("s1", caption, 0)
  assert len(a("s1", caption, 0)) == 8
  others = [a("s1", caption, 1), a("s2", caption, 0), sc.SubcaptionSampler(k=8, seed=2)("s1", caption, 0)]
  assert all(o != a("s1", caption, 0) for o in others)


def test_sampler_edge_cases():
  s = sc.SubcaptionSampler(k=3)
  assert s("x", "Only one sentence here.") == ["Only one sentence here"] * 3
  assert s("x", "") == [""] * 3
  with pytest.raises(ValueError, match="k"):
    sc.SubcaptionSampler(k=0)


def test_precomputed_overrides_sampling():
  pre = {"exact": ["r1", "r2", "r3"], "more": [f"r{i}" for i in range(10)], "fewer": ["only"],
         "two": ["a", "b"]}
  s = sc.SubcaptionSampler(k=3, seed=0, precomputed=pre)
  assert s("exact", "Ignored caption. Really.") == ["r1", "r2", "r3"]
  more = s("more", "x", epoch=4)
  assert len(set(more)) == 3 and set(more) <= set(pre["more"]) and more == s("more", "x", epoch=4)
  assert s("fewer", "x") == ["only"] * 3
  two = s("two", "x")
  assert two[:2] == ["a", "b"] and two[2] in ("a", "b")
  assert s("absent", "One. Two.")[0] in ("One", "Two", "One. Two")


def test_load_subcaptions(tmp_path):
  p = tmp_path / "subs.jsonl"
  p.write_text(json.dumps({"slide": "s1", "subcaptions": [" a ", "b"]}) + "\n\n"
               + json.dumps({"slide": 2, "subcaptions": ["c"]}) + "\n")
  assert sc.load_subcaptions(str(p)) == {"s1": ["a", "b"], "2": ["c"]}
  with pytest.raises(ConfigError, match="does not exist"):
    sc.load_subcaptions(str(tmp_path / "missing.jsonl"))
  for bad, msg in [("{", "not JSON"), ('{"slide": "s"}', "needs"),
                   ('{"slide": "s", "subcaptions": []}', "non-empty"),
                   ('{"slide": "s", "subcaptions": [""]}', "non-empty"),
                   ('{"slide": "s", "subcaptions": ["a"]}\n{"slide": "s", "subcaptions": ["b"]}', "twice")]:
    p.write_text(bad + "\n")
    with pytest.raises(ConfigError, match=msg) as e:
      sc.load_subcaptions(str(p))
    assert str(p) in str(e.value)


def test_slide_rng_streams():
  a = sc.slide_rng(0, "s1", 2, stream=0).integers(1 << 30, size=4)
  assert np.array_equal(a, sc.slide_rng(0, "s1", 2, stream=0).integers(1 << 30, size=4))
  for other in (sc.slide_rng(0, "s1", 2, stream=1), sc.slide_rng(1, "s1", 2), sc.slide_rng(0, "s2", 2),
                sc.slide_rng(0, "s1", 3)):
    assert not np.array_equal(a, other.integers(1 << 30, size=4))
