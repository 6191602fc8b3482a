"""`pathjax tile --runner beam` (Apache Beam DirectRunner): the same records byte for byte as
the local pool, idempotent reruns, retries, counted skips, and object-store paths."""

import os
import shutil

import numpy as np
import pytest
from slide_fixtures import TINY_PATCH
from tile_helpers import assert_failed_run_then_rerun_finishes, flaky_slide_opens, shard_bytes, tile_tiny

pytest.importorskip("apache_beam", reason="the beam extra is not installed (pip install -e '.[beam]')")

from pathjax import cli  # noqa: E402
from pathjax.input import records, storage, tile_beam  # noqa: E402

IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _comparable(manifest):
  """A manifest without its timings."""
  m = {k: v for k, v in manifest.items() if k not in ("created", "seconds")}
  m["slides"] = [{k: v for k, v in s.items() if k != "seconds"} for s in manifest["slides"]]
  return m


def test_default_options():
  assert tile_beam.default_options([], 2) == [
      "--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
  assert tile_beam.default_options(["--direct_num_workers=4"], 2)[-1] == "--direct_running_mode=multi_processing"
  dataflow = ["--runner=DataflowRunner", "--project=p", "--region=r"]
  assert tile_beam.default_options(dataflow, 2) == dataflow


@pytest.mark.slow
def test_beam_cli_matches_local_pool_and_trains(tiny_slides, tmp_path, capsys):
  """Beam DirectRunner with 2 processes vs `pathjax tile --workers 2`: same bytes, same manifest."""
  slides = os.path.dirname(tiny_slides.slide_paths[0]) + "/*.svs"
  common = ["tile", "--slides", slides, "--captions", tiny_slides.captions_path, "--workers", "2",
            "--patch-size", str(TINY_PATCH), "--no-progress"]
  local, beam = str(tmp_path / "local"), str(tmp_path / "beam")
  assert cli.main(common + ["--out", local]) == 0
  assert cli.main(common + ["--out", beam, "--runner", "beam", "--", "--direct_num_workers=2"]) == 0
  capsys.readouterr()
  a, b = shard_bytes(local), shard_bytes(beam)
  assert len(a) == 6 and a == b
  ma, mb = records.read_manifest(local), records.read_manifest(beam)
  assert _comparable(ma) == _comparable(mb)
  assert open(os.path.join(local, "caption_issues.jsonl")).read() == open(os.path.join(beam, "caption_issues.jsonl")).read()
  # A rerun of the Beam output resumes every slide.
  m = tile_tiny(slides, tiny_slides.captions_path, beam, runner="beam", workers=2)
  assert m["counts"]["slides_resumed"] == 3 and shard_bytes(beam) == a
  # The trainer's input pipeline reads the Beam output unchanged.
  from pathjax.bench.input import write_synthetic_tokenizer
  from pathjax.input import pipeline
  tok = write_synthetic_tokenizer(str(tmp_path / "tok"), vocab_size=600)

  def batches(records_dir):
    cfg = pipeline.default_input_config()
    cfg.records_dir, cfg.tokenizer, cfg.context_length = records_dir, tok, 16
    it = pipeline.make_train_iterator(cfg, batch_size=4, process_index=0, process_count=1, seed=1)
    return [next(it) for _ in range(2)]

  for x, y in zip(batches(local), batches(beam)):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_beam_corrupt_slide_one_skip_and_transient_retry(tiny_slides, tmp_path, monkeypatch):
  d = tmp_path / "slides"
  d.mkdir()
  for p in tiny_slides.slide_paths[:2]:
    shutil.copy(p, d)
  data = open(tiny_slides.slide_paths[2], "rb").read()
  (d / "broken.svs").write_bytes(data[: len(data) // 3])
  failures = flaky_slide_opens(monkeypatch, {"synth-001": 2})  # in-process runner: seen

  def run(out):
    return tile_tiny(str(d / "*.svs"), tiny_slides.captions_path, out, runner="beam",
                     beam_args=IN_PROCESS)

  m = run(tmp_path / "out")
  assert failures["synth-001"] == 0 and m["counts"]["slides_tiled"] == 2
  assert m["counts"]["slides_skipped"] == 1 and m["skipped"]["slides_by_reason"] == {"corrupt_or_truncated": 1}
  m = run(tmp_path / "out")
  assert m["counts"]["slides_resumed"] == 3 and m["counts"]["slides_skipped"] == 1
  # A transient error that outlives its retries fails the pipeline (the runner's retry),
  # leaves no manifest, and a rerun finishes.
  _, _, m = assert_failed_run_then_rerun_finishes(run, tmp_path / "out2", failures, "synth-001",
                                                  match="Input/output error")
  assert m["counts"]["slides_tiled"] == 2 and m["counts"]["slides_skipped"] == 1


def test_object_store_paths(tiny_slides, tmp_path):
  """Slides and records on an object store (fsspec's in-memory one) and a file:// URL."""
  import fsspec
  mem = fsspec.filesystem("memory")
  for p in tiny_slides.slide_paths[:2]:
    mem.put_file(p, f"/pathjax-test/slides/{os.path.basename(p)}")
  mem.put_file(tiny_slides.captions_path, "/pathjax-test/captions.jsonl")
  try:
    m = tile_tiny("memory://pathjax-test/slides/*.svs", "memory://pathjax-test/captions.jsonl",
              "memory://pathjax-test/records")
    assert m["counts"]["slides_tiled"] == 2 and m["slides"][0]["path"].startswith("memory://")
    # Copy the records down and read them; compare with tiling the same slides locally.
    local = tmp_path / "from_memory"
    local.mkdir()
    for name in storage.listdir("memory://pathjax-test/records"):
      if name.endswith((".array_record", ".json", ".jsonl")):
        storage.get_file(f"memory://pathjax-test/records/{name}", str(local / name))
    assert not [n for n in storage.listdir("memory://pathjax-test/records") if storage.TMP_MARK in n]
    source, _ = records.open_records(str(local))
    assert len(source) == m["counts"]["bags"]
    direct = tile_tiny(tiny_slides.slide_paths[:2], tiny_slides.captions_path, tmp_path / "direct")
    assert shard_bytes(local) == shard_bytes(tmp_path / "direct") and direct["counts"] == m["counts"]
    # Markers name the slide by id and file name, never a local path.
    marker = storage.read_text("memory://pathjax-test/records/.tile/done/synth-000.json")
    assert str(tmp_path) not in marker and '"file": "synth-000.svs"' in marker
    m = tile_tiny("memory://pathjax-test/slides/*.svs", "memory://pathjax-test/captions.jsonl",
              "memory://pathjax-test/records", runner="beam", beam_args=IN_PROCESS)
    assert m["counts"]["slides_resumed"] == 2
  finally:
    mem.rm("/pathjax-test", recursive=True)
  url_out = "file://" + str(tmp_path / "url_out")
  m = tile_tiny(tiny_slides.slide_paths[:2], tiny_slides.captions_path, url_out, runner="beam",
            beam_args=IN_PROCESS)
  assert shard_bytes(tmp_path / "url_out") == shard_bytes(tmp_path / "direct")
