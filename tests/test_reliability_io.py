"""Fault injection against convert, embed, eval, inspect, tokenizer and the launcher (issue 15
items 1, 10, 11, 12 and the unclear-error list): each test failed on the code before the fix.
"""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pathjax import cli
from pathjax.models import model_dir as md
from pathjax.models.vit import ViT
from flax.traverse_util import flatten_dict

_flat = lambda tree: flatten_dict(tree, sep="/")

from test_eval_tasks import _random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vision_towers(seed=0, size=32):
  vit = ViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=16, image_size=size, pool="avg")
  return {"vision": dict(kind="vit", module=vit, params=_random_params("vit", vit, seed),
                         projection=None)}


def _one_line_error(capsys, *needles):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  for needle in needles:
    assert needle in err[0], err[0]
  return err[0]


# ------------------------------------------------------------------- convert / model export


def test_save_refuses_a_folder_that_is_not_a_model_and_never_deletes_it(tmp_path):
  out = tmp_path / "results"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  with pytest.raises(md.ModelDirError, match="not a pathjax model directory"):
    md.save_model_dir(str(out), _vision_towers(), overwrite=True)
  assert (out / "precious.txt").read_text() == "keep me"
  file = tmp_path / "notes.txt"
  file.write_text("keep me too")
  with pytest.raises(md.ModelDirError, match="not a directory"):
    md.save_model_dir(str(file), _vision_towers())
  assert file.read_text() == "keep me too"
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "results"]  # no temporaries left


def test_a_model_directory_is_replaced_only_with_overwrite(tmp_path):
  out = str(tmp_path / "m")
  md.save_model_dir(out, _vision_towers(seed=0))
  def weights():
    return sorted((k, np.asarray(v)) for k, v in
                  _flat(md.load_model_dir(out).towers["vision"].params).items())
  first = weights()
  with pytest.raises(md.ModelDirError, match="--overwrite"):
    md.save_model_dir(out, _vision_towers(seed=1))
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(weights(), first))
  md.save_model_dir(out, _vision_towers(seed=1), overwrite=True)
  assert not all(np.array_equal(a[1], b[1]) for a, b in zip(weights(), first))
  empty = tmp_path / "empty"
  empty.mkdir()
  md.save_model_dir(str(empty), _vision_towers())  # an empty folder is filled
  assert os.path.isfile(empty / md.MODEL_JSON)


def test_convert_cli_refuses_an_existing_file_or_folder_in_one_line(tmp_path, capsys):
  from safetensors.numpy import save_file

  from test_convert import timm_state_dict
  save_file(timm_state_dict(), str(tmp_path / "vit.safetensors"))
  base = ["convert", "--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4"]
  (tmp_path / "file").write_text("x")
  assert cli.main(base + ["--out", str(tmp_path / "file")]) == 2
  _one_line_error(capsys, str(tmp_path / "file"), "not a directory")
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "a.txt").write_text("x")
  assert cli.main(base + ["--out", str(tmp_path / "dir")]) == 2
  _one_line_error(capsys, "not a pathjax model directory")
  assert (tmp_path / "dir" / "a.txt").read_text() == "x"
  assert cli.main(base + ["--out", str(tmp_path / "m")]) == 0
  capsys.readouterr()
  assert cli.main(base + ["--out", str(tmp_path / "m")]) == 2
  _one_line_error(capsys, "--overwrite")
  assert cli.main(base + ["--out", str(tmp_path / "m"), "--overwrite"]) == 0


def test_model_directories_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    out = md.save_model_dir(str(tmp_path / "m"), _vision_towers())
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  for name in os.listdir(out):
    assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name


def test_non_finite_weights_are_refused_at_save_and_at_load(tmp_path):
  towers = _vision_towers()
  bad = jax_tree_first_array(towers["vision"]["params"])
  bad.flat[0] = np.nan
  with pytest.raises(md.ModelDirError, match="NaN or Inf"):
    md.save_model_dir(str(tmp_path / "m"), towers)
  assert not os.path.exists(tmp_path / "m")
  # A file damaged after it was written: refused when loading.
  bad.flat[0] = 0.0
  out = md.save_model_dir(str(tmp_path / "m"), towers)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(out, md.PARAMS_FILE))
  key = sorted(k for k in tensors if tensors[k].dtype == np.float32)[0]
  tensors[key] = tensors[key].copy()
  tensors[key].flat[0] = np.inf
  save_file(tensors, os.path.join(out, md.PARAMS_FILE))
  with pytest.raises(md.ModelDirError, match=f"NaN or Inf.*{key.split('/', 1)[1]}"):
    md.load_model_dir(out)


