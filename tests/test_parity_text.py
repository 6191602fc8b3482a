"""Parity with transformers' CLIP text tower, in transformers and in open_clip naming.

Random-weight `CLIPTextModelWithProjection` -> safetensors (+ config.json) -> `pathjax
convert` -> same features. The same weights renamed to open_clip's layout convert to the
same features too. Needs torch (the `reference` extra); skipped without it.
"""

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity references need torch (pip install -e .[reference])")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from pathjax.convert import cli as convert_cli  # noqa: E402
from pathjax.models.model_dir import load_model_dir  # noqa: E402

pytestmark = pytest.mark.reference

TOL = 1e-4
VOCAB, CTX, WIDTH, HEADS, LAYERS, EMBED = 1000, 16, 64, 4, 3, 32


def _config(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=160, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, max_position_embeddings=CTX, projection_dim=EMBED,
              hidden_act="quick_gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
              pad_token_id=0)
  base.update(kw)
  return transformers.CLIPTextConfig(**base)


def _reference(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPTextModelWithProjection(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
  return model


def _ids(n=4, seed=0, eos=VOCAB - 1, bos=VOCAB - 2):
  """bos, random tokens, eos, padding (0): eos is the largest id and occurs once."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, CTX), np.int64)
  for i in range(n):
    length = int(rng.integers(1, CTX - 1))
    ids[i, 0] = bos
    ids[i, 1:1 + length] = rng.integers(1, VOCAB - 3, length)
    ids[i, 1 + length] = eos
  return ids


def _ref_features(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids)).text_embeds.numpy()


def _convert(tmp_path, *argv):
  parser = argparse.ArgumentParser()
  convert_cli.register(parser)
  out = tmp_path / "out"
  assert convert_cli.main(parser.parse_args([*argv, "--out", str(out)])) == 0
  return load_model_dir(str(out))


def _compare(ours, ref):
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=1e-4)
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  assert np.abs(norm(ours) - norm(ref)).max() <= TOL


def _save_hf(tmp_path, model, extra=None):
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  sd.update(extra or {})
  save_file(sd, str(tmp_path / "model.safetensors"))
  model.config.to_json_file(str(tmp_path / "config.json"))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_text_parity(tmp_path, act):
  ref = _reference(_config(hidden_act=act))
  _save_hf(tmp_path, ref)
  model = _convert(tmp_path, "--text", str(tmp_path / "model.safetensors"), "--text-format", "hf",
                   "--text-config", str(tmp_path / "config.json"))
  tower = model.towers["text"].module
  assert (tower.activation, tower.eos_id, tower.embed_dim) == (act, VOCAB - 1, EMBED)
  ids = _ids()
  _compare(model.encode_text(ids), _ref_features(ref, ids))


def test_hf_legacy_eos_2_pools_at_argmax(tmp_path):
  """transformers pools at argmax(ids) when eos_token_id == 2 (old CLIP configs)."""
  ref = _reference(_config(eos_token_id=2), seed=1)
  _save_hf(tmp_path, ref)
  model = _convert(tmp_path, "--text", str(tmp_path / "model.safetensors"),
                   "--text-config", str(tmp_path / "config.json"))
  assert model.towers["text"].module.eos_id == -1
  ids = _ids(seed=3)
  _compare(model.encode_text(ids), _ref_features(ref, ids))


def test_full_clip_checkpoint_ignores_vision(tmp_path):
  """A full CLIPModel checkpoint: vision_model.*, visual_projection and logit_scale are ignored."""
  ref = _reference(_config(), seed=2)
  extra = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4),
           "visual_projection.weight": torch.zeros(EMBED, 8), "logit_scale": torch.tensor(2.6)}
  _save_hf(tmp_path, ref, extra)
  config = {"text_config": ref.config.to_dict(), "vision_config": {}, "model_type": "clip"}
  (tmp_path / "clip_config.json").write_text(json.dumps(config))
  model = _convert(tmp_path, "--text", str(tmp_path / "model.safetensors"),
                   "--text-config", str(tmp_path / "clip_config.json"))
  ids = _ids(seed=4)
  _compare(model.encode_text(ids), _ref_features(ref, ids))


def to_open_clip(sd):
  """transformers CLIP text weights renamed to open_clip's layout."""
  g = lambda k: sd[k].detach().clone()
  out = {"token_embedding.weight": g("text_model.embeddings.token_embedding.weight"),
         "positional_embedding": g("text_model.embeddings.position_embedding.weight"),
         "ln_final.weight": g("text_model.final_layer_norm.weight"),
         "ln_final.bias": g("text_model.final_layer_norm.bias"),
         "text_projection": g("text_projection.weight").T.contiguous(),
         "logit_scale": torch.tensor(4.6)}
  for i in range(LAYERS):
    h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
    out[o + "attn.in_proj_weight"] = torch.cat(
        [g(h + f"self_attn.{n}_proj.weight") for n in "qkv"])
    out[o + "attn.in_proj_bias"] = torch.cat([g(h + f"self_attn.{n}_proj.bias") for n in "qkv"])
    for src, dst in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
      out[o + dst + ".weight"] = g(h + src + ".weight")
      out[o + dst + ".bias"] = g(h + src + ".bias")
  return out


def test_open_clip_naming_parity(tmp_path):
  ref = _reference(_config(), seed=5)
  save_file(to_open_clip(ref.state_dict()), str(tmp_path / "open_clip.safetensors"))
  model = _convert(tmp_path, "--text", str(tmp_path / "open_clip.safetensors"), "--text-format",
                   "open_clip", "--text-heads", str(HEADS), "--text-activation", "quick_gelu")
  assert model.towers["text"].module.eos_id == -1  # open_clip pools at argmax(ids)
  ids = _ids(seed=6)
  _compare(model.encode_text(ids), _ref_features(ref, ids))


def test_open_clip_model_config_and_prefix(tmp_path):
  """open_clip model config gives heads and activation; a "text." tower prefix is stripped."""
  ref = _reference(_config(), seed=7)
  sd = {f"text.{k}": v for k, v in to_open_clip(ref.state_dict()).items() if k != "logit_scale"}
  save_file(sd, str(tmp_path / "oc.safetensors"))
  (tmp_path / "oc.json").write_text(json.dumps(
      {"embed_dim": EMBED, "quick_gelu": True,
       "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS,
                    "layers": LAYERS}}))
  model = _convert(tmp_path, "--text", str(tmp_path / "oc.safetensors"), "--text-config",
                   str(tmp_path / "oc.json"))
  ids = _ids(seed=8)
  _compare(model.encode_text(ids), _ref_features(ref, ids))
