"""Full CLIP (vision + text + projections) parity with transformers' CLIPModel, and open_clip
naming through a key mapping.

A random tiny `CLIPModel` -> safetensors + config.json -> `pathjax convert --clip` -> a
model directory whose image and text features and logits equal the reference. The same
weights renamed to open_clip's layout (`visual.*`, `transformer.resblocks.*`) convert to
the same parameters. Needs torch (the `reference` extra); skipped without it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity references need torch (pip install -e .[reference])")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from pathjax.convert import cli as convert_cli  # noqa: E402
from pathjax.convert import clip_model  # noqa: E402
from pathjax.models.model_dir import load_model_dir  # noqa: E402

pytestmark = pytest.mark.reference

TOL = 1e-4
VOCAB, CTX, EMBED = 500, 12, 32


def _config(patch=8, image=32, vision_act="quick_gelu", text_act="quick_gelu"):
  text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=CTX, hidden_act=text_act,
              bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
  vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                image_size=image, patch_size=patch, hidden_act=vision_act)
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)


def _reference(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        p.fill_(np.log(20.0))
      elif ("layer_norm" in name or "layrnorm" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
  return model


def _ids(n=3, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, CTX), np.int64)
  for i in range(n):
    length = int(rng.integers(1, CTX - 1))
    ids[i, 0] = VOCAB - 2
    ids[i, 1:1 + length] = rng.integers(1, VOCAB - 3, length)
    ids[i, 1 + length] = VOCAB - 1
  return ids


def _save(model, tmp_path):
  path = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  model.config.to_json_file(str(tmp_path / "config.json"))
  return path


@pytest.mark.parametrize("patch,image,act", [(8, 32, "quick_gelu"), (16, 48, "gelu")])
def test_full_clip_matches_transformers(tmp_path, patch, image, act):
  """B/16-, B/32- and L/14-style layouts differ only in sizes: patch and grid vary here."""
  ref = _reference(_config(patch, image, vision_act=act, text_act=act))
  path = _save(ref, tmp_path)
  out = convert_cli.convert_full_clip(out=str(tmp_path / "pj"), clip=str(path),
                                      config=str(tmp_path / "config.json"), log=lambda *a: None)
  model = load_model_dir(out)
  meta = json.load(open(tmp_path / "pj" / "model.json"))
  assert meta["towers"]["vision"]["config"]["pre_norm"] is True
  assert meta["towers"]["vision"]["config"]["mlp_activation"] == act
  assert meta["towers"]["text"]["config"]["activation"] == act

  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(2, 3, image, image)).astype(np.float32)
  ids = _ids()
  with torch.no_grad():
    r = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
  vt, tt = model.towers["vision"], model.towers["text"]
  img = np.asarray(vt(jnp.asarray(pixels.transpose(0, 2, 3, 1)))["pooled"]) @ vt.projection
  txt = np.asarray(tt(jnp.asarray(ids, jnp.int32))["pooled"])
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  np.testing.assert_allclose(img, r.image_embeds.numpy(), atol=TOL)
  np.testing.assert_allclose(txt, r.text_embeds.numpy(), atol=TOL)
  logits = 20.0 * img @ txt.T
  np.testing.assert_allclose(logits, r.logits_per_image.numpy(), atol=TOL * 20)
  # The library path (uint8 -> CLIP normalisation -> features) runs end to end.
  feats = model.encode_image(rng.integers(0, 256, (2, image, image, 3), dtype=np.uint8))
  assert feats.shape == (2, EMBED) and np.all(np.isfinite(feats))


def _open_clip_names(sd: dict) -> dict:
  """transformers CLIPModel tensors renamed to open_clip's CLIP layout."""
  out = {}
  for tower, src, dst in (("visual", "vision_model.encoder.layers", "visual.transformer.resblocks"),
                          ("text", "text_model.encoder.layers", "transformer.resblocks")):
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(src + "."))
    for i in range(depth):
      s, d = f"{src}.{i}.", f"{dst}.{i}."
      for part in ("weight", "bias"):
        out[d + f"attn.in_proj_{part}"] = np.concatenate(
            [sd[s + f"self_attn.{n}_proj.{part}"] for n in ("q", "k", "v")])
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
          out[d + f"{b}.{part}"] = sd[s + f"{a}.{part}"]
  v = "vision_model."
  out.update({
      "visual.class_embedding": sd[v + "embeddings.class_embedding"],
      "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
      "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
      "visual.proj": sd["visual_projection.weight"].T.copy(),
      "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
      "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
      "text_projection": sd["text_projection.weight"].T.copy(),
      "logit_scale": sd["logit_scale"],
  })
  for hf, oc in ((v + "pre_layrnorm", "visual.ln_pre"), (v + "post_layernorm", "visual.ln_post"),
                 ("text_model.final_layer_norm", "ln_final")):
    out[oc + ".weight"], out[oc + ".bias"] = sd[hf + ".weight"], sd[hf + ".bias"]
  return out


def test_open_clip_naming_maps_to_the_same_params():
  ref = _reference(_config())
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  heads = dict(num_heads=3)
  hf = clip_model.convert_clip(sd, vision_fields=heads, text_fields=dict(num_heads=4))
  oc_sd = _open_clip_names(sd)
  assert clip_model.detect_format(oc_sd) == "open_clip"
  with pytest.raises(ValueError, match="do not record the activation"):
    clip_model.convert_clip(oc_sd, vision_fields=heads, text_fields=dict(num_heads=4))
  oc = clip_model.convert_clip(oc_sd, vision_fields=dict(heads, mlp_activation="quick_gelu"),
                               text_fields=dict(num_heads=4, eos_id=VOCAB - 1))
  assert oc["format"] == "open_clip" and oc["logit_scale"] == pytest.approx(np.log(20.0))
  jax.tree.map(np.testing.assert_array_equal, oc["vision"][1], hf["vision"][1])
  np.testing.assert_array_equal(oc["vision"][2], hf["vision"][2])
  jax.tree.map(np.testing.assert_array_equal, oc["text"][1], hf["text"][1])
  assert oc["vision"][0] == hf["vision"][0]
  # A stray tensor is reported by name, not ignored.
  with pytest.raises(Exception, match="visual.extra"):
    clip_model.convert_clip({**oc_sd, "visual.extra": np.zeros(3, np.float32)},
                            vision_fields=dict(heads, mlp_activation="quick_gelu"),
                            text_fields=dict(num_heads=4))


def test_missing_and_stray_vision_tensors_are_named_in_both_formats():
  sd = {k: v.numpy() for k, v in _reference(_config()).state_dict().items()}
  fields = dict(vision_fields=dict(num_heads=3, mlp_activation="quick_gelu"),
                text_fields=dict(num_heads=4))
  for full, missing, stray in (
      (sd, "vision_model.encoder.layers.1.mlp.fc1.bias", "vision_model.extra"),
      (_open_clip_names(sd), "visual.transformer.resblocks.1.ln_2.weight", "visual.extra")):
    broken = {k: v for k, v in full.items() if k != missing}
    broken[stray] = np.zeros(3, np.float32)
    with pytest.raises(clip_model.WeightsError) as e:
      clip_model.convert_clip(broken, **fields)
    assert missing in str(e.value) and stray in str(e.value)
