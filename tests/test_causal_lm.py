"""Causal-LM recipe: data rows and masks, the loss against its formula, a tiny decoder that
learns sentences and generates them from an export, LoRA finetuning that leaves the base
bit-identical, and exact resumption."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pathjax import config_lib
from pathjax.config_lib import ConfigError
from pathjax.models import llm as llm_lib
from pathjax.models import lora as lora_lib
from pathjax.models import model_dir
from pathjax.recipes import causal_lm
from pathjax.train import Evaluator, train
from train_helpers import ROOT, assert_crash_resumes_exactly

CONFIG = os.path.join(ROOT, "configs", "causal_lm.py")
SENTENCES = ["The slide shows invasive ductal carcinoma with necrosis.",
             "Benign breast tissue with fibrocystic change.",
             "Lymph node with metastatic carcinoma in two of three nodes."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A JSON-lines file of repeated sentences and a causal tokenizer trained on it."""
  root = tmp_path_factory.mktemp("lm")
  path = root / "reports.jsonl"
  with open(path, "w") as f:
    for i in range(24):
      f.write(json.dumps({"slide": f"s{i}", "report": SENTENCES[i % 3]}) + "\n")
  return str(path), str(root / "tokcache")


def _config(corpus, variant="smoke", **overrides):
  path, cache = corpus
  items = [f"data.path={path}", f"data.tokenizer_cache={cache}", "data.tokenizer_vocab_size=400",
           "data.seq_len=32", "batch_size=8", "log_every=1", "checkpoint_every=1000"]
  items += [f"{k}={v}" for k, v in overrides.items()]
  return config_lib.load_config(f"{CONFIG}:{variant}", items)


