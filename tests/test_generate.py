"""Generation: cache == no cache token for token; greedy and beam search equal
transformers' generate on the same random model; sampling; stop tokens; the CLI."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax import generate as gen_lib
from pathjax.convert import hf_llm
from pathjax.models import llm as llm_lib

torch = pytest.importorskip("torch", reason="parity references need torch (pip install -e .[reference])")
transformers = pytest.importorskip("transformers")

import llm_helpers as H  # noqa: E402

pytestmark = pytest.mark.reference
PROMPTS = [[5, 9, 33, 101, 7, 250, 12], [44, 17, 300], [8, 8, 120, 64, 3]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gen")
  ref = H.hf_model(H.hf_config("qwen2", False, eos_token_id=None), seed=3)
  src = H.save_hf_dir(ref, str(tmp / "hf"))
  out = hf_llm.convert_to_model_dir(src, str(tmp / "pj"), log=lambda s: None)
  return ref, out


def _generator(path, **kw):
  """A generator without stop ids (the tokenizer's </s> would otherwise be one)."""
  generator, _ = gen_lib.load_generator(path, bucket=16, **kw)
  generator.eos_ids = []
  return generator


def _hf_generate(ref, prompts, **kw):
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  with torch.no_grad():
    out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       do_sample=False, pad_token_id=0, **kw)
  return out[:, width:].numpy()


def test_greedy_equals_transformers_32_tokens(converted):
  ref, path = converted
  generator = _generator(path)
  got = generator.generate(PROMPTS, max_new_tokens=32)
  want = _hf_generate(ref, PROMPTS, max_new_tokens=32)
  assert [len(g) for g in got] == [32] * 3
  np.testing.assert_array_equal(np.array(got), want)


def test_cache_equals_recomputing_the_prefix(converted):
  _, path = converted
  generator, _ = gen_lib.load_generator(path, bucket=16)
  for kw in (dict(), dict(temperature=0.8, top_k=50, top_p=0.9, seed=4)):
    with_cache = generator.generate(PROMPTS, max_new_tokens=12, **kw)
    without = generator.generate(PROMPTS, max_new_tokens=12, use_cache=False, **kw)
    assert with_cache == without


def test_beam_search_equals_transformers(converted):
  ref, path = converted
  generator = _generator(path)
  got = generator.generate(PROMPTS[:2], max_new_tokens=16, num_beams=3)
  want = _hf_generate(ref, PROMPTS[:2], max_new_tokens=16, num_beams=3, length_penalty=1.0,
                      early_stopping=False)
  np.testing.assert_array_equal(np.array(got), want)


def test_beam_search_with_stop_tokens_equals_transformers(converted):
  """Stop ids that the model emits often: hypotheses finish at different lengths, so the
  length normalisation and the early-stop heuristic are exercised."""
  ref, path = converted
  generator = _generator(path)
  greedy = generator.generate(PROMPTS, max_new_tokens=16)
  counts = np.bincount(np.concatenate(greedy), minlength=H.VOCAB)
  stops = [int(t) for t in np.argsort(-counts)[:3]]
  generator.eos_ids = stops
  got = generator.generate(PROMPTS, max_new_tokens=16, num_beams=3)
  want = _hf_generate(ref, PROMPTS, max_new_tokens=16, num_beams=3, eos_token_id=stops)
  assert any(len(g) < 16 for g in got)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w[:len(g)])
    # transformers fills after the stop with `pad_token_id or eos[0]`: eos[0] when pad is 0
    assert np.isin(w[len(g):], [0, stops[0]]).all()


def test_stop_tokens_and_sampling(converted):
  _, path = converted
  generator = _generator(path)
  greedy = generator.generate(PROMPTS, max_new_tokens=10)
  generator.eos_ids = [greedy[0][3]]
  stopped = generator.generate(PROMPTS, max_new_tokens=10)
  assert stopped[0] == greedy[0][:greedy[0].index(greedy[0][3]) + 1]
  generator.eos_ids = []
  a = generator.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=1)
  b = generator.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=1)
  c = generator.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=2)
  assert a == b and a != c
  assert generator.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy


def test_select_tokens_top_k_top_p_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda s: np.array([int(gen_lib.select_tokens(logits, k, s)[0]) for k in keys[:200]])
  assert set(draw(gen_lib.Sampling(1.0, top_k=2))) == {0, 1}
  assert set(draw(gen_lib.Sampling(1.0, top_p=0.7))) == {0, 1}      # 0.5 < 0.7 <= 0.8
  assert set(draw(gen_lib.Sampling(1.0, top_p=0.5))) == {0}


def test_prompt_too_long_and_bad_settings(converted):
  _, path = converted
  generator, _ = gen_lib.load_generator(path)
  with pytest.raises(gen_lib.GenerateError, match="maximum length 256"):
    generator.generate([[5] * 250], max_new_tokens=10)
  with pytest.raises(gen_lib.GenerateError, match="top_p"):
    generator.generate(PROMPTS, temperature=1.0, top_p=0.0)


def test_cli_streams_chat_and_errors(converted, tmp_path, capsys):
  from pathjax import cli
  _, path = converted
  code = cli.main(["generate", "--model", path, "--prompt", "the slide shows", "--chat",
                   "--max-new-tokens", "8"])
  assert code == 0
  out = capsys.readouterr().out
  assert out.strip()
  # the same text through the library
  generator, tok = gen_lib.load_generator(path)
  ids = gen_lib.encode_prompt(tok, "the slide shows", chat=True)
  assert tok.decode(ids).startswith("<|user|>the slide shows</s><|assistant|>")
  want = tok.decode(generator.generate([ids], max_new_tokens=8)[0], skip_special_tokens=True)
  assert out.strip() == want.strip()
  # no tokenizer in the model directory
  ref = H.hf_model(H.hf_config("llama", True))
  src = H.save_hf_dir(ref, str(tmp_path / "hf"), tokenizer=False)
  bare = hf_llm.convert_to_model_dir(src, str(tmp_path / "bare"), log=lambda s: None)
  assert cli.main(["generate", "--model", bare, "--prompt", "x"]) == 2
  assert "stores no tokenizer" in capsys.readouterr().err
  assert cli.main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
  assert "not a pathjax model directory" in capsys.readouterr().err


def test_bench_generate_runs_on_a_tiny_model(capsys):
  import argparse

  from pathjax.bench import generate as bench
  args = argparse.Namespace(size="tiny", batch_sizes=[2], prompt_len=8, new_tokens=4,
                            matmul_size=256, torch=True, json=None)
  assert bench.main(args) == 0
  out = capsys.readouterr().out
  assert "of the matmul peak" in out and "bandwidth floor" in out and "pathjax/transformers" in out
