"""Tokenization: CLIP-compatible BPE training, loading through transformers, fixed-length ids."""

import pickle
import json

import numpy as np
import pytest

from pathjax.input import tokenize

WORDS = ("tumor stroma lymphocytes nuclei gland mucosa epithelium necrosis adipose mitoses "
         "atypia follicles mantle zone plasma cells dense loose pink purple").split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, rng.integers(3, 20))) + "." for _ in range(500)]
  return tokenize.train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=800)


def test_trained_tokenizer_loads_through_transformers(tok_dir):
  from transformers import AutoTokenizer, CLIPTokenizerFast
  auto = AutoTokenizer.from_pretrained(tok_dir)
  clip = CLIPTokenizerFast.from_pretrained(tok_dir)
  text = "Dense Lymphocytes in the mantle zone, 40x! é"
  assert auto(text)["input_ids"] == clip(text)["input_ids"]
  tt = tokenize.TextTokenizer(tok_dir, context_length=77)
  ids = tt(text)
  n = len(auto(text)["input_ids"])
  assert list(ids[:n]) == auto(text)["input_ids"]  # same as transformers' bos ... eos
  assert auto.decode(auto(text)["input_ids"], skip_special_tokens=True).startswith("dense lymphocytes")
  assert len(auto) <= 800


def test_fixed_length_ids_and_special_ids(tok_dir):
  tt = tokenize.TextTokenizer(tok_dir, context_length=16)
  assert tt.pad_id not in (tt.eos_id, tt.bos_id)
  assert tt.eos_is_max  # eos is the largest id: argmax(ids) also finds the end of text
  ids = tt(["tumor", "", "dense stroma with plasma cells"])
  assert ids.shape == (3, 16) and ids.dtype == np.int32
  assert (ids[:, 0] == tt.bos_id).all()
  enc = tt.encode(["tumor", "", "dense stroma with plasma cells"])
  assert list(enc["eot_index"]) == [int(np.argmax(r == tt.eos_id)) for r in ids]
  assert enc["eot_index"][1] == 1
  for row, eot in zip(ids, enc["eot_index"]):
    assert (row == tt.eos_id).sum() == 1
    assert (row[eot + 1:] == tt.pad_id).all()
    assert int(np.argmax(row)) == eot
  assert tt.decode(ids[2]) .replace(" ", "") == "densestromawithplasmacells"


def test_truncation_keeps_eos_last(tok_dir):
  tt = tokenize.TextTokenizer(tok_dir, context_length=8)
  long = " ".join(WORDS * 3)
  ids = tt([long, "tumor"])
  assert ids[0, 0] == tt.bos_id and ids[0, -1] == tt.eos_id
  assert (ids[0, 1:-1] != tt.eos_id).all() and (ids[0, 1:-1] != tt.pad_id).all()
  full = tokenize.TextTokenizer(tok_dir, context_length=200)(long)
  assert list(ids[0, 1:-1]) == list(full[1:7])  # the first tokens are kept


def test_round_trip_and_pickle(tok_dir):
  tt = tokenize.TextTokenizer(tok_dir, context_length=32)
  for text in ("mantle zone follicles", "plasma cells, dense."):
    assert tt.decode(tt(text)).replace(" ", "") == text.replace(" ", "")
  clone = pickle.loads(pickle.dumps(tt))
  texts = ["necrosis and atypia", "x" * 40]
  assert np.array_equal(clone(texts), tt(texts))
  assert clone.eos_id == tt.eos_id and clone.pad_id == tt.pad_id


def test_unseen_characters_are_never_eos(tok_dir):
  tt = tokenize.TextTokenizer(tok_dir, context_length=32)
  ids = tt("Ωμέγα 漢字 ~~ 123")
  assert (ids == tt.eos_id).sum() == 1


def test_pad_falls_back_when_tokenizer_pads_with_eos(tok_dir):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(tok_dir)
  hf.pad_token = tokenize.EOS  # OpenAI CLIP's convention
  tt = tokenize.TextTokenizer(hf, context_length=16)
  assert tt.pad_id == 0 and tt.pad_id != tt.eos_id


def test_tokenizer_cli(tmp_path):
  captions = tmp_path / "captions.jsonl"
  rng = np.random.default_rng(1)
  lines = [json.dumps({"caption": " ".join(rng.choice(WORDS, 8))}) for _ in range(200)]
  lines += ["{not json", json.dumps({"other": 1}), ""]
  captions.write_text("\n".join(lines) + "\n")
  out = tmp_path / "tok"
  from pathjax import cli
  assert cli.main(["tokenizer", "train", "--captions", str(captions), "--out", str(out),
                   "--vocab-size", "700"]) == 0
  tt = tokenize.TextTokenizer(str(out), 77)
  assert tt.vocab_size <= 700
  assert cli.main(["tokenizer", "train", "--captions", str(tmp_path / "none.jsonl"),
                   "--out", str(out)]) == 2


def test_training_twice_gives_the_same_ids(tok_dir, tmp_path):
  """The trainer numbers its initial alphabet in hash-set order; the saved vocabulary must
  not: same texts, same ids, so a rerun of a training run reads the same token ids."""
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, rng.integers(3, 20))) + "." for _ in range(500)]
  again = tokenize.train_bpe_tokenizer(texts, str(tmp_path / "again"), vocab_size=800)
  first = json.loads(open(f"{tok_dir}/vocab.json", encoding="utf-8").read())
  second = json.loads(open(f"{again}/vocab.json", encoding="utf-8").read())
  assert first == second
  assert open(f"{tok_dir}/tokenizer.json").read() == open(f"{again}/tokenizer.json").read()
