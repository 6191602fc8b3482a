"""Slide-report pairs: the part parser, pairing, counted problems, synthetic reports."""

import json

import numpy as np
import pytest

from pathjax.input import reports as rp
from pathjax.wsi import synth


@pytest.mark.parametrize("text, expected", [
    ("A. Colon, biopsy: adenocarcinoma measuring 3.5 cm. B. Liver, wedge: metastatic carcinoma.",
     [("A", "Colon, biopsy: adenocarcinoma measuring 3.5 cm."), ("B", "Liver, wedge: metastatic carcinoma.")]),
    ("A) breast core: IDC grade 2\nB) axilla: benign",
     [("A", "breast core: IDC grade 2"), ("B", "axilla: benign")]),
    ("Part 1: Left lung. Squamous cell carcinoma, 2.5 x 1.0 cm.\nPart 2: Lymph node, no tumor.",
     [("1", "Left lung. Squamous cell carcinoma, 2.5 x 1.0 cm."), ("2", "Lymph node, no tumor.")]),
    ("SPECIMEN A: Skin, excision; margins clear. SPECIMEN B: Skin, re-excision.",
     [("A", "Skin, excision; margins clear."), ("B", "Skin, re-excision.")]),
    ("A: prostate, left: Gleason 3+4\nB: prostate, right: benign\nC: seminal vesicle: benign",
     [("A", "prostate, left: Gleason 3+4"), ("B", "prostate, right: benign"), ("C", "seminal vesicle: benign")]),
    ("FINAL DIAGNOSIS:\nA. Colon: adenoma.\nB. Rectum: hyperplastic polyp.",
     [("A", "Colon: adenoma."), ("B", "Rectum: hyperplastic polyp.")]),
    ("(A) stomach: gastritis (B) duodenum: normal", [("A", "stomach: gastritis"), ("B", "duodenum: normal")]),
    ("Specimen #1 - colon. Specimen #2 - liver", [("1", "colon."), ("2", "liver")]),
])
def test_split_parts(text, expected):
  assert rp.split_parts(text) == expected


@pytest.mark.parametrize("text", [
    "Seen by Dr. A. Smith. Tumor measures 3.5 cm; grade B changes. No parts here.",
    "Tumor 2.5 x 1.0 cm. e.g. B. cereus was cultured.",
    "B. Liver: only a part B header, no part A.",   # labels must start at A / 1
    "A. Single part report: adenocarcinoma.",      # one header: one part
    "Adenocarcinoma, grade 2. Margins A and B are clear: 3.5 mm.",
])
def test_no_false_splits(text):
  assert rp.split_parts(text) == [("", text.strip())]


def test_labels_normalised_and_letters_match_numbers():
  assert rp.normalize_label("Part 01:") == "1" and rp.normalize_label("SPECIMEN a") == "A"
  parts = rp.split_parts("Part 1: colon.\nPart 2: liver.")
  assert rp._match_part(parts, "B") == "liver." and rp._match_part(parts, "part 1") == "colon."
  assert rp._match_part(parts, "C") is None


def _write(path, lines):
  with open(path, "w") as f:
    for l in lines:
      f.write((l if isinstance(l, str) else json.dumps(l)) + "\n")
  return str(path)


def test_pairing_counts_and_lists_everything(tmp_path):
  case = "A. Colon: adenocarcinoma.\nB. Liver: metastasis.\nC. Node: benign."
  path = _write(tmp_path / "r.jsonl", [
      {"slide": "s1", "report": case, "part": "A"},
      {"slide": "s2", "report": case, "part": "b"},
      {"slide": "s3", "report": case, "part": "D"},          # part not in the report
      {"slide": "s4", "report": case},                        # no label, multi-part report
      {"slide": "s5", "report": "Benign skin.", "part": "A"},  # single-part: whole report
      {"slide": "s6", "report": "   "},                        # empty report
      {"slide": "ghost", "report": "Unknown slide."},
      "{not json",
      {"slide": "s1", "report": "duplicate"},
      {"report": "no slide"},
  ])
  p = rp.pair_reports(path, ["s1", "s2", "s3", "s4", "s5", "s6", "s7"])
  assert p.pairs == {"s1": "Colon: adenocarcinoma.", "s2": "Liver: metastasis.", "s5": "Benign skin."}
  assert {u["slide"]: u["reason"] for u in p.unmatched_slides} == {
      "s3": "part_not_found", "s4": "no_part_label"}
  assert [(u["part"], u["slides"]) for u in p.unmatched_parts] == [("C", ["s1", "s2", "s3", "s4"])]
  assert p.unknown_slides == ["ghost"] and p.slides_without_report == ["s6", "s7"]
  s = p.summary()
  assert s["report_issues"] == {"empty_report": 1, "bad_json": 1, "duplicate_slide": 1,
                                "missing_field": 1}
  assert s["paired"] == 3 and s["unmatched_slides"] == 2 and s["unmatched_parts"] == 1
  assert all(i["line"] > 0 for i in s["lists"]["issues"])
  # A part map overrides the file's labels; the fallback pairs with the whole report, counted.
  p2 = rp.pair_reports(path, part_map={"s3": "C", "s4": "Part 3"}, whole_report_fallback=False)
  assert p2.pairs["s3"] == p2.pairs["s4"] == "Node: benign."
  p3 = rp.pair_reports(path, whole_report_fallback=True)
  assert p3.pairs["s4"] == case and {u["slide"] for u in p3.unmatched_slides} == {"s3", "s4"}


