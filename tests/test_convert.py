"""Converters and model directories without torch: layouts, round trips and bad input.

Checkpoints here are timm / CLIP-named numpy state dicts written with safetensors.numpy, so
these tests run everywhere (parity against the real torch models is in test_parity_*.py).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from pathjax.convert import cli as convert_cli
from pathjax.convert import timm_vit
from pathjax.convert.safetensors_io import WeightsError, load_safetensors
from pathjax.models import model_dir as md


def timm_state_dict(width=32, depth=2, patch=16, grid=14, reg=0, cls=True, on_prefix=True,
                    mlp="fc", layer_scale=True, seed=0):
  """A timm VisionTransformer state dict in numpy (random values)."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
  prefix = int(cls) + reg
  sd = {"patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
        "pos_embed": r(1, grid * grid + (prefix if on_prefix else 0), width),
        "norm.weight": 1 + r(width), "norm.bias": r(width)}
  if cls:
    sd["cls_token"] = r(1, 1, width)
  if reg:
    sd["reg_token"] = r(1, reg, width)
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
               b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
               b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
               b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width)})
    if layer_scale:
      sd[b + "ls1.gamma"] = r(width)
      sd[b + "ls2.gamma"] = r(width)
    if mlp == "fc":
      sd.update({b + "mlp.fc1.weight": r(4 * width, width), b + "mlp.fc1.bias": r(4 * width),
                 b + "mlp.fc2.weight": r(width, 4 * width), b + "mlp.fc2.bias": r(width)})
    else:  # SwiGLUPacked
      sd.update({b + "mlp.fc1.weight": r(4 * width, width), b + "mlp.fc1.bias": r(4 * width),
                 b + "mlp.fc2.weight": r(width, 2 * width), b + "mlp.fc2.bias": r(width)})
  return sd


def run_convert(*argv):
  parser = argparse.ArgumentParser()
  convert_cli.register(parser)
  return convert_cli.main(parser.parse_args(list(argv)))


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("kw, expect", [
    (dict(), dict(width=32, depth=2, patch_size=16, mlp_dim=128, reg_tokens=0,
                  pos_embed_on_prefix=True, image_size=224, layer_scale_init=1e-5)),
    (dict(patch=14, grid=16, reg=8, on_prefix=False, mlp="swiglu"),
     dict(patch_size=14, mlp_dim=64, mlp_activation="swiglu", reg_tokens=8,
          pos_embed_on_prefix=False, image_size=224)),
    (dict(reg=4, on_prefix=True, layer_scale=False), dict(reg_tokens=4, pos_embed_on_prefix=True,
                                                          layer_scale_init=None)),
])
def test_infer_layout(kw, expect):
  fields, _ = timm_vit.convert_timm_vit(timm_state_dict(**kw), overrides={"num_heads": 4})
  for key, value in expect.items():
    assert fields[key] == value, key


def test_swiglu_packed_gate_is_first_half():
  """timm SwiGLUPacked (GluMlp, gate_last=False): act(first half) * second half."""
  sd = timm_state_dict(mlp="swiglu", depth=1)
  _, params = timm_vit.convert_timm_vit(sd, overrides={"num_heads": 4}, scan=False)
  mlp = params["encoder"]["blocks_0"]["mlp"]
  w = sd["blocks.0.mlp.fc1.weight"]
  np.testing.assert_array_equal(mlp["fc1_gate"]["kernel"], w[:64].T)
  np.testing.assert_array_equal(mlp["fc1_up"]["kernel"], w[64:].T)


def test_qkv_split_and_patch_kernel_layout():
  sd = timm_state_dict(depth=1)
  _, params = timm_vit.convert_timm_vit(sd, overrides={"num_heads": 4}, scan=True)
  q = params["encoder"]["blocks"]["attn"]["query"]["kernel"]
  assert q.shape == (1, 32, 4, 8)
  np.testing.assert_array_equal(q[0].reshape(32, 32), sd["blocks.0.attn.qkv.weight"][:32].T)
  v = params["encoder"]["blocks"]["attn"]["value"]["bias"][0]
  np.testing.assert_array_equal(v.reshape(-1), sd["blocks.0.attn.qkv.bias"][64:])
  assert params["patch_embed"]["kernel"].shape == (16, 16, 3, 32)


def test_pos_embed_resize_shapes():
  sd = timm_state_dict(reg=8, on_prefix=False, patch=14, grid=16)
  fields, params = timm_vit.convert_timm_vit(sd, overrides={"num_heads": 4}, image_size=280)
  assert fields["image_size"] == 280
  assert params["pos_embed"].shape == (1, 20 * 20, 32)
  sd = timm_state_dict()
  fields, params = timm_vit.convert_timm_vit(sd, overrides={"num_heads": 4}, image_size=256)
  assert params["pos_embed"].shape == (1, 1 + 16 * 16, 32)
  np.testing.assert_array_equal(params["pos_embed"][:, :1], sd["pos_embed"][:, :1])  # cls kept


