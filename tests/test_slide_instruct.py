"""Slide instruction following: instruction data, chat encoding (assistant-only targets),
the <image> splice, LoRA (init == base, merged == adapted), frozen towers bit-identical and
out of checkpoints, crash/resume of both stages, 8 devices == 1, VQA evaluation and the
`pathjax chat` command."""

import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import instruct_helpers as IH
from pathjax.config_lib import ConfigError
from pathjax.input import instructions as inst
from pathjax.recipes.base import make_recipe
from train_helpers import assert_crash_resumes_exactly, fake_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return IH.make_all(str(tmp_path_factory.mktemp("instruct")), 16)


def _params(recipe, seed=0):
  return nn.unbox(jax.jit(recipe.init)(jax.random.key(seed), recipe.example_batch(8)))


# ----------------------------------------------------------------------------- data


def test_synthetic_instructions_are_deterministic_and_correct(tmp_path):
  frac = {"tumor": 0.55, "stroma": 0.3, "lymphocytes": 0.15, "adipose": 0.0, "necrosis": 0.0,
          "mucus": 0.0}
  a = inst.slide_instructions("s-1", frac, "Sections show tumor.", seed=3)
  assert a == inst.slide_instructions("s-1", frac, "Sections show tumor.", seed=3)
  assert a != inst.slide_instructions("s-1", frac, "Sections show tumor.", seed=4)
  tasks = [r["task"] for r in a]
  assert tasks.count("caption") == 1 and tasks.count("mcq") == 3 and tasks.count("open") == 2
  for r in a:
    if r["task"] != "mcq":
      continue
    q = r["messages"][0]["content"]
    assert q.startswith(inst.IMAGE) and r["messages"][1]["content"] == r["answer"]
    options = dict(line.split(". ", 1) for line in q.splitlines() if line[:2] in
                   ("A.", "B.", "C.", "D."))
    right = options[r["answer"]]
    if "dominates" in q:
      assert right == "tumor" and len(set(options.values())) == 4
    elif "absent" in q:
      assert frac[right] == 0 and all(frac[v] > 0 for k, v in options.items() if k != r["answer"])
    else:  # share
      cls = q.split("share of the tissue is ")[1].split("?")[0]
      assert right == inst.SHARE_BINS[inst._share_bin(frac[cls])]
  path = inst.write_instructions(str(tmp_path / "i.jsonl"), a)
  assert inst.read_instructions(path) == a
  assert inst.parse_choice(" (B) stroma") == "B" and inst.parse_choice("Because") is None
  options = ["tumor", "stroma", "10 to 25%", "mucus"]
  assert inst.parse_choice("Stroma.", options) == "B" and inst.parse_choice("10 to 25%", options) == "C"
  assert inst.parse_choice("stroma and tumor", options) is None and inst.parse_choice("D", options) == "D"
  # The same conversations about the report as text: the report where the slide was, no captions.
  text = inst.text_only_conversations(a, {"s-1": "Sections show tumor."})
  assert [r["task"] for r in text] == [r["task"] for r in a if r["task"] != "caption"]
  for r, t in zip([r for r in a if r["task"] != "caption"], text):
    assert t["messages"][0]["content"] == r["messages"][0]["content"].replace(inst.IMAGE, "Sections show tumor.")
    assert t["messages"][1:] == r["messages"][1:] and t.get("answer") == r.get("answer")
  assert inst.text_only_conversations(a, {}) == []
  # Answers as the option's text: the same questions, the reply is the gold option.
  b = inst.slide_instructions("s-1", frac, "Sections show tumor.", seed=3, answer_with="option")
  for r, o in zip(a, b):
    if r["task"] == "mcq":
      assert o["answer"] == r["answer"] and o["choices"] == r["choices"]
      assert o["messages"][1]["content"] == o["choices"][inst.LETTERS.index(o["answer"])]
      assert inst.parse_choice(o["messages"][1]["content"], o["choices"]) == o["answer"]
    else:
      assert o == r