def test_part_map_formats_and_bad_files(tmp_path):
  (tmp_path / "m.json").write_text(json.dumps({"s1": "A", "s2": 2}))
  (tmp_path / "m.csv").write_text("slide,part\ns1,A\ns2,B\n")
  (tmp_path / "m.jsonl").write_text('{"slide": "s1", "part": "A"}\n')
  assert rp.load_part_map(str(tmp_path / "m.json")) == {"s1": "A", "s2": "2"}
  assert rp.load_part_map(str(tmp_path / "m.csv")) == {"s1": "A", "s2": "B"}
  assert rp.load_part_map(str(tmp_path / "m.jsonl")) == {"s1": "A"}
  (tmp_path / "bad.csv").write_text("id,label\ns1,A\n")
  with pytest.raises(rp.ReportError, match="slide,part"):
    rp.load_part_map(str(tmp_path / "bad.csv"))
  with pytest.raises(rp.ReportError, match="does not exist"):
    rp.read_reports(str(tmp_path / "missing.jsonl"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(rp.ReportError, match="empty"):
    rp.read_reports(str(tmp_path / "empty.jsonl"))


_CLASS_WORD = {"tumor": "tumor", "stroma": "stroma", "lymphocytes": "lymphocytic",
               "adipose": "adipose", "necrosis": "necrosis", "mucus": "mucin"}


def _first_class_word(text):
  named = [w for w in _CLASS_WORD.values() if w in text.lower()]
  return min(named, key=text.lower().index) if named else None


def _fake_slide(i, fractions):
  rng = np.random.default_rng(i)
  n = 400
  counts = (np.asarray(fractions) * n).astype(int)
  labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)] + [np.full(n - counts.sum(), -1)])
  return synth.SynthSlide(path="", slide_id=f"s{i}", width=0, height=0, mpp=0.25, app_mag=40,
                          class_map=rng.permutation(labels).astype(np.int8).reshape(20, 20))


def test_synthetic_reports_describe_composition_and_vary():
  mixes = [(0.6, 0.2, 0, 0, 0.15, 0), (0, 0.7, 0.2, 0, 0, 0.05), (0.1, 0, 0, 0.8, 0, 0),
           (0, 0, 0.5, 0, 0.4, 0)] * 3
  slides = [_fake_slide(i, m) for i, m in enumerate(mixes)]
  lines = synth.slide_reports(slides, seed=0)
  assert [l["slide"] for l in lines] == [s.slide_id for s in slides]
  texts = [l["report"] for l in lines]
  # 4 compositions x 3: repeats come in other phrasings (the style is drawn per slide).
  assert len(set(texts)) >= 8
  for text, mix in zip(texts, mixes):
    dom = synth.TISSUE_CLASSES[int(np.argmax(mix))]
    assert _first_class_word(text) == _CLASS_WORD[dom], text
  # Every class covering >= 3% of the tissue is named; classes absent are not.
  text = synth.slide_report_text({"tumor": 0.6, "stroma": 0.3, "necrosis": 0.1, "adipose": 0.0,
                                  "lymphocytes": 0.0, "mucus": 0.0}, np.random.default_rng(0), style=0)
  assert text == "Sections show predominantly tumor with extensive fibrous stroma and areas of necrosis."
  assert len({synth.slide_report_text({"tumor": 1.0}, np.random.default_rng(0), style=k)
              for k in range(5)}) == 5


def test_multi_part_synthetic_reports_pair_back(tmp_path):
  mixes = [(0.6, 0.4, 0, 0, 0, 0), (0, 0, 0, 0.9, 0.1, 0), (0, 0, 0.8, 0, 0, 0.2)] * 3
  slides = [_fake_slide(i, m) for i, m in enumerate(mixes)]
  lines = synth.slide_reports(slides, seed=1, parts_per_case=3)
  assert all("part" in l for l in lines) and len({l["report"] for l in lines}) == 3
  path = str(tmp_path / "reports.jsonl")
  rp.write_reports(path, lines)
  p = rp.pair_reports(path, [s.slide_id for s in slides])
  assert len(p.pairs) == 9 and not p.unmatched_slides and not p.unmatched_parts
  for s, mix in zip(slides, mixes):  # each slide gets the part that describes it
    assert _first_class_word(p.pairs[s.slide_id]) == _CLASS_WORD[synth.TISSUE_CLASSES[int(np.argmax(mix))]]


def test_synth_slides_writes_reports(tiny_slides):
  lines = [json.loads(l) for l in open(tiny_slides.reports_path)]
  assert [l["slide"] for l in lines] == ["synth-000", "synth-001", "synth-002"]
  assert all(l["report"].strip() for l in lines)
  p = rp.pair_reports(tiny_slides.reports_path, ["synth-000", "synth-001", "synth-002"])
  assert len(p.pairs) == 3