def jax_tree_first_array(tree):
  import jax
  return next(x for x in jax.tree.leaves(tree) if isinstance(x, np.ndarray) and x.size > 1)


# ---------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
  from pathjax.input.tokenize import TextTokenizer, train_bpe_tokenizer
  from pathjax.models.text import TextTransformer
  root = tmp_path_factory.mktemp("textmodel")
  tok_dir = train_bpe_tokenizer(["tumor cells", "normal stroma", "necrosis"] * 20,
                                str(root / "tok"), vocab_size=600, min_frequency=1,
                                context_length=16)
  tok = TextTokenizer(tok_dir, context_length=16)
  text = TextTransformer(vocab_size=tok.vocab_size, width=32, depth=1, num_heads=2, mlp_dim=64,
                         context_length=16, embed_dim=24, eos_id=tok.eos_id)
  towers = {"text": dict(kind="clip_text", module=text, params=_random_params("clip_text", text, 0),
                         projection=None)}
  return md.save_model_dir(str(root / "m"), towers, tokenizer_dir=tok_dir), tok.vocab_size


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, text_model, capsys, bad):
  path, vocab = text_model
  ids = np.zeros((2, 16), np.int64)
  ids[1, 5] = vocab if bad == "vocab" else bad
  np.save(tmp_path / "ids.npy", ids)
  code = cli.main(["embed", "--model", path, "--text-ids", str(tmp_path / "ids.npy"), "--out",
                   str(tmp_path / "t.npy"), "--no-progress"])
  assert code == 2
  _one_line_error(capsys, f"token id {ids[1, 5]} at text 1, position 5", f"[0, {vocab})")
  assert not (tmp_path / "t.npy").exists()


def test_embed_out_errors_are_one_line(tmp_path, text_model, capsys):
  path, _ = text_model
  (tmp_path / "folder.npy").mkdir()
  assert cli.main(["embed", "--model", path, "--text", "tumor", "--out",
                   str(tmp_path / "folder.npy")]) == 2
  _one_line_error(capsys, "is a folder")
  (tmp_path / "file").write_text("x")
  assert cli.main(["embed", "--model", path, "--text", "tumor", "--out",
                   str(tmp_path / "file" / "t.npy")]) == 2
  _one_line_error(capsys, "is a file, not a folder")


def test_missing_tokenizer_directory_is_named_without_a_hub_lookup(tmp_path, text_model):
  import shutil
  path, _ = text_model
  copy = tmp_path / "m"
  shutil.copytree(path, copy)
  shutil.rmtree(copy / "tokenizer")
  with pytest.raises(md.ModelDirError, match=str(copy / "tokenizer")):
    md.load_model_dir(str(copy)).tokenize(["tumor"])
  from pathjax.input.tokenize import load_tokenizer
  for missing in (str(tmp_path / "no" / "such" / "tok"), "./tok_missing", "~/no_tok_here"):
    with pytest.raises(FileNotFoundError, match="does not exist"):
      load_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match="never downloads"):
    load_tokenizer("some-org/some-tokenizer-not-cached")


# ----------------------------------------------------------------------------- 16-bit PNG


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
  from pathjax import embed
  from pathjax.evaluate import data as data_lib
  ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
  Image.fromarray(ramp).save(tmp_path / "g16.png")
  with Image.open(tmp_path / "g16.png") as im:
    assert im.mode.startswith("I")
  got = embed.load_image(str(tmp_path / "g16.png"), 64)
  expected = np.round(ramp / 257.0).astype(np.uint8)
  assert np.abs(got[..., 0].astype(int) - expected).max() <= 1
  assert (got[..., 0] == 255).mean() < 0.01  # before: almost all white
  folder = tmp_path / "set" / "a"
  folder.mkdir(parents=True)
  Image.fromarray(ramp).save(folder / "g16.png")
  dataset = data_lib.load_dataset(f"imagefolder:{tmp_path / 'set'}")
  img = dataset.image(0, 64)
  assert np.abs(img[..., 0].astype(int) - expected).max() <= 1
  from pathjax.input.images import array_to_rgb8
  assert np.abs(np.asarray(array_to_rgb8(ramp))[..., 0].astype(int) - expected).max() <= 1


# ----------------------------------------------------------------------------------- kshot


def test_kshot_with_more_shots_than_images_is_capped_and_says_so(tmp_path, capsys):
  out = md.save_model_dir(str(tmp_path / "m"), _vision_towers())
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    os.makedirs(tmp_path / "imgs" / c)
    for i in range(8):
      Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(
          tmp_path / "imgs" / c / f"{i}.png")
  res = tmp_path / "res"
  assert cli.main(["eval", "--no-progress", "--model", out, "--task", "kshot", "--data",
                   f"imagefolder:{tmp_path / 'imgs'}", "--shots", "1,50", "--seeds", "2",
                   "--out", str(res)]) == 0
  err = capsys.readouterr().err
  assert "50 shots requested" in err and "using" in err
  metrics = json.load(open(res / "metrics.json"))
  shots = [k for k in metrics["metrics"] if k.endswith("shot")]
  assert "50shot" not in shots and "1shot" in shots and len(shots) == 2
  assert any("50 shots requested" in w for w in metrics["warnings"])