def test_ambiguous_pos_embed_asks_for_size():
  # 9 prefix tokens + 4x4 grid = 25 = 5x5: both layouts fit.
  sd = timm_state_dict(reg=8, grid=4, on_prefix=True)
  with pytest.raises(WeightsError, match="ambiguous"):
    timm_vit.convert_timm_vit(sd, overrides={"num_heads": 4})
  fields, _ = timm_vit.convert_timm_vit(sd, overrides={"num_heads": 4}, checkpoint_image_size=64)
  assert fields["pos_embed_on_prefix"] and fields["image_size"] == 64


def test_convert_round_trip_without_torch(tmp_path):
  """convert + load + encode in a fresh interpreter never imports torch (numpy only)."""
  save_file(timm_state_dict(), str(tmp_path / "vit.safetensors"))
  code = f"""
import sys, numpy as np
from pathjax.convert.cli import convert
from pathjax.models.model_dir import load_model_dir
convert(out={str(tmp_path / 'm')!r}, vision={str(tmp_path / 'vit.safetensors')!r},
        vision_fields={{'num_heads': 4}}, log=lambda *a: None)
m = load_model_dir({str(tmp_path / 'm')!r})
f = m.encode_image(np.zeros((2, 224, 224, 3), np.uint8))
assert f.shape == (2, 32), f.shape
assert 'torch' not in sys.modules, 'torch was imported'
print('ok')
"""
  env = dict(os.environ, XLA_FLAGS="")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "ok" in res.stdout


def test_scan_and_unscanned_directories_agree(tmp_path):
  save_file(timm_state_dict(reg=4), str(tmp_path / "vit.safetensors"))
  images = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), np.uint8)
  outs = []
  for scan in ("", "--no-scan"):
    out = tmp_path / f"m{scan}"
    argv = ["--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4", "--out", str(out)]
    assert run_convert(*argv, *([scan] if scan else [])) == 0
    outs.append(md.load_model_dir(str(out)).encode_image(images))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_missing_keys_are_listed(tmp_path, capsys):
  sd = timm_state_dict()
  del sd["blocks.1.norm2.weight"], sd["blocks.0.attn.proj.bias"]
  save_file(sd, str(tmp_path / "vit.safetensors"))
  code = run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--out", str(tmp_path / "m"))
  err = capsys.readouterr().err
  assert code == 2
  assert "missing keys (2)" in err
  assert "blocks.1.norm2.weight" in err and "blocks.0.attn.proj.bias" in err
  assert not os.path.exists(tmp_path / "m")


def test_unexpected_keys_are_listed(tmp_path):
  sd = timm_state_dict()
  sd["blocks.0.attn.q_norm.weight"] = np.ones(8, np.float32)
  sd["blocks.1.mlp.norm.weight"] = np.ones(128, np.float32)
  with pytest.raises(WeightsError, match=r"unexpected keys \(2\): blocks.0.attn.q_norm.weight, "
                                         r"blocks.1.mlp.norm.weight"):
    timm_vit.convert_timm_vit(sd, overrides={"num_heads": 4})


def test_shape_mismatch_names_parameter_and_shapes(tmp_path, capsys):
  sd = timm_state_dict()
  sd["blocks.1.norm1.bias"] = np.zeros(31, np.float32)
  save_file(sd, str(tmp_path / "vit.safetensors"))
  code = run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--out", str(tmp_path / "m"))
  err = capsys.readouterr().err
  assert code == 2
  assert "blocks.1" in err and "norm1/bias" in err and "(31,)" in err and "(32,)" in err
  sd = timm_state_dict()
  sd["norm.weight"] = np.zeros(31, np.float32)
  save_file(sd, str(tmp_path / "vit.safetensors"))
  code = run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--out", str(tmp_path / "m"))
  err = capsys.readouterr().err
  assert code == 2
  assert "shape mismatch for parameter norm/scale: checkpoint has (31,), the model expects (32,)" \
      in err


