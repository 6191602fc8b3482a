"""Converters and model directories on the streaming reader: bf16 kept, shards written and
read, checkpoints read lazily (one tensor at a time) from sharded indexes."""

import ml_dtypes
import numpy as np
import pytest

from pathjax.convert import safetensors_io as sio
from pathjax.convert import timm_vit
from pathjax.models import model_dir as md
from test_convert import run_convert, timm_state_dict


class CountingReader(sio.SafetensorsReader):
  def __init__(self, path):
    super().__init__(path)
    self.reads = []

  def get(self, key):
    self.reads.append(key)
    return super().get(key)


def test_bf16_sharded_checkpoint_converts_lazily_and_stays_bf16(tmp_path):
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in timm_state_dict().items()}
  sd = {f"visual.trunk.{k}": v for k, v in sd.items()}
  sd["visual.proj"] = np.ones((4, 4), ml_dtypes.bfloat16)  # another tower: never read
  sio.save_safetensors(sd, str(tmp_path / "model.safetensors"), max_shard_bytes=20_000)
  index = tmp_path / "model.safetensors.index.json"
  assert index.exists()
  reader = CountingReader(str(index))
  fields, params = timm_vit.convert_timm_vit(reader, variant=None,
                                             overrides={"num_heads": 4}, source=str(index))
  assert "visual.proj" not in reader.reads
  assert len(reader.reads) == len(set(reader.reads)) == len(sd) - 1  # each tensor read once
  assert params["patch_embed"]["kernel"].dtype == np.dtype(ml_dtypes.bfloat16)

  out = tmp_path / "m"
  assert run_convert("--vision", str(index), "--num-heads", "4", "--out", str(out)) == 0
  stored = sio.open_safetensors(str(out / md.PARAMS_FILE))
  assert stored.dtype("vision/params/patch_embed/kernel") == np.dtype(ml_dtypes.bfloat16)
  want = sd["visual.trunk.patch_embed.proj.weight"].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(stored.get("vision/params/patch_embed/kernel"), want)
  model = md.load_model_dir(str(out))
  feats = model.encode_image(np.zeros((1, 224, 224, 3), np.uint8))
  assert feats.shape == (1, 32) and np.isfinite(feats).all()


def test_model_dir_written_as_shards_loads_the_same(tmp_path):
  from safetensors.numpy import save_file
  save_file(timm_state_dict(), str(tmp_path / "vit.safetensors"))
  assert run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--out", str(tmp_path / "one")) == 0
  one = md.load_model_dir(str(tmp_path / "one"))
  tower = one.towers["vision"]
  md.save_model_dir(str(tmp_path / "sharded"),
                    {"vision": dict(kind="vit", module=tower.module, params=tower.params)},
                    preprocess=one.preprocess, max_shard_bytes=20_000)
  names = sorted(p.name for p in (tmp_path / "sharded").iterdir())
  assert md.PARAMS_INDEX in names and md.PARAMS_FILE not in names
  assert sum(n.startswith("params-") for n in names) > 1
  two = md.load_model_dir(str(tmp_path / "sharded"))
  images = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), np.uint8)
  np.testing.assert_array_equal(one.encode_image(images), two.encode_image(images))


def test_place_tower_streams_a_model_dir_into_shardings(tmp_path):
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from pathjax.tree_utils import flatten
  from safetensors.numpy import save_file
  save_file(timm_state_dict(), str(tmp_path / "vit.safetensors"))
  out = tmp_path / "m"
  assert run_convert("--vision", str(tmp_path / "vit.safetensors"), "--num-heads", "4",
                     "--out", str(out)) == 0
  model = md.load_model_dir(str(out))
  params = flatten(model.towers["vision"].params)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("fsdp",))
  shard = lambda v: NamedSharding(mesh, P("fsdp") if v.shape and v.shape[0] % 8 == 0 else P())
  abstract = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16, sharding=shard(v))
              for k, v in params.items()}
  placed = md.place_tower(str(out), "vision", abstract)
  assert placed.keys() == params.keys()
  for k, v in placed.items():
    assert v.dtype == jnp.bfloat16 and v.sharding == abstract[k].sharding
    np.testing.assert_array_equal(np.asarray(v), np.asarray(params[k]).astype(ml_dtypes.bfloat16))
  bad = dict(abstract)
  del bad["norm/scale"]
  bad["extra/kernel"] = abstract["norm/bias"]
  with pytest.raises(md.ModelDirError, match=r"missing keys \(1\): extra/kernel"
                                             r"[\s\S]*unexpected keys \(1\): norm/scale"):
    md.place_tower(str(out), "vision", bad)