def test_vqa_reports_a_constant_answer():
  from pathjax.evaluate.instruct import run_vqa

  class AlwaysC:
    def answer(self, slides, conversations, max_new_tokens):
      return ["C"] * len(slides)

  frac = {"tumor": 0.5, "stroma": 0.3, "lymphocytes": 0.2}
  records = [r for i in range(8) for r in inst.slide_instructions(f"s-{i}", frac, None, seed=i, mcq_per_slide=3)
             if r["task"] == "mcq"]
  res = run_vqa(records, AlwaysC(), report=lambda s: None)
  assert res.metrics["top_answer_share"] == 1.0 and res.metrics["unparsed"] == 0.0
  assert res.metrics["accuracy"] == np.mean([r["answer"] == "C" for r in records])



def test_synth_slides_directory_instructions(tmp_path):
  from pathjax import cli
  from pathjax.wsi import synth
  assert cli.main(["synth-slides", "--out", str(tmp_path), "--n", "2", "--seed", "1", "--size", "768",
                   "--magnifications", "10", "--instructions"]) == 0
  path = str(tmp_path / "instructions.jsonl")
  rows = inst.read_instructions(path)
  assert open(path).read() == open(inst.write_synthetic_instructions(
      str(tmp_path), str(tmp_path / "again.jsonl"), seed=1)).read()      # deterministic
  truth = synth.read_truth(os.path.join(tmp_path, synth.TRUTH_NAME))
  assert {r["slide"] for r in rows} == set(truth)
  dom = [r for r in rows if r["task"] == "mcq" and "dominates" in r["messages"][0]["content"]]
  for r in dom:
    f = truth[r["slide"]].fractions
    assert r["choices"][inst.LETTERS.index(r["answer"])] == max(f, key=f.get)


@pytest.mark.parametrize("line, match", [
    ('{"slide": "a"}', "messages"),
    ('{"slide": "a", "messages": [{"role": "user", "content": "hi"}, '
     '{"role": "assistant", "content": "x"}]}', "placeholders"),
    ('{"slide": "a", "messages": [{"role": "user", "content": "<image> q"}]}', "last message"),
    ('{"slide": "a", "task": "mcq", "messages": [{"role": "user", "content": "<image> q"}, '
     '{"role": "assistant", "content": "x"}]}', "A-D"),
    ("not json", "not JSON"),
])
def test_bad_instruction_lines_name_the_line(tmp_path, line, match):
  path = tmp_path / "bad.jsonl"
  path.write_text(line + "\n")
  with pytest.raises(inst.InstructionError, match=rf"line 1.*{match}|{match}"):
    inst.read_instructions(str(path))


def test_loss_mask_covers_assistant_tokens_only(paths):
  chat = inst.ChatEncoder(os.path.join(paths["llm"], "tokenizer"), 512)
  msgs = [{"role": "system", "content": "You are a pathologist."},
          {"role": "user", "content": "<image>\nWhich tissue dominates?"},
          {"role": "assistant", "content": "tumor"},
          {"role": "user", "content": "And the second?"},
          {"role": "assistant", "content": "stroma and fat"}]
  enc = chat.encode(msgs)
  assert not enc.truncated
  tok = chat.tok
  ids, tgt = enc.ids[enc.mask], enc.targets[enc.mask]
  # The target runs decode to the two answers, each closed by the end-of-turn eos.
  runs, cur = [], []
  for i, t in zip(ids, tgt):
    if t:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  eos = tok.eos_token
  assert [tok.decode(r) for r in runs] == [f"tumor{eos}", f"stroma and fat{eos}"]
  # Everything else (system, user turns, role headers) is context, and the image slot holds pad.
  context = tok.decode([int(i) for i, t in zip(ids, tgt) if not t])
  assert "You are a pathologist." in context and "And the second?" in context
  assert "tumor" not in context and "<|im_start|>assistant" in context
  assert ids[enc.image_pos] == chat.pad_id and not tgt[enc.image_pos]
  # The training prefix of the first answer equals the generation prompt, token for token.
  before, after = chat.prompt(msgs[:2])
  assert list(ids[:enc.image_pos]) == before
  assert list(ids[enc.image_pos + 1: enc.image_pos + 1 + len(after)]) == after
  assert tgt[enc.image_pos + 1 + len(after)] and not tgt[enc.image_pos + len(after)]