def test_model_dir_shape_mismatch_and_missing_keys(tmp_path):
  save_file(timm_state_dict(), str(tmp_path / "vit.safetensors"))
  out = tmp_path / "m"
  assert run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--out", str(out)) == 0
  tensors = load_safetensors(str(out / md.PARAMS_FILE))
  tensors["vision/params/norm/scale"] = np.ones(33, np.float32)
  save_file(tensors, str(out / md.PARAMS_FILE))
  with pytest.raises(md.ModelDirError, match=r"shape mismatch for parameter norm/scale: "
                                             r"checkpoint has \(33,\), the model expects \(32,\)"):
    md.load_model_dir(str(out))
  del tensors["vision/params/norm/scale"]
  tensors["vision/params/extra/kernel"] = np.ones(3, np.float32)
  save_file(tensors, str(out / md.PARAMS_FILE))
  with pytest.raises(md.ModelDirError, match=r"missing keys \(1\): norm/scale[\s\S]*unexpected "
                                             r"keys \(1\): extra/kernel"):
    md.load_model_dir(str(out))


def test_corrupt_params_file_is_named(tmp_path):
  save_file(timm_state_dict(), str(tmp_path / "vit.safetensors"))
  out = tmp_path / "m"
  assert run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--out", str(out)) == 0
  (out / md.PARAMS_FILE).write_bytes(b"\x00garbage" * 10)
  with pytest.raises(md.ModelDirError, match=f"cannot read the params file .*{md.PARAMS_FILE}"):
    md.load_model_dir(str(out))
  with pytest.raises(md.ModelDirError, match="not a pathjax model directory"):
    md.load_model_dir(str(tmp_path))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_is_refused_with_recipe(tmp_path, capsys, suffix):
  path = tmp_path / f"pytorch_model{suffix}"
  path.write_bytes(b"\x80\x02}q\x00.")  # a pickle; never opened
  with pytest.raises(WeightsError) as e:
    load_safetensors(str(path))
  msg = str(e.value)
  assert "PyTorch pickle" in msg and "safetensors" in msg
  assert "torch.load(" in msg and "weights_only=True" in msg and "save_file(" in msg
  assert run_convert("--vision", str(path), "--num-heads", "4", "--out", str(tmp_path / "m")) == 2
  assert "torch.load(" in capsys.readouterr().err


def test_unknown_variant_lists_valid_ones(tmp_path, capsys):
  save_file(timm_state_dict(), str(tmp_path / "vit.safetensors"))
  code = run_convert("--vision", str(tmp_path / "vit.safetensors"), "--vision-variant", "Q/99",
                     "--out", str(tmp_path / "m"))
  err = capsys.readouterr().err
  assert code == 2
  assert "unknown ViT variant 'Q/99'" in err
  for valid in ("B/16", "L/16", "H/14", "uni", "uni2-h"):
    assert valid in err


def test_variant_width_mismatch_and_missing_heads(tmp_path):
  sd = timm_state_dict()
  with pytest.raises(WeightsError, match="width 32 but variant 'L/16' has width 1024"):
    timm_vit.convert_timm_vit(sd, variant="L/16")
  with pytest.raises(ValueError, match="heads is not in the weights"):
    timm_vit.convert_timm_vit(sd)


def test_not_a_vit_checkpoint(tmp_path):
  with pytest.raises(WeightsError, match="no patch_embed.proj.weight"):
    timm_vit.convert_timm_vit({"foo.weight": np.zeros(3, np.float32)}, overrides={"num_heads": 1})


def test_open_clip_text_needs_heads_and_activation(tmp_path, capsys):
  from pathjax.convert import clip_text
  w = 16
  sd = {"token_embedding.weight": np.zeros((50, w), np.float32),
        "positional_embedding": np.zeros((8, w), np.float32),
        "transformer.resblocks.0.ln_1.weight": np.ones(w, np.float32)}
  with pytest.raises(ValueError, match="--text-heads"):
    clip_text.convert_clip_text(sd, fmt="open_clip")
  with pytest.raises(ValueError, match="--text-activation quick_gelu"):
    clip_text.convert_clip_text(sd, fmt="open_clip", overrides={"num_heads": 2})


def test_model_json_records_config(tmp_path):
  save_file(timm_state_dict(reg=8, on_prefix=False, patch=14, grid=16, mlp="swiglu"),
            str(tmp_path / "vit.safetensors"))
  out = tmp_path / "m"
  assert run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--image-size", "252", "--out", str(out)) == 0
  meta = json.loads((out / "model.json").read_text())
  cfg = meta["towers"]["vision"]["config"]
  assert meta["towers"]["vision"]["kind"] == "vit"
  assert (cfg["reg_tokens"], cfg["pos_embed_on_prefix"], cfg["mlp_activation"],
          cfg["image_size"]) == (8, False, "swiglu", 252)
  assert meta["preprocess"]["image_size"] == 252
  assert meta["preprocess"]["mean"] == list(md.IMAGENET_MEAN)
  assert not any(n.startswith(".m.tmp") for n in os.listdir(tmp_path))  # atomic write cleaned up
