"""Captions file parsing: every problem is an issue with its line number."""

from pathjax.input import captions


def test_load_captions_issues(tmp_path):
  p = tmp_path / "c.jsonl"
  p.write_bytes(
      b'{"slide": "s", "magnification": 5, "x": 0, "y": 0, "caption": "a", "keywords": ["k"], "label": "tumor"}\n'
      b"\n"
      b'{"slide": "s", "magnification": 5.0, "x": 0, "y": 0, "caption": "b"}\n'
      b'{"slide": "s", "magnification": 10, "x": 0, "y": 0}\n'
      b'\xc3\x28\n'
      b'{"slide": "s", "magnification": 10, "x": 0.5, "y": 0, "caption": "c"}\n'
      b'{"slide": "s", "magnification": 10, "x": 896, "y": 0, "caption": "d"}\n')
  idx = captions.load_captions(str(p))
  assert idx.lines == 6 and len(idx.entries) == 2
  assert [(i.line, i.kind) for i in idx.issues] == [
      (3, "duplicate_key"), (4, "missing_field"), (5, "invalid_utf8"), (6, "bad_value")]
  e = idx.get("s", 5, 0, 0)
  assert e.caption == "a" and e.keywords == ["k"] and e.label == "tumor" and e.line == 1
  assert idx.get("s", 10, 896, 0).caption == "d" and idx.get("s", 20, 0, 0) is None
  assert idx.summary()["issues_by_kind"]["duplicate_key"] == 1
