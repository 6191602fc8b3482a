"""PathAlign recipe: data pipeline, bad input, losses, learning, resume, stage 2, evaluation."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pathalign_helpers as H
from pathjax.config_lib import ConfigError
from pathjax.recipes.base import make_recipe
from train_helpers import assert_crash_resumes_exactly


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  # 24 slides with 6..40 patches (max_patches 24 in smoke_config: some are sampled).
  return H.make_dataset(str(tmp_path_factory.mktemp("pathalign")), 24, dim=32)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_report_tokenizer_ids(data):
  recipe = make_recipe(H.smoke_config(data))
  tok = recipe.tokenizer
  ids, mask = tok(["Sections show lymphoma.", "Diagnosis: normal mucosa."])
  assert ids.shape == (2, 48) and ids.dtype == np.int32
  assert (ids[:, 0] == tok.cls_id).all()
  for row, m in zip(ids, mask):
    n = int(m.sum())
    assert row[n - 1] == tok.sep_id and (row[n:] == tok.pad_id).all() and m[:n].all()
  assert tok.dec_id not in (tok.cls_id, tok.sep_id, tok.pad_id)
  assert tok.decode(ids[0]) == "sections show lymphoma."


def test_pipeline_is_deterministic_resumable_and_split_by_process(data):
  recipe = make_recipe(H.smoke_config(data))
  train = recipe.data("train")
  m = recipe._num_patches()
  assert m == min(24, max(train.patches)) == 24
  a, b = recipe.train_iterator(0, 1), recipe.train_iterator(0, 1)
  first, second = _batches(a, 4), _batches(b, 4)
  for x, y in zip(first, second):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  batch = first[0]
  assert batch["features"].shape == (8, m, 32) and batch["coords"].shape == (8, m, 2)
  assert batch["text_ids"].shape == (8, 48) and batch["slide_index"].shape == (8,)
  # Real patches first, padding masked and zero.
  for i, pos in enumerate(batch["slide_index"]):
    n = min(train.patches[pos], m)
    assert batch["patch_mask"][i].sum() == n and not batch["features"][i, n:].any()
  # An explicit held-out set by slide-id pattern.
  explicit = make_recipe(H.smoke_config(data, **{"data.heldout_pattern": "-00[0-4]$"}))
  assert explicit.data("heldout").slide_ids == [f"slide-00{i}" for i in range(5)]
  assert len(explicit.data("train").slide_ids) == 19
  # Resume: the state after 2 batches gives batches 3 and 4 again.
  c = recipe.train_iterator(0, 1)
  _batches(c, 2)
  state = c.get_state()
  d = recipe.train_iterator(0, 1)
  d.set_state(state)
  for x, y in zip(_batches(d, 2), first[2:]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # Two processes: each half of every global batch, together the same slides.
  p0, p1 = recipe.train_iterator(0, 2), recipe.train_iterator(1, 2)
  for g, x, y in zip(first, _batches(p0, 4), _batches(p1, 4)):
    assert len(x["slide_index"]) == len(y["slide_index"]) == 4
    np.testing.assert_array_equal(np.sort(np.concatenate([x["slide_index"], y["slide_index"]])),
                                  np.sort(g["slide_index"]))


def test_patch_sampling_is_uniform_without_replacement_and_seeded_per_epoch(data):
  recipe = make_recipe(H.smoke_config(data))
  train = recipe.data("train")
  big = next(i for i, n in enumerate(train.patches) if n > 30)
  n_train = len(train.slide_ids)
  it = recipe.train_iterator(0, 1)
  seen = []
  for _ in range(3 * n_train // 8 + 1):
    batch = next(it)
    for i, pos in enumerate(batch["slide_index"]):
      if pos == big:
        seen.append(batch["coords"][i][batch["patch_mask"][i]])
  assert len(seen) >= 2
  full = {tuple(c) for c in train.embeddings[train.slide_ids[big]].grid}
  for s in seen:
    rows = {tuple(c) for c in s}
    assert len(rows) == len(s) == 24 and rows <= full   # no repeats, all real patches
  assert {tuple(map(tuple, s)) for s in seen} != {tuple(map(tuple, seen[0]))}  # new each epoch


def test_bad_inputs_are_clear_errors_or_counted_skips(data, tmp_path):
  # Another encoder's embeddings (dimension mismatch): a ConfigError naming both.
  slides, _ = H.synthetic_slides(4, dim=16)
  other = H.write_embeddings(str(tmp_path / "emb16"), slides, dim=16)
  with pytest.raises(ConfigError, match=r"16-dimensional.*expected dimension 32"):
    make_recipe(H.smoke_config(dict(data, embeddings=other))).data("train")
  # Unknown slides, an empty report, a slide without tissue: counted and listed.
  slides, labels = H.synthetic_slides(6, dim=32)
  emb = H.write_embeddings(str(tmp_path / "emb"), slides, dim=32, skipped={"blank-1": "no_tissue"})
  lines = H.report_lines(labels)
  lines[0]["report"] = "   "
  lines += [{"slide": "ghost-1", "report": "Sections show lymphoma."},
            {"slide": "blank-1", "report": "Sections show lymphoma."}]
  reports = str(tmp_path / "reports.jsonl")
  with open(reports, "w") as f:
    f.writelines(json.dumps(l) + "\n" for l in lines)
  recipe = make_recipe(H.smoke_config(dict(data, embeddings=emb, reports=reports),
                                      **{"data.holdout_fraction": 0.0}))
  s = recipe.data("train").summary
  assert s["paired"] == 5 and s["report_issues"] == {"empty_report": 1}
  assert s["slides_without_report"] == 1                      # the slide whose report is empty
  assert s["unknown_slides"] == 1 and s["reports_for_skipped_slides"] == ["blank-1"]
  assert s["skipped_by_embed_slides"] == {"no_tissue": 1}
  # Nothing paired at all: a clear error.
  with open(reports, "w") as f:
    f.write(json.dumps({"slide": "ghost-1", "report": "x"}) + "\n")
  with pytest.raises(ConfigError, match="no train slide has both an embedding"):
    make_recipe(H.smoke_config(dict(data, embeddings=emb, reports=reports))).data("train")
  # Missing data fields.
  with pytest.raises(ConfigError, match="data.embeddings"):
    make_recipe(H.smoke_config(dict(data, embeddings=""))).data("train")


def test_predict_fn_keys():
  from pathjax.config_lib import load_config_file
  from train_helpers import ROOT
  path = os.path.join(ROOT, "configs", "pathalign.py")
  s1 = make_recipe(load_config_file(path + ":stage1"))
  assert set(s1.predict_fns(None)) == {"slide", "text", "itm", "visual_tokens"}
  assert s1.frozen_patterns() == ()
  s2 = make_recipe(load_config_file(path + ":stage2"))
  assert set(s2.predict_fns(None)) == {"slide", "text", "itm", "visual_tokens", "generate"}
  assert s2.frozen_patterns() == (r"llm/.*",)
  shapes = s2.example_batch(4)
  assert shapes["features"].shape == (4, 10_240, 384) and shapes["llm_ids"].shape == (4, 64)
  r = make_recipe(load_config_file(path + ":retrieval"))
  assert r.qformer.num_queries == 1 and r.config.loss.w_itm == r.config.loss.w_itg == 0


@pytest.mark.slow
def test_stage1_loss_on_8_devices_equals_1_device(data):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import flax.linen as nn
  recipe = make_recipe(H.smoke_config(data))
  batch = next(recipe.train_iterator(0, 1))
  params = nn.unbox(jax.jit(recipe.init)(jax.random.key(0), recipe.example_batch(8)))
  fn = jax.jit(lambda p, b: recipe.loss(p, b, jax.random.key(3), True))
  one = jax.device_get(fn(params, {k: np.asarray(v) for k, v in batch.items()}))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = {k: jax.device_put(np.asarray(v), NamedSharding(mesh, P("data"))) for k, v in batch.items()}
  eight = jax.device_get(fn(params, sharded))
  assert np.isfinite(one[0]) and one[0] > 0
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  for k in one[1]:
    np.testing.assert_allclose(eight[1][k], one[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert {"itc", "itm", "itg", "itm_accuracy", "itg_accuracy"} <= set(one[1])


@pytest.mark.slow
def test_learns_retrieval_and_zero_shot_above_chance(tmp_path):
  """Training with config.evals (the registry's slide tasks on held-out slides)."""
  from pathjax.evaluate.registry import eval_config
  from pathjax.metrics_log import read_metrics
  from pathjax.train import train
  d = H.make_dataset(str(tmp_path / "data"), 48, dim=32)
  config = H.smoke_config(d, total_steps=60, log_every=20, checkpoint_every=1000)
  config.evals = [eval_config(kind="slide_retrieval", data="heldout", every=60, k=5),
                  eval_config(kind="slide_zeroshot", data="heldout", every=60, labels=d["labels"])]
  train(config, tmp_path / "run")
  last = [r for r in read_metrics(str(tmp_path / "run")) if r["step"] == 60][-1]
  r = lambda k: last[f"slide_retrieval/{k}"]
  # Reports name the class in one of 3 phrasings the features do not encode: top-1 by
  # class alone is about 1/3 of reports, chance is 1 / (distinct reports).
  assert r("slide_to_report/itc_top1") >= 2 * r("slide_to_report/chance_top1")
  assert r("report_to_slide/itc_top1") >= 2 * r("report_to_slide/chance_top1")
  assert last["slide_zeroshot/auc"] >= 0.9
  assert last["slide_zeroshot/balanced_accuracy"] > 0.5 > last["slide_zeroshot/chance_balanced_accuracy"]


@pytest.mark.slow
def test_killed_stage1_run_resumes_exactly(data, tmp_path):
  config = H.smoke_config(data, total_steps=6, checkpoint_every=2, keep_checkpoints=2)
  assert_crash_resumes_exactly(config, tmp_path)


@pytest.mark.slow
def test_killed_stage2_run_resumes_exactly(data, tmp_path):
  """The frozen LLM is reloaded (not restored) on the rerun; the rest comes from the checkpoint."""
  llm = H.tiny_llm_dir(str(tmp_path / "llm"))
  config = H.smoke_config(data, "smoke,stage2", total_steps=6, checkpoint_every=2,
                          keep_checkpoints=2, **{"model.llm_dir": llm})
  assert_crash_resumes_exactly(config, tmp_path)


@pytest.mark.slow
def test_stage2_keeps_the_llm_bit_identical_and_out_of_the_checkpoint(data, tmp_path):
  from pathjax import train as train_lib
  from pathjax.models import model_dir
  llm = H.tiny_llm_dir(str(tmp_path / "llm"))
  train_lib.train(H.smoke_config(data, total_steps=2, export_model=True), tmp_path / "s1")
  config = H.smoke_config(data, "smoke,stage2", total_steps=4, checkpoint_every=2, log_every=2,
                          **{"model.init_dir": str(tmp_path / "s1" / "model"),
                             "model.llm_dir": llm})
  recipe = make_recipe(config)
  seen = {}

  def capture(params, step):
    seen[step] = jax.device_get(params)
    return {}
  train_lib.train(config, tmp_path / "s2", recipe=recipe,
                  evaluators=[train_lib.Evaluator("capture", every=2, fn=capture)])
  ref = model_dir.load_model_dir(llm, towers=["llm"]).towers["llm"].params
  for step in (2, 4):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref), seen[step]["llm"])
  s1 = model_dir.load_model_dir(str(tmp_path / "s1" / "model"), towers=["qformer"]).towers["qformer"]
  assert not np.array_equal(np.asarray(s1.params["query_tokens"]), seen[4]["qformer"]["query_tokens"])
  meta = "".join(open(f).read() for f in glob.glob(
      str(tmp_path / "s2" / "checkpoints" / "4" / "**" / "_METADATA"), recursive=True))
  assert "qformer" in meta and "llm" not in meta
  # Generation from soft prompts (greedy and beam) returns one report per slide.
  from pathjax.evaluate.slides import SlideModel, eval_set
  ds = eval_set(recipe, "heldout")
  arr = SlideModel(recipe, seen[4]).slide_arrays(ds)
  args = [arr[k][:2] for k in ("features", "coords", "patch_mask")]
  assert len(recipe.generate(seen[4], *args, max_new_tokens=4)) == 2
  assert len(recipe.generate(seen[4], *args, max_new_tokens=4, num_beams=2)) == 2
  from pathjax.evaluate.slides import SlideModel, run_report_generation
  res = run_report_generation(ds, SlideModel(recipe, seen[4], batch_size=4), max_new_tokens=4,
                              report=lambda s: None)
  assert len(res.predictions) == len(ds) and "bleu" in res.metrics["model"]
  assert "bleu" in res.metrics["most_frequent_report"]