# ------------------------------------------------------------------------ eval / inspect / tokenizer


def test_eval_out_that_is_a_file_or_unwritable_fails_first(tmp_path, capsys, monkeypatch):
  (tmp_path / "file").write_text("x")
  args = ["eval", "--model", str(tmp_path / "nomodel"), "--data", f"imagefolder:{tmp_path}"]
  assert cli.main(args + ["--out", str(tmp_path / "file")]) == 2
  _one_line_error(capsys, "is an existing file")
  from pathjax import workdir as workdir_lib

  def denied(*a, **k):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(workdir_lib.tempfile, "mkstemp", denied)
  assert cli.main(args + ["--out", str(tmp_path / "out")]) == 2
  _one_line_error(capsys, "--out", "not writable: Permission denied")


def test_inspect_png_into_a_missing_folder_is_one_line(tmp_path, capsys, monkeypatch):
  from pathjax.input import inspect_cli, records
  monkeypatch.setattr(records, "open_records", lambda d: ([object()], {"ok": True}))
  monkeypatch.setattr(inspect_cli, "bag_to_json", lambda bag: {})
  code = cli.main(["inspect", str(tmp_path), "--records", "0", "--png",
                   str(tmp_path / "missing" / "bag.png")])
  assert code == 2
  assert "does not exist" in capsys.readouterr().err


def test_tokenizer_vocab_size_too_small_is_one_line(tmp_path, capsys):
  captions = tmp_path / "c.jsonl"
  captions.write_text("\n".join(json.dumps({"caption": "tumor cells"}) for _ in range(5)))
  assert cli.main(["tokenizer", "train", "--captions", str(captions), "--out", str(tmp_path / "t"),
                   "--vocab-size", "500"]) == 2
  _one_line_error(capsys, "--vocab-size 500", "at least 515")


# ----------------------------------------------------------------------- libtpu, launcher


def test_no_libtpu_noise_without_a_tpu(tmp_path):
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu not installed (make setup-tpu)")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = ROOT
  for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_NAME"):
    env.pop(k, None)
  proc = subprocess.run([sys.executable, "-m", "pathjax", "train", f"--config={ROOT}/configs/toy.py",
                         "--workdir", str(tmp_path), "--config.total_steps=1"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr[-2000:]


def test_keep_off_absent_tpu_pins_cpu_when_libtpu_has_no_tpu(monkeypatch):
  # The end-to-end test above can only fail while no other process holds libtpu's
  # /tmp/libtpu_lockfile (libtpu then skips its start-up); this one always can.
  monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
  monkeypatch.setattr(cli, "_has_tpu", lambda: False)
  monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda group: [])
  env = {}
  cli.keep_off_absent_tpu(env)
  assert env == {"JAX_PLATFORMS": "cpu"}


def test_keep_off_absent_tpu_respects_a_users_choice(monkeypatch):
  env = {"JAX_PLATFORMS": "tpu"}
  cli.keep_off_absent_tpu(env)
  assert env == {"JAX_PLATFORMS": "tpu"}
  monkeypatch.setattr(cli, "_has_tpu", lambda: True)
  env = {}
  cli.keep_off_absent_tpu(env)
  assert env == {}


def test_launcher_logs_go_to_a_private_folder_not_a_fixed_name(tmp_path):
  victim = tmp_path / "victim"
  logroot = tmp_path / "logs"
  logroot.mkdir()
  os.symlink(victim, logroot / "pathjax_proc_0.log")
  env = dict(os.environ, LOGDIR=str(logroot))
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2",
                         "echo", "hello"], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "hello" in proc.stdout
  assert not victim.exists()  # the planted symlink was not followed
  made = [d for d in os.listdir(logroot) if d.startswith("pathjax-launch.")]
  assert len(made) == 1
  assert stat.S_IMODE(os.stat(logroot / made[0]).st_mode) == 0o700
  assert sorted(os.listdir(logroot / made[0])) == ["proc_0.log", "proc_1.log"]
  workdir = tmp_path / "w"
  env.pop("LOGDIR")
  subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "1", "echo",
                  "--workdir", str(workdir)], env=env, check=True, capture_output=True, timeout=60)
  assert [d for d in os.listdir(workdir / "logs") if d.startswith("pathjax-launch.")]