def test_tokenizer_without_chat_template_is_refused(paths, tmp_path):
  import shutil
  tok = str(tmp_path / "tok")
  shutil.copytree(os.path.join(paths["llm"], "tokenizer"), tok)
  for name in os.listdir(tok):
    if name == "chat_template.jinja":
      os.remove(os.path.join(tok, name))
  cfg_path = os.path.join(tok, "tokenizer_config.json")
  cfg = json.load(open(cfg_path))
  cfg.pop("chat_template", None)
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ConfigError, match="no chat template"):
    inst.ChatEncoder(tok, 64)


# ----------------------------------------------------------------------------- model


def test_splice_places_visual_tokens_exactly_at_the_image_slot():
  from pathjax.recipes.slide_instruct import splice
  b, length, t, h = 3, 7, 4, 2
  tokens = jnp.arange(b * length * h, dtype=jnp.float32).reshape(b, length, h)
  visual = -1.0 - jnp.arange(b * t * h, dtype=jnp.float32).reshape(b, t, h)
  tmask = jnp.arange(length)[None] < jnp.array([[7], [5], [6]])
  vmask = jnp.array([[True] * 4, [True, True, False, True], [True] * 4])
  pos = jnp.array([0, 2, 6])
  e, m, idx, is_vis = splice(tokens, visual, tmask, vmask, pos)
  assert e.shape == (b, length - 1 + t, h)
  for i in range(b):
    p = int(pos[i])
    want = np.concatenate([tokens[i, :p], visual[i], tokens[i, p + 1:]])
    np.testing.assert_array_equal(e[i], want)
    want_m = np.concatenate([tmask[i, :p], vmask[i], tmask[i, p + 1:]])
    np.testing.assert_array_equal(m[i], want_m)
    j = np.arange(length - 1 + t)
    np.testing.assert_array_equal(is_vis[i], (j >= p) & (j < p + t))
    src = np.concatenate([np.arange(p), np.arange(p + 1, length)])
    np.testing.assert_array_equal(np.asarray(idx[i])[~np.asarray(is_vis[i])], src)


def test_recipe_batch_and_loss_on_assistant_tokens(paths):
  r = make_recipe(IH.config(paths))
  assert r.visual_shape() == (8, 64)                   # PathAlign smoke: 8 queries of width 64
  params = _params(r)
  f = np.zeros((2, 24, 32), np.float32)
  tok, tmask = jax.jit(lambda p: r.predict_fns(p)["visual_tokens"](
      f, np.zeros((2, 24, 2), np.int32), np.ones((2, 24), bool)))(params)
  assert tok.shape == (2, 8, 64) and tok.dtype == jnp.float32 and bool(tmask.all())
  batch = next(r.train_iterator(0, 1))
  assert {x["task"] for x in r.records("train")} == {"caption"}       # stage 1: captions
  embeds, mask, out_ids, w = jax.jit(lambda p, b: r.inputs(p, b))(params, batch)
  assert embeds.shape == (8, 96 - 1 + 8, 64)
  # Targets in the spliced sequence are the batch's targets, shifted past the visual tokens.
  for i in range(8):
    p = int(batch["image_pos"][i])
    np.testing.assert_array_equal(np.asarray(w[i])[p + 8:], batch["targets"][i][p + 1:])
    assert not np.asarray(w[i])[:p + 8].any()
  loss, metrics = jax.jit(lambda p, b: r.loss(p, b, jax.random.key(0), True))(params, batch)
  assert np.isfinite(loss) and int(metrics["lm_tokens"]) == int(batch["targets"].sum())


