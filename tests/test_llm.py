"""pathjax's decoder LLM against transformers' PyTorch Llama / Qwen2 / Qwen3 (tiny random
configs, tied and untied, 2 KV heads): logits over a left-padded batch, the converter round
trip (sharded index), RoPE scaling variants, bad inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.convert import hf_llm
from pathjax.convert.safetensors_io import WeightsError
from pathjax.models import llm as llm_lib

torch = pytest.importorskip("torch", reason="parity references need torch (pip install -e .[reference])")
transformers = pytest.importorskip("transformers")

import llm_helpers as H  # noqa: E402

pytestmark = pytest.mark.reference
TOL = 1e-4


def _hf_logits(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(H.hf_positions(mask)))
  return out.logits.numpy()


def _convert(tmp_path, model, **kw):
  src = H.save_hf_dir(model, str(tmp_path / "hf"), **kw)
  out = hf_llm.convert_to_model_dir(src, str(tmp_path / "pj"), log=lambda s: None)
  return llm_lib.load_llm(out)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False),
                                       ("qwen2", True), ("qwen3", False), ("qwen3", True)])
def test_logits_match_transformers_left_padded(tmp_path, arch, tied):
  ref = H.hf_model(H.hf_config(arch, tied))
  module, params, meta = _convert(tmp_path, ref, tokenizer=False)
  ids, mask = H.left_padded_batch()
  want = _hf_logits(ref, ids, mask)
  got = np.asarray(module.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.abs(got[real] - want[real]).max() <= TOL
  assert meta["generation"]["eos_token_id"] == [2]


def test_sharded_index_round_trip_and_unscanned(tmp_path):
  ref = H.hf_model(H.hf_config("qwen3", False))
  src = H.save_hf_dir(ref, str(tmp_path / "hf"), shard="40KB")
  assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
  ids, mask = H.left_padded_batch(seed=1)
  want = _hf_logits(ref, ids, mask)
  for scan in (True, False):
    out = hf_llm.convert_to_model_dir(src, str(tmp_path / f"pj{scan}"), scan=scan, log=lambda s: None)
    module, params, meta = llm_lib.load_llm(out)
    assert ("layers" in params) == scan
    got = np.asarray(module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(got[mask.astype(bool)] - want[mask.astype(bool)]).max() <= TOL
  assert os.path.isfile(os.path.join(meta["tokenizer_dir"], "tokenizer.json"))
  tok = transformers.AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
  assert tok.chat_template == H.CHAT_TEMPLATE


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
  config = H.hf_config("llama", False, rope_parameters={"rope_theta": 500.0, **scaling})
  ref = H.hf_model(config)
  module, params, _ = _convert(tmp_path, ref, tokenizer=False)
  assert module.rope_scaling["rope_type"] == scaling["rope_type"]
  assert module.rope_theta == 500.0
  ids, mask = H.left_padded_batch(seed=2, length=40)
  ids = np.concatenate([ids] * 1, 0)
  want = _hf_logits(ref, ids, mask)
  got = np.asarray(module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(got[mask.astype(bool)] - want[mask.astype(bool)]).max() <= TOL


def test_inputs_embeds_entry_point_equals_ids():
  module = llm_lib.LLM(**llm_lib.config_from_hf(H.hf_config("qwen3", True).to_dict()))
  ids = jnp.asarray(H.left_padded_batch()[0], jnp.int32)
  params = module.init(jax.random.key(0), ids)["params"]
  embeds = jnp.take(params["embed"]["embedding"].value, ids, axis=0)
  a = module.apply({"params": params}, ids)
  b = module.apply({"params": params}, inputs_embeds=embeds)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_parameters_have_logical_axes_and_lora_regexes_match():
  import re

  import flax.linen as nn

  from flax import traverse_util

  flatten = lambda tree: traverse_util.flatten_dict(tree, sep="/")
  module = llm_lib.LLM(**llm_lib.config_from_hf(H.hf_config("qwen2", False).to_dict()))
  boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  specs = flatten(nn.get_partition_spec(boxed))
  assert all(spec is not None and len(spec) == len(flatten(nn.unbox(boxed))[k].shape)
             for k, spec in specs.items())
  paths = list(flatten(nn.unbox(boxed)))
  for short, regex in llm_lib.LORA_TARGETS.items():
    assert [p for p in paths if re.fullmatch(regex, p)], short


def test_bf16_compute_is_close_to_float32():
  module = llm_lib.LLM(**llm_lib.config_from_hf(H.hf_config("llama", False).to_dict()))
  ids = jnp.asarray(H.left_padded_batch()[0], jnp.int32)
  params = module.init(jax.random.key(0), ids)["params"]
  f32 = module.apply({"params": params}, ids)
  bf16 = module.clone(dtype=jnp.bfloat16).apply({"params": params}, ids)
  assert bf16.dtype == jnp.float32
  assert float(jnp.abs(bf16 - f32).max()) < 0.05 * float(jnp.abs(f32).max()) + 0.05


def test_bad_inputs(tmp_path):
  with pytest.raises(llm_lib.LLMConfigError, match="supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
    llm_lib.config_from_hf({"architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(llm_lib.LLMConfigError, match="supported: default, linear, llama3"):
    llm_lib.config_from_hf({**H.hf_config("llama", False).to_dict(),
                            "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
  ref = H.hf_model(H.hf_config("llama", False))
  src = H.save_hf_dir(ref, str(tmp_path / "hf"), tokenizer=False)
  # weights that do not match the config: a different intermediate size
  cfg = json.load(open(os.path.join(src, "config.json")))
  json.dump({**cfg, "intermediate_size": 80}, open(os.path.join(src, "config.json"), "w"))
  with pytest.raises(WeightsError, match=r"mlp\.gate_proj\.weight: file has \(96, 64\), the config expects|fc1_gate"):
    hf_llm.convert_to_model_dir(src, str(tmp_path / "out"), log=lambda s: None)
  # a layer too few
  json.dump({**cfg, "num_hidden_layers": 3}, open(os.path.join(src, "config.json"), "w"))
  with pytest.raises(WeightsError, match="missing|not used"):
    hf_llm.convert_to_model_dir(src, str(tmp_path / "out"), log=lambda s: None)
  # a pickle only
  os.remove(os.path.join(src, "model.safetensors"))
  open(os.path.join(src, "pytorch_model.bin"), "wb").write(b"x")
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  with pytest.raises(WeightsError, match="PyTorch pickle"):
    hf_llm.convert_to_model_dir(src, str(tmp_path / "out"), log=lambda s: None)
  assert not os.path.exists(tmp_path / "out")


def test_convert_cli_refuses_unknown_architecture(tmp_path, capsys):
  from pathjax import cli
  src = tmp_path / "gpt2"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  (src / "model.safetensors").write_bytes(b"")
  code = cli.main(["convert", "--llm", str(src), "--out", str(tmp_path / "o")])
  assert code == 2
  err = capsys.readouterr().err
  assert "unsupported architecture 'GPT2LMHeadModel'" in err and "Qwen3ForCausalLM" in err
