"""`pathjax embed-slides`: slide embedding files, resume, process split, bad slides, reader."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from pathjax import cli
from pathjax import embed_slides as es
from pathjax.models import model_dir as md
from pathjax.models.vit import ViT
from pathjax.wsi import slide as slide_lib
from pathjax.wsi import synth

MAG = 10.0
PATCH = 32  # = the tiny model's image size; 10x on a 40x slide: 128 level-0 px per patch


def _model(path, width=32, seed=0):
  vision = ViT(width=width, depth=2, num_heads=4, mlp_dim=64, patch_size=16, image_size=PATCH)
  params = jax.jit(vision.init)(jax.random.PRNGKey(seed), np.zeros((1, PATCH, PATCH, 3), np.float32))["params"]
  return md.save_model_dir(str(path), {"vision": dict(kind="vit", module=vision, params=params,
                                                      projection=None)},
                           preprocess={"image_size": PATCH, "mean": [0.5] * 3, "std": [0.25] * 3},
                           source=f"tiny-vit-{width}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return _model(tmp_path_factory.mktemp("m") / "vit")


@pytest.fixture(scope="module")
def encoder(model):
  return es.load_encoder(model, batch_size=16, patch_size=PATCH)


@pytest.fixture(scope="module")
def embedded(tiny_slides, model, encoder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("emb") / "out")
  res = es.embed_slides(model, out, magnification=MAG, slides=tiny_slides.slide_paths,
                        encoder=encoder, progress=False)
  return out, res


def _slide_files(out):
  return sorted(os.listdir(os.path.join(out, es.SLIDES_DIR)))


def test_round_trip_features_equal_direct_encoding(tiny_slides, model, embedded):
  out, res = embedded
  m = res["manifest"]
  assert m["counts"]["slides"] == 3 and m["counts"]["slides_embedded"] == 3
  assert m["dim"] == 32 and m["dtype"] == "float16" and m["encoder"] == "tiny-vit-32"
  emb = es.open_slide_embeddings(out)
  assert emb.slide_ids == ["synth-000", "synth-001", "synth-002"]
  sid = emb.slide_ids[1]
  s = emb[sid]
  assert s.features.dtype == np.float16 and s.features.shape == (len(s.coords), 32)
  assert len(s.coords) > 10
  extent = 128  # 32 px at 10x on a 40x slide
  np.testing.assert_array_equal(s.grid, s.coords // extent)
  assert len({tuple(g) for g in s.grid}) == len(s.grid)  # every patch once
  assert (s.tissue >= 0.5).all()
  # The same patches read directly and encoded by the model directory give the same features.
  loaded = md.load_model_dir(model)
  with slide_lib.open_slide(tiny_slides.slide_paths[1]) as slide:
    pix = np.stack([slide.read_region(int(x), int(y), extent, PATCH) for x, y in s.coords])
  ref = loaded.encode_image(pix, batch_size=7)
  np.testing.assert_allclose(s.features.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
  # Per-slide timing and counts in the manifest; metadata in the file.
  entry = next(e for e in m["slides"] if e["slide_id"] == sid)
  assert entry["patches"] == len(s.coords) and entry["seconds"] >= 0
  assert m["counts"]["patches"] == sum(len(emb[i].coords) for i in emb.slide_ids)


def test_bfloat16_and_padding_one_compile(tiny_slides, model, tmp_path):
  enc = es.load_encoder(model, batch_size=12, patch_size=PATCH)  # rounded up to 16 on 8 devices
  assert enc.batch_size == 16 and enc.in_sharding.mesh.size == jax.local_device_count()
  out = str(tmp_path / "bf16")
  es.embed_slides(model, out, magnification=MAG, slides=tiny_slides.slide_paths[:2], encoder=enc,
                  dtype="bfloat16", progress=False)
  import ml_dtypes
  emb = es.open_slide_embeddings(out)
  f = emb[emb.slide_ids[0]].features
  assert f.dtype == ml_dtypes.bfloat16 and np.isfinite(f.astype(np.float32)).all()
  assert enc.fn._cache_size() == 1  # every batch (the padded last ones too) used one shape


def test_resume_skips_done_and_redoes_half_written(tiny_slides, model, encoder, tmp_path):
  out = str(tmp_path / "out")
  es.embed_slides(model, out, magnification=MAG, slides=tiny_slides.slide_paths, encoder=encoder,
                  progress=False)
  before = es.open_slide_embeddings(out)
  ref = {i: before[i].features.copy() for i in before.slide_ids}
  # Slide 0 half-written (file cut short, as a kill during the write would leave it after a
  # non-atomic copy), slide 1's file gone, a temporary file of a killed run lying around.
  f0 = os.path.join(out, es.SLIDES_DIR, "synth-000.safetensors")
  with open(f0, "r+b") as f:
    f.truncate(os.path.getsize(f0) // 2)
  os.remove(os.path.join(out, es.SLIDES_DIR, "synth-001.safetensors"))
  stale = os.path.join(out, es.SLIDES_DIR, "synth-002.safetensors.tmp-999")
  open(stale, "wb").write(b"partial")
  logs = []
  res = es.embed_slides(model, out, magnification=MAG, slides=tiny_slides.slide_paths,
                        encoder=encoder, progress=True, log=logs.append)
  assert res["counts"]["resumed"] == 1 and res["counts"]["embedded"] == 2
  assert any("synth-000" in l for l in logs) and not any("synth-002:" in l for l in logs)
  assert not os.path.exists(stale)
  after = es.open_slide_embeddings(out)
  for i in after.slide_ids:
    np.testing.assert_array_equal(after[i].features, ref[i])


def test_processes_split_disjoint_sets_and_last_writes_manifest(tiny_slides, model, encoder, tmp_path):
  out = str(tmp_path / "out")
  seen = []
  for pi in (1, 0):  # process 1 finishes first: no manifest until every slide is done
    res = es.embed_slides(model, out, magnification=MAG, slides=tiny_slides.slide_paths,
                          encoder=encoder, process_index=pi, process_count=2, barrier=False,
                          progress=False)
    done = {m["slide_id"] for m in map(json.load, map(open, _markers(out)))}
    seen.append(done)
    if pi == 1:
      assert res["manifest"] is None and not os.path.exists(os.path.join(out, es.MANIFEST))
  jobs = es.list_jobs(tiny_slides.slide_paths)
  share0 = {j.slide_id for j in es.process_share(jobs, 0, 2)}
  share1 = {j.slide_id for j in es.process_share(jobs, 1, 2)}
  assert share0 and share1 and not share0 & share1 and share0 | share1 == {j.slide_id for j in jobs}
  assert seen[0] == share1 and seen[1] == share0 | share1
  assert res["manifest"]["counts"]["slides_embedded"] == 3
  assert len(es.open_slide_embeddings(out)) == 3


def _markers(out):
  d = os.path.join(out, es.STATE_DIR, "done")
  return [os.path.join(d, f) for f in sorted(os.listdir(d))]


def test_bad_slides_counted_and_skipped(tiny_slides, model, encoder, tmp_path):
  d = tmp_path / "slides"
  d.mkdir()
  good = str(d / "good.svs")
  os.symlink(tiny_slides.slide_paths[0], good)
  (d / "corrupt.svs").write_bytes(b"II*\x00" + b"\x00" * 100)
  synth.write_synthetic_slide(str(d / "blank.svs"), width=1024, seed=5, tissue_fraction=0.0)
  synth.write_synthetic_slide(str(d / "low.svs"), width=512, seed=6, mpp=2.0, app_mag=5)
  out = str(tmp_path / "out")
  code = cli.main(["embed-slides", "--model", model, "--slides", str(d / "*.svs"), "--magnification",
                   "10", "--out", out, "--batch-size", "16", "--no-progress"])
  assert code == 0
  m = json.load(open(os.path.join(out, es.MANIFEST)))
  assert m["counts"] == {**m["counts"], "slides": 4, "slides_embedded": 1, "slides_skipped": 3}
  assert m["skipped"]["by_reason"] == {"corrupt_or_truncated": 1, "no_tissue": 1,
                                       "magnification_unavailable": 1}
  assert {s["slide"] for s in m["skipped"]["slides"]} == {"corrupt", "blank", "low"}
  assert es.open_slide_embeddings(out).slide_ids == ["good"]


def test_encoder_mismatch_refused(tiny_slides, model, embedded, tmp_path, capsys):
  out, _ = embedded
  other = _model(tmp_path / "other", width=48, seed=3)
  code = cli.main(["embed-slides", "--model", other, "--slides", tiny_slides.slide_paths[0],
                   "--magnification", "10", "--out", out, "--no-progress"])
  err = capsys.readouterr().err
  assert code == 2 and "tiny-vit-32" in err and "tiny-vit-48" in err and "Traceback" not in err
  with pytest.raises(es.EncoderMismatchError, match="expected dimension 48"):
    es.open_slide_embeddings(out, dim=48, encoder="tiny-vit-48")
  with pytest.raises(es.EncoderMismatchError, match="tiny-vit-32"):
    es.open_slide_embeddings(out, encoder_hash="0" * 64)
  # A slide file from another encoder dropped into the directory is refused on load.
  emb_other = str(tmp_path / "emb_other")
  es.embed_slides(other, emb_other, magnification=MAG, slides=tiny_slides.slide_paths[:1],
                  progress=False)
  mixed = str(tmp_path / "mixed")
  import shutil
  shutil.copytree(out, mixed)
  shutil.copy(os.path.join(emb_other, es.SLIDES_DIR, "synth-000.safetensors"),
              os.path.join(mixed, es.SLIDES_DIR, "synth-000.safetensors"))
  emb = es.open_slide_embeddings(mixed)
  with pytest.raises(es.EncoderMismatchError, match="tiny-vit-48.*tiny-vit-32"):
    emb["synth-000"]
  with pytest.raises(KeyError, match="not in"):
    emb["nope"]


def test_unfinished_directory_refused(tmp_path):
  with pytest.raises(es.EmbedSlidesError, match="no manifest.json"):
    es.open_slide_embeddings(str(tmp_path))


def test_records_source(tiny_slides, model, encoder, tmp_path):
  from pathjax.input import tile
  rec = str(tmp_path / "records")
  tile.tile_slides(tiny_slides.slide_paths[:2], None, rec, magnifications=(5, 10), patch_size=PATCH,
                   progress=False)
  out = str(tmp_path / "out")
  res = es.embed_slides(model, out, magnification=MAG, records_dir=rec, encoder=encoder,
                        progress=False)
  m = res["manifest"]
  assert m["counts"]["slides_embedded"] == 2 and m["options"]["source"] == "records"
  rm = json.load(open(os.path.join(rec, "manifest.json")))
  assert m["counts"]["patches"] == rm["counts"]["patches_per_magnification"]["10"]
  emb = es.open_slide_embeddings(out)
  s = emb["synth-000"]
  np.testing.assert_array_equal(s.grid, s.coords // 128)
  # Asking for a magnification the records lack skips every slide with that reason.
  res = es.embed_slides(model, str(tmp_path / "out20"), magnification=20, records_dir=rec,
                        encoder=encoder, progress=False)
  assert res["manifest"]["skipped"]["by_reason"] == {"magnification_unavailable": 2}


@pytest.mark.slow
def test_two_real_processes_with_the_launcher(tiny_slides, model, embedded, tmp_path):
  """launch/local_multiprocess.sh: 2 JAX processes x 2 devices split the slides; process 0
  writes the manifest after the barrier; features equal the one-process run's."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / "out")
  cmd = ["bash", os.path.join(root, "launch", "local_multiprocess.sh"), "2", sys.executable, "-m",
         "pathjax", "embed-slides", "--model", model, "--slides",
         os.path.join(os.path.dirname(tiny_slides.slide_paths[0]), "*.svs"), "--magnification",
         "10", "--out", out, "--batch-size", "16"]
  env = dict(os.environ, DEVICES="2", LOGDIR=str(tmp_path), PYTHONPATH=root,
             PORT=str(20000 + os.getpid() % 20000 + 7))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  (logdir,) = glob.glob(str(tmp_path / "pathjax-launch.*"))  # the launcher's private log folder
  logs = [open(os.path.join(logdir, f"proc_{i}.log")).read() for i in (0, 1)]
  assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(l[-2000:] for l in logs)
  parts = [json.load(open(os.path.join(out, es.STATE_DIR, f"process-{i:05d}-of-00002.json")))
           for i in (0, 1)]
  assert [p["embedded"] for p in parts] == [2, 1]  # 3 slides dealt round-robin
  assert "wrote" in logs[0] and "wrote" not in logs[1]
  two, one = es.open_slide_embeddings(out), es.open_slide_embeddings(embedded[0])
  assert two.manifest["process_count"] == 2 and two.slide_ids == one.slide_ids
  for sid in one.slide_ids:
    np.testing.assert_allclose(two[sid].features.astype(np.float32),
                               one[sid].features.astype(np.float32), rtol=1e-2, atol=1e-3)