def test_lora_at_init_equals_base_and_merged_weights_reproduce_adapted_logits(paths):
  s1 = make_recipe(IH.config(paths))
  s2 = make_recipe(IH.config(paths, "instruct_stage2,smoke"))
  assert s2.lora is not None and s2.lora.rank == 16 and s2.lora.scale == 2.0
  batch = next(s1.train_iterator(0, 1))
  p2 = _params(s2)
  adapters = {k for k in _flat(p2) if k.endswith(("lora_a", "lora_b"))}
  kinds = {k.split("/")[-2] for k in adapters}
  assert kinds == {"query", "key", "value", "out", "fc1_gate", "fc1_up", "fc2"}
  assert all(k.startswith("llm/") for k in adapters)       # never the projector
  base = _unflat({k: v for k, v in _flat(p2).items() if k not in adapters})

  def logits(recipe, params):
    e, m, _, _ = recipe.inputs(params, batch)
    return recipe._apply(params, type(recipe.model).lm, e, m)
  at_init = jax.jit(lambda p: logits(s2, p))(p2)
  plain = jax.jit(lambda p: logits(s1, p))(base)
  np.testing.assert_array_equal(np.asarray(at_init), np.asarray(plain))   # exactly
  # Non-zero adapters: the merged LLM (no adapters) gives the adapted logits.
  rng = np.random.default_rng(0)
  flat = _flat(p2)
  for k in adapters:
    if k.endswith("lora_b"):
      flat[k] = jnp.asarray(rng.normal(0, 0.05, flat[k].shape), flat[k].dtype)
  tuned = _unflat(flat)
  adapted = jax.jit(lambda p: logits(s2, p))(tuned)
  merged = dict(base, llm=s2.llm_params(tuned))
  assert not any(k.endswith("lora_a") for k in _flat(merged["llm"]))
  via_merge = jax.jit(lambda p: logits(s1, p))(merged)
  assert float(jnp.max(jnp.abs(adapted - plain))) > 1e-3
  np.testing.assert_allclose(np.asarray(via_merge), np.asarray(adapted), atol=1e-5, rtol=0)


def _flat(tree):
  from flax import traverse_util
  return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat):
  from flax import traverse_util
  return traverse_util.unflatten_dict(flat, sep="/")


def test_bad_configs_are_clear_errors(paths, tmp_path):
  with pytest.raises(ConfigError, match="encoder_dir is empty"):
    make_recipe(IH.config(paths, **{"model.encoder_dir": ""}))
  # An LLM directory is not an encoder: it has no stored training config.
  with pytest.raises(ConfigError, match="stores no training config"):
    make_recipe(IH.config(paths, **{"model.encoder_dir": paths["llm"]}))
  with pytest.raises(ConfigError, match="lora.targets"):
    make_recipe(IH.config(paths, "instruct_stage2,smoke", **{"model.lora.targets": ("q", "zz")}))
  with pytest.raises(ConfigError, match="instructions"):
    make_recipe(IH.config(paths, **{"data.instructions": str(tmp_path / "none.jsonl")})).records()