def test_rows_padded_and_packed():
  seqs = [np.array([1, 5, 6, 2]), np.array([1, 7, 2])]
  padded = causal_lm.make_examples(seqs, 4, pad_id=0, packing=False)
  np.testing.assert_array_equal(padded["inputs"], [[1, 5, 6, 2], [1, 7, 2, 0]])
  np.testing.assert_array_equal(padded["targets"], [[5, 6, 2, 0], [7, 2, 0, 0]])
  np.testing.assert_array_equal(padded["loss_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(padded["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
  cut = causal_lm.make_examples(seqs, 2, pad_id=0, packing=False)
  np.testing.assert_array_equal(cut["targets"], [[5, 6], [7, 2]])
  packed = causal_lm.make_examples(seqs, 3, pad_id=0, packing=True)
  # stream 1 5 6 2 1 7 2: rows of 4 tokens with one of overlap
  np.testing.assert_array_equal(packed["inputs"], [[1, 5, 6], [2, 1, 7]])
  np.testing.assert_array_equal(packed["targets"], [[5, 6, 2], [1, 7, 2]])
  assert packed["loss_mask"].all() and packed["attention_mask"].all()
  with pytest.raises(ConfigError, match="fewer than one packed row"):
    causal_lm.make_examples(seqs, 10, pad_id=0, packing=True)


def test_loss_equals_direct_formula(corpus):
  recipe = causal_lm.make_recipe(_config(corpus))
  rows = recipe.examples()
  assert rows["inputs"].shape[1] == 32 and not rows["loss_mask"].all()  # padding is masked
  batch = {k: jnp.asarray(v[:6]) for k, v in rows.items()}
  params = recipe.init(jax.random.key(0), recipe.example_batch(6))
  loss, metrics = recipe.loss(params, batch, jax.random.key(1), train=True)
  logits = np.asarray(recipe.model.apply({"params": params}, batch["inputs"],
                                         attention_mask=batch["attention_mask"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"], np.float64)
  np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-5)
  assert float(metrics["tokens"]) == mask.sum()
  # The tokenizer was trained offline on the texts; rows are [bos] text [eos].
  tok = recipe.tokenizer
  assert rows["inputs"][0, 0] == tok.bos_token_id
  assert tok.eos_token_id in rows["targets"][0]


def test_bad_data_is_a_config_error(tmp_path, corpus):
  with pytest.raises(ConfigError, match="data.path is empty"):
    causal_lm.make_recipe(_config(corpus, **{"data.path": ""})).texts
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"report": "ok"}\n{"text": "no report field"}\n')
  with pytest.raises(ConfigError, match=r"bad.jsonl:2: no string field 'report'"):
    causal_lm.make_recipe(_config(corpus, **{"data.path": str(bad)})).texts
  with pytest.raises(ConfigError, match="init_dir"):
    causal_lm.make_recipe(_config(corpus, "finetune"))


def _generate_from_prefix(model_path, sentence, words=3):
  from pathjax.generate import load_generator
  generator, tok = load_generator(model_path)
  prompt = tok(" ".join(sentence.split()[:words]))["input_ids"]
  out = generator.generate([prompt], max_new_tokens=40)[0]
  assert out[-1] in generator.eos_ids  # it stops by itself
  return tok.decode(prompt + out, skip_special_tokens=True)


@pytest.mark.slow
def test_tiny_lm_learns_sentences_and_generates_them_from_its_export(corpus, tmp_path, capsys):
  config = _config(corpus, total_steps=80, log_every=20)
  final = train(config, tmp_path)
  assert final["loss"] < 0.3, final
  module, params, meta = llm_lib.load_llm(str(tmp_path / "model"))
  assert module.num_layers == 2 and module.tie_embeddings
  assert meta["tokenizer_dir"] and meta["generation"]["eos_token_id"]
  for sentence in SENTENCES:
    assert _generate_from_prefix(str(tmp_path / "model"), sentence) == sentence
  # The command line loads the same directory.
  from pathjax.cli import main
  capsys.readouterr()
  assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "Lymph node with",
               "--max-new-tokens", "40"]) == 0
  # It prints the continuation of the prompt.
  assert "Lymph node with " + capsys.readouterr().out.strip() == SENTENCES[2]


@pytest.fixture(scope="module")
def base_dir(corpus, tmp_path_factory):
  """A random tiny Llama-layout model directory with the corpus tokenizer (a finetune base)."""
  recipe = causal_lm.make_recipe(_config(corpus))
  params = recipe.init(jax.random.key(3), recipe.example_batch(8))
  out = str(tmp_path_factory.mktemp("base") / "model")
  return model_dir.save_model_dir(out, **recipe.export(params))


@pytest.mark.slow
def test_lora_finetune_trains_adapters_only_and_base_stays_bit_identical(corpus, base_dir, tmp_path):
  config = _config(corpus, "finetune", **{"model.init_dir": base_dir, "total_steps": 4,
                                          "lora.rank": 4})
  seen = {}

  def capture(params, step):
    seen[step] = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    return {}

  train(config, tmp_path, evaluators=[Evaluator("capture", every=2, fn=capture)])
  reader = model_dir.params_reader(base_dir)
  base = {k[len("llm/params/"):]: reader.get(k) for k in reader}
  adapters = [k for k in seen[4] if lora_lib.is_adapter(k)]
  assert adapters and all(k in seen[4] for k in base)
  for step in (2, 4):
    for k, v in base.items():
      np.testing.assert_array_equal(seen[step][k], v, err_msg=k)
  assert all(not np.array_equal(seen[2][k], seen[4][k]) for k in adapters if k.endswith("lora_b"))
  # The export folds the adapters in: kernels move, everything else is the base bit for bit.
  _, merged, _ = llm_lib.load_llm(str(tmp_path / "model"))
  merged = traverse_util.flatten_dict(jax.device_get(merged), sep="/")
  assert sorted(merged) == sorted(base)
  for k, v in base.items():
    if any(f"/{t}/kernel" in k for t in ("query", "key", "value", "out", "fc1_gate", "fc1_up", "fc2")):
      assert not np.array_equal(merged[k], v), k
    else:
      np.testing.assert_array_equal(merged[k], v, err_msg=k)


@pytest.mark.slow
def test_crash_then_rerun_matches_uninterrupted_run(corpus, tmp_path):
  config = _config(corpus, total_steps=6, checkpoint_every=2, keep_checkpoints=2,
                   export_model=False)
  assert_crash_resumes_exactly(config, tmp_path)


def test_tokenizer_cli_trains_a_causal_tokenizer(corpus, tmp_path, capsys):
  from transformers import AutoTokenizer

  from pathjax.cli import main
  out = tmp_path / "tok"
  assert main(["tokenizer", "train", "--captions", corpus[0], "--field", "report", "--kind",
               "causal", "--vocab-size", "300", "--out", str(out)]) == 0
  tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  ids = tok(SENTENCES[0])["input_ids"]
  assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
  assert tok.decode(ids, skip_special_tokens=True) == SENTENCES[0]  # case kept, exact
  capsys.readouterr()
  assert main(["tokenizer", "train", "--captions", corpus[0], "--field", "report", "--kind",
               "causal", "--out", str(out)]) == 2          # never overwrites a directory
  assert "not empty" in capsys.readouterr().err


def test_packed_rows_and_predict_fns(corpus):
  recipe = causal_lm.make_recipe(_config(corpus, **{"data.packing": True, "data.seq_len": 16}))
  rows = recipe.examples()
  seqs = causal_lm.encode_texts(recipe.tokenizer, recipe.texts)
  assert rows["inputs"].shape == ((sum(map(len, seqs)) - 1) // 16, 16)
  assert rows["loss_mask"].all() and rows["attention_mask"].all()
  np.testing.assert_array_equal(rows["inputs"][1:, 0], rows["targets"][:-1, -1])  # one overlap
  assert set(recipe.predict_fns(None)) == {"logits", "generate"}
  params = recipe.init(jax.random.key(0), recipe.example_batch(2))
  fns = recipe.predict_fns(params)
  logits = fns["logits"](jnp.asarray(rows["inputs"][:2]))
  assert logits.shape == (2, 16, recipe.model.vocab_size)
  out = fns["generate"]([[recipe.tokenizer.bos_token_id]], max_new_tokens=3)
  assert len(out) == 1 and 1 <= len(out[0]) <= 3


@pytest.fixture(scope="module")
def chat_base(base_dir, tmp_path_factory):
  """The finetune base with a ChatML-style template on its tokenizer."""
  import shutil
  from pathjax.input import instructions as inst
  out = str(tmp_path_factory.mktemp("chat") / "model")
  shutil.copytree(base_dir, out)
  inst.add_chat_template(os.path.join(out, model_dir.read_model_json(out)["tokenizer"]))
  return out


def _write_chats(path, conversations):
  with open(path, "w") as f:
    for msgs in conversations:
      f.write(json.dumps({"messages": msgs}) + "\n")
  return str(path)


def test_chat_rows_target_exactly_the_assistant_turns(corpus, chat_base, tmp_path):
  from transformers import AutoTokenizer
  chats = [[{"role": "user", "content": "Which tumor?"}, {"role": "assistant", "content": "Carcinoma."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Nodes?"},
            {"role": "assistant", "content": "Two of three."}, {"role": "user", "content": "Necrosis?"},
            {"role": "assistant", "content": "Yes."}]]
  path = _write_chats(tmp_path / "chat.jsonl", chats)
  recipe = causal_lm.make_recipe(_config(corpus, **{"model.init_dir": chat_base, "data.path": path,
                                                    "data.field": "messages", "data.seq_len": 256}))
  ex = recipe.examples()
  tok = AutoTokenizer.from_pretrained(recipe.tokenizer_dir, local_files_only=True)
  for i, msgs in enumerate(chats):
    targets = ex["targets"][i][ex["loss_mask"][i]]
    # The targeted tokens are each assistant answer followed by eos, nothing else.
    expected = []
    for m in msgs:
      if m["role"] == "assistant":
        expected += tok(m["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert targets.tolist() == expected
    np.testing.assert_array_equal(ex["inputs"][i][1:], ex["targets"][i][:-1])
  assert ex["attention_mask"].sum() > ex["loss_mask"].sum()
  # A text-only prompt for generation: the whole rendered conversation, nothing after an image.
  from pathjax.input import instructions as inst
  enc = inst.ChatEncoder(recipe.tokenizer_dir, 256, image=False)
  before, after = enc.prompt(chats[0][:1])
  assert after == [] and before == tok(enc.render(chats[0][:1], generation_prompt=True),
                                       add_special_tokens=False)["input_ids"]


def test_chat_data_errors_name_the_fix(corpus, base_dir, chat_base, tmp_path):
  with_image = _write_chats(tmp_path / "img.jsonl", [[{"role": "user", "content": "<image>\nWhat?"},
                                                      {"role": "assistant", "content": "Tumor."}]])
  plain = _write_chats(tmp_path / "plain.jsonl", [[{"role": "user", "content": "What?"},
                                                   {"role": "assistant", "content": "Tumor."}]])
  chat = {"data.field": "messages", "data.seq_len": 64}
  cases = [(dict(chat, **{"model.init_dir": chat_base, "data.path": with_image}), "<image>"),
           (dict(chat, **{"model.init_dir": base_dir, "data.path": plain}), "chat template"),
           (dict(chat, **{"data.path": plain}), "chat template"),
           (dict(chat, **{"model.init_dir": chat_base, "data.path": plain, "data.packing": True}),
            "packing=false"),
           (dict(chat, **{"model.init_dir": chat_base, "data.path": str(tmp_path / "none.jsonl")}),
            "data.path=.*not a file")]
  for overrides, words in cases:
    with pytest.raises(ConfigError, match=words):
      causal_lm.make_recipe(_config(corpus, **overrides)).examples()