def test_generation_after_prefix_embeddings_equals_the_same_tokens_as_ids(tmp_path):
  """Soft prompts: embeddings of tokens given as a prefix generate what the tokens do."""
  from pathjax.generate import Generator
  from pathjax.models.llm import LLM
  module = LLM(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=48, scan=True)
  import flax.linen as nn
  params = nn.unbox(jax.jit(module.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree.map(lambda x: x * 4.0, params)   # sharper logits: no near-ties
  gen = Generator(module, params, eos_ids=[63], pad_id=0, bucket=8)
  prompts = [[5, 9, 11, 3, 7], [4, 8, 2]]
  head = 2
  prefix = np.stack([np.asarray(params["embed"]["embedding"])[p[:head]] for p in prompts])
  for beams in (1, 3):
    full = gen.generate(prompts, max_new_tokens=6, num_beams=beams)
    split = gen.generate([p[head:] for p in prompts], prefix=prefix, max_new_tokens=6,
                         num_beams=beams)
    assert split == full


def test_retrieval_metrics_and_chance_levels_on_known_embeddings():
  """run_retrieval's ranking, ITM re-ranking and chance against hand-made embeddings."""
  from pathjax.evaluate.slides import SlideEvalSet, chance_at_k, run_retrieval
  texts = ["a", "b", "c", "a"]                      # slides 0 and 3 share report "a"
  ds = SlideEvalSet(["s0", "s1", "s2", "s3"], texts, data=None)
  basis = np.eye(3, dtype=np.float32)
  t_of = {"a": basis[0], "b": basis[1], "c": basis[2]}

  class Fake:
    # slide 1 looks like report "c" to ITC; ITM knows the truth.
    def embed_slides(self, ds):
      rows = [t_of["a"], t_of["c"] * 0.9 + t_of["b"] * 0.1, t_of["c"], t_of["a"]]
      return np.stack([r / np.linalg.norm(r) for r in rows])[:, None, :]

    def embed_texts(self, texts):
      return np.stack([t_of[t] for t in texts])

    def match(self, ds, slides, texts):
      return np.array([1.0 if ds.texts[s] == t else 0.0 for s, t in zip(slides, texts)])

  r = run_retrieval(ds, Fake(), ks=(1, 2), rerank_k=2, report=lambda s: None).metrics
  assert r["slide_to_report/itc_top1"] == 0.75 and r["slide_to_report/itm_top1"] == 1.0
  assert r["slide_to_report/chance_top1"] == pytest.approx(1 / 3)
  assert r["slide_to_report/chance_top2"] == pytest.approx(2 / 3)
  # report -> slide: "a" has 2 correct slides of 4.
  assert r["report_to_slide/chance_top1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
  assert r["report_to_slide/itm_top1"] == 1.0
  pos = np.zeros((1, 10), bool)
  pos[0, :3] = True
  assert chance_at_k(pos, (1, 2))[2] == pytest.approx(1 - (7 * 6) / (10 * 9))


def test_llm_text_targets_and_pickling(tmp_path):
  """Stage-2 LLM inputs: prompt then report + eos, targets on the report only; survives
  pickling (Grain workers)."""
  import pickle
  from pathjax.recipes.pathalign import LLMText
  from llm_helpers import train_tokenizer
  tok = train_tokenizer(str(tmp_path / "tok"))
  t = LLMText(tok, "the slide shows", 24, eos_id=2, pad_id=0)
  enc = t.encode("invasive carcinoma of the gland")
  n, p = int(enc["llm_mask"].sum()), len(t.prompt_ids)
  assert t.prompt_ids[0] == 1 and list(enc["llm_ids"][:p]) == t.prompt_ids
  assert enc["llm_ids"][n - 1] == 2 and (enc["llm_ids"][n:] == 0).all()
  assert not enc["llm_targets"][:p].any() and enc["llm_targets"][p:n].all() and not enc["llm_targets"][n:].any()
  assert t.decode(enc["llm_ids"][p:]) == "invasive carcinoma of the gland"
  u = pickle.loads(pickle.dumps(t))
  for k, v in u.encode("invasive carcinoma of the gland").items():
    np.testing.assert_array_equal(v, enc[k])
  assert u.decode(enc["llm_ids"][p:]) == "invasive carcinoma of the gland"