def test_shapes_variant_builds_the_step_without_model_directories():
  """`instruct_stage2,shapes` (pathjax compile): the align encoder's config and Qwen3-1.7B's
  layout, no directories; the state's shapes come out, and training refuses clearly."""
  from pathjax.config_lib import load_config_file
  from train_helpers import ROOT
  config = load_config_file(os.path.join(ROOT, "configs", "pathflip.py") + ":instruct_stage2,shapes")
  assert not config.model.encoder_dir and not config.model.llm_dir
  recipe = make_recipe(config)
  batch = recipe.example_batch(2)
  assert batch["features"].shape == (2, 10_240, 512)
  tree = jax.eval_shape(lambda k: nn.unbox(recipe.init(k, batch)), jax.random.key(0))
  assert tree["llm"]["embed"]["embedding"].shape == (151_936, 2048)
  assert set(tree["encoder"]) == {"qformer", "heads"}
  assert tree["projector"]["fc1"]["kernel"].shape[0] == 256     # the encoder's visual width
  with pytest.raises(ConfigError, match="shapes only"):
    recipe.train_iterator(0, 1)
  with pytest.raises(ConfigError, match="shapes only"):
    recipe.load_pretrained({}, set())


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
def test_stage2_keeps_encoder_and_llm_bit_identical_and_out_of_checkpoints(paths, tmp_path):
  from pathjax import train as train_lib
  from pathjax.models import model_dir
  s1 = IH.config(paths, total_steps=2, export_model=True)
  train_lib.train(s1, tmp_path / "s1")
  config = IH.config(paths, "instruct_stage2,smoke", total_steps=4, checkpoint_every=2,
                     log_every=2, export_model=True,
                     **{"model.init_dir": str(tmp_path / "s1" / "model")})
  recipe = make_recipe(config)
  seen = {}

  def capture(params, step):
    seen[step] = jax.device_get(params)
    return {}
  train_lib.train(config, tmp_path / "s2", recipe=recipe,
                  evaluators=[train_lib.Evaluator("capture", every=2, fn=capture)])
  llm = model_dir.load_model_dir(paths["llm"], towers=["llm"]).towers["llm"].params
  enc = model_dir.load_model_dir(paths["encoder"], towers=["qformer"]).towers["qformer"].params
  s1_proj = model_dir.load_model_dir(str(tmp_path / "s1" / "model"), towers=["projector"]).towers["projector"].params
  for step in (2, 4):
    got = _flat(seen[step]["llm"])
    for k, v in _flat(jax.device_get(llm)).items():
      np.testing.assert_array_equal(v, got[k], err_msg=k)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(enc), seen[step]["encoder"]["qformer"])
  lora_b = [v for k, v in _flat(seen[4]["llm"]).items() if k.endswith("lora_b")]
  assert lora_b and any(np.abs(b).max() > 0 for b in lora_b)              # adapters trained
  assert not np.array_equal(np.asarray(s1_proj["fc1"]["kernel"]), seen[4]["projector"]["fc1"]["kernel"])
  meta = "".join(open(f).read() for f in glob.glob(
      str(tmp_path / "s2" / "checkpoints" / "4" / "**" / "_METADATA"), recursive=True))
  assert "lora_a" in meta and "projector" in meta
  assert "encoder" not in meta and "embedding" not in meta and "final_norm" not in meta
  # The export: projector + merged LLM + tokenizer + the config to rebuild it.
  exported = model_dir.read_model_json(str(tmp_path / "s2" / "model"))
  assert set(exported["towers"]) == {"projector", "llm"} and exported["train_config"]["recipe"] == "slide_instruct"
  # VQA evaluation (exact letter match) on the held-out questions.
  from pathjax.evaluate.instruct import SlideChatModel, run_vqa
  records = recipe.records("heldout", tasks=("mcq",))
  res = run_vqa(records, SlideChatModel(recipe, seen[4], batch_size=4), report=lambda s: None)
  assert res.metrics["chance"] == 0.25 and 0.0 <= res.metrics["accuracy"] <= 1.0
  assert len(res.predictions) == len(records)


@pytest.mark.slow
def test_killed_stage1_run_resumes_exactly(paths, tmp_path):
  assert_crash_resumes_exactly(IH.config(paths, total_steps=6, checkpoint_every=2,
                                         keep_checkpoints=2), tmp_path)


@pytest.mark.slow
def test_killed_stage2_run_resumes_exactly(paths, tmp_path):
  assert_crash_resumes_exactly(IH.config(paths, "instruct_stage2,smoke", total_steps=6,
                                         checkpoint_every=2, keep_checkpoints=2), tmp_path)


def _eight_vs_one(root):
  """Runs in a process with 8 CPU devices (see test_eight_devices_equal_one)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  paths = IH.make_all(root, 16)
  recipe = make_recipe(IH.config(paths, "instruct_stage2,smoke"))
  batch = next(recipe.train_iterator(0, 1))
  params = _params(recipe)
  flat = _flat(params)
  rng = np.random.default_rng(1)
  for k in flat:
    if k.endswith("lora_b"):
      flat[k] = jnp.asarray(rng.normal(0, 0.05, flat[k].shape), flat[k].dtype)
  params = _unflat(flat)
  fn = jax.jit(lambda p, b: recipe.loss(p, b, jax.random.key(3), True))
  one = jax.device_get(fn(params, {k: np.asarray(v) for k, v in batch.items()}))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = {k: jax.device_put(np.asarray(v), NamedSharding(mesh, P("data"))) for k, v in batch.items()}
  eight = jax.device_get(fn(params, sharded))
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  for k in one[1]:
    np.testing.assert_allclose(eight[1][k], one[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
  print("EIGHT_EQUALS_ONE", float(one[0]))


@pytest.mark.slow
def test_eight_devices_equal_one(tmp_path):
  """The stage-2 loss (LoRA non-zero) of a batch sharded over 8 devices equals 1 device;
  in a fresh process (XLA_FLAGS must be set before jax starts)."""
  env = dict(os.environ, XLA_FLAGS=fake_devices(8),
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "import test_slide_instruct as t; "
                         f"t._eight_vs_one({str(tmp_path)!r})"], env=env, cwd=os.path.join(ROOT, "tests"),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "EIGHT_EQUALS_ONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------- chat


def _pathjax(*args, stdin=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "pathjax", *args], env=env, input=stdin,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_chat_cli_end_to_end(paths, tmp_path):
  from pathjax import train as train_lib
  train_lib.train(IH.config(paths, total_steps=2, export_model=True), tmp_path / "s1")
  train_lib.train(IH.config(paths, "instruct_stage2,smoke", total_steps=2, export_model=True,
                            **{"model.init_dir": str(tmp_path / "s1" / "model")}), tmp_path / "s2")
  model = str(tmp_path / "s2" / "model")
  slide = sorted(paths["labels_map"])[0]
  out = _pathjax("chat", "--model", model, "--slide", slide, "--question",
                 "Which tissue dominates?", "--max-new-tokens", "6")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() or out.stdout == "\n"
  # Two questions from stdin: one conversation, two answers (one line each at least).
  out = _pathjax("chat", "--model", str(tmp_path / "s1" / "model"), "--slide", slide,
                 "--max-new-tokens", "4", stdin="Describe this slide.\nAnd the tumor?\n")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("\n") >= 2
  # Clear errors: a missing slide, a model without an encoder.
  out = _pathjax("chat", "--model", model, "--slide", "no-such-slide", "--question", "hi")
  assert out.returncode == 2 and "no-such-slide" in out.stderr and "Traceback" not in out.stderr
  out = _pathjax("chat", "--model", paths["llm"], "--slide", slide, "--question", "hi")
  assert out.returncode == 2 and "not a slide chat model" in out.stderr and "Traceback" not in out.stderr


def test_lora_dropout_runs_through_the_scanned_llm(paths):
  """LoRA dropout needs a per-layer rng inside the LLM's nn.scan (split_rngs "dropout")."""
  r = make_recipe(IH.config(paths, "instruct_stage2,smoke", **{"model.lora.dropout": 0.5}))
  batch = next(r.train_iterator(0, 1))
  flat = _flat(_params(r))
  rng = np.random.default_rng(0)
  for k in flat:
    if k.endswith("lora_b"):
      flat[k] = jnp.asarray(rng.normal(0, 0.05, flat[k].shape), flat[k].dtype)
  params = _unflat(flat)
  fn = jax.jit(lambda p, k, train: r.loss(p, batch, k, train)[0], static_argnums=2)
  a, b = fn(params, jax.random.key(1), True), fn(params, jax.random.key(2), True)
  c, d = fn(params, jax.random.key(1), False), fn(params, jax.random.key(2), False)
  assert float(a) != float(b) and float(c) == float(d)


def test_answer_prior_picks_the_option_most_often_right_for_the_question():
  from pathjax.evaluate.instruct import answer_prior_accuracy

  def q(question, choices, answer):
    body = "\n".join(f"{l}. {c}" for l, c in zip(inst.LETTERS, choices))
    return {"messages": [{"role": "user", "content": f"{inst.IMAGE}\n{question}\n{body}"},
                         {"role": "assistant", "content": answer}],
            "task": "mcq", "answer": answer, "choices": choices}

  dom, share = "Which tissue dominates this slide?", "Roughly what share of the tissue is tumor?"
  train = [q(dom, ["tumor", "stroma", "mucus", "fat"], "A"), q(dom, ["stroma", "tumor", "mucus", "fat"], "B"),
           q(dom, ["stroma", "mucus", "tumor", "fat"], "A"),
           q(share, ["under 10%", "over 50%", "10 to 25%", "25 to 50%"], "B")]
  test = [q(dom, ["fat", "mucus", "stroma", "tumor"], "D"),        # tumor: right twice in training
          q(dom, ["fat", "mucus", "necrosis", "stroma"], "A"),     # stroma (once) beats fat (never)
          q(share, ["over 50%", "under 10%", "10 to 25%", "25 to 50%"], "A"),
          q("Roughly what share of the tissue is mucus?", ["over 50%", "under 10%", "10 to 25%",
                                                          "25 to 50%"], "B")]  # unseen: first option
  res = answer_prior_accuracy(train, test)
  assert res == {"accuracy": 0.5, "accuracy_dominant": 0.5, "accuracy_share": 0.5}
