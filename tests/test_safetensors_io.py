"""The one safetensors reader/writer: stored dtypes, shards with an index, placement into
shardings tensor by tensor. Checked against safetensors' own numpy save_file / load_file."""

import json
import mmap
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from pathjax.convert import safetensors_io as sio


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "emb": rng.normal(size=(16, 8)).astype(ml_dtypes.bfloat16),
      "w": rng.normal(size=(8, 4, 2)).astype(np.float32),
      "h": rng.normal(size=(3,)).astype(np.float16),
      "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
      "s": np.asarray(3.5, np.float32),
  }


def _same(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(a.view(np.uint8) if a.ndim else a, b.view(np.uint8) if b.ndim else b)


def test_reads_safetensors_written_by_the_library_in_stored_dtype(tmp_path):
  ref = _tensors()
  save_file(ref, str(tmp_path / "a.safetensors"), metadata={"format": "np"})
  reader = sio.open_safetensors(str(tmp_path / "a.safetensors"))
  assert set(reader) == set(ref) and reader.metadata == {"format": "np"}
  assert reader.dtype("emb") == np.dtype(ml_dtypes.bfloat16) and reader.shape("w") == (8, 4, 2)
  for k, v in ref.items():
    _same(reader.get(k), v)
  got = sio.load_safetensors(str(tmp_path / "a.safetensors"))
  assert got["emb"].dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(reader.read_index("w", (slice(2, 5), slice(1, 3))),
                                ref["w"][2:5, 1:3])


def test_written_files_read_back_by_the_library(tmp_path):
  ref = _tensors(1)
  files = sio.save_safetensors(ref, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
  assert files == [str(tmp_path / "m.safetensors")]
  back = load_file(files[0])
  for k, v in ref.items():
    _same(back[k], v)
  jax_tensors = {k: jnp.asarray(v) for k, v in ref.items() if k != "ids"}
  sio.save_safetensors(jax_tensors, str(tmp_path / "j.safetensors"))
  back = load_file(str(tmp_path / "j.safetensors"))
  _same(back["emb"], ref["emb"])


def test_shards_with_an_index_and_every_way_to_open_them(tmp_path):
  rng = np.random.default_rng(2)
  ref = {f"layers.{i}.w": rng.normal(size=(32, 16)).astype(ml_dtypes.bfloat16) for i in range(5)}
  ref["big"] = rng.normal(size=(64, 64)).astype(np.float32)  # 16 KB: a shard of its own
  files = sio.save_safetensors(ref, str(tmp_path / "model.safetensors"), max_shard_bytes=3000)
  index = tmp_path / "model.safetensors.index.json"
  assert files[-1] == str(index)
  assert not (tmp_path / "model.safetensors").exists()
  meta = json.loads(index.read_text())
  assert meta["metadata"]["total_size"] == sum(v.nbytes for v in ref.values())
  shards = sorted(set(meta["weight_map"].values()))
  assert len(shards) == 4 and shards[0] == "model-00001-of-00004.safetensors"
  for shard in shards:  # each shard is a valid safetensors file, under the size unless alone
    part = load_file(str(tmp_path / shard))
    assert sum(v.nbytes for v in part.values()) <= 3000 or len(part) == 1
  for path in (index, tmp_path):
    reader = sio.open_safetensors(str(path))
    assert set(reader) == set(ref)
    for k, v in ref.items():
      _same(reader[k], v)


def test_bad_files_are_named(tmp_path):
  save_file(_tensors(), str(tmp_path / "a.safetensors"))
  data = (tmp_path / "a.safetensors").read_bytes()
  (tmp_path / "t.safetensors").write_bytes(data[:-10])
  with pytest.raises(sio.WeightsError, match=r"t.safetensors: tensor .* truncated or corrupt"):
    sio.open_safetensors(str(tmp_path / "t.safetensors"))
  (tmp_path / "g.safetensors").write_bytes(b"\x00garbage" * 10)
  with pytest.raises(sio.WeightsError, match="cannot read .*g.safetensors as safetensors"):
    sio.open_safetensors(str(tmp_path / "g.safetensors"))
  with pytest.raises(sio.WeightsError, match="does not exist"):
    sio.open_safetensors(str(tmp_path / "none.safetensors"))
  (tmp_path / "bad.safetensors.index.json").write_text("{}")
  with pytest.raises(sio.WeightsError, match="no weight_map"):
    sio.open_safetensors(str(tmp_path / "bad.safetensors.index.json"))


def _mesh():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))


def test_place_reads_each_tensor_into_its_sharding(tmp_path):
  mesh = _mesh()
  rng = np.random.default_rng(3)
  ref = {"a": rng.normal(size=(16, 6)).astype(ml_dtypes.bfloat16),     # rows sharded
         "b": rng.normal(size=(6, 16)).astype(np.float32),             # columns sharded
         "c": rng.normal(size=(8, 4, 2)).astype(np.float32),           # both
         "n": rng.normal(size=(5,)).astype(np.float32)}                # replicated
  sio.save_safetensors(ref, str(tmp_path / "m.safetensors"), max_shard_bytes=300)
  specs = {"a": P("fsdp"), "b": P(None, "fsdp"), "c": P("fsdp", "tensor"), "n": P()}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  out = sio.load_sharded(str(tmp_path / "m.safetensors.index.json"), shardings)
  for k, v in ref.items():
    assert out[k].sharding == shardings[k] and out[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(out[k]), v)
  cast = sio.load_sharded(str(tmp_path), shardings, dtype=jnp.float32)
  assert cast["a"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(cast["a"]), ref["a"].astype(np.float32))
  with pytest.raises(sio.WeightsError, match="no target sharding for tensor n"):
    sio.load_sharded(str(tmp_path), {k: v for k, v in shardings.items() if k != "n"})


def test_place_with_transforms_and_layer_stacking(tmp_path):
  mesh = _mesh()
  rng = np.random.default_rng(4)
  ref = {f"layers.{i}.q.weight": rng.normal(size=(6, 8)).astype(np.float32) for i in range(3)}
  ref["proj.weight"] = rng.normal(size=(4, 8)).astype(ml_dtypes.bfloat16)
  sio.save_safetensors(ref, str(tmp_path / "m.safetensors"))
  reader = sio.open_safetensors(str(tmp_path / "m.safetensors"))
  to_kernel = lambda w: w.T.reshape(8, 2, 3)  # torch [out, in] -> [in, heads, head_dim]
  plan = {
      "layers/q/kernel": sio.Target([f"layers.{i}.q.weight" for i in range(3)],
                                    NamedSharding(mesh, P(None, "fsdp", "tensor")),
                                    transform=to_kernel, shape=(3, 8, 2, 3)),
      "proj/kernel": sio.Target("proj.weight", NamedSharding(mesh, P("fsdp")),
                                transform=lambda w: w.T, dtype=np.float32),
  }
  seen = []
  out = sio.place(reader, plan, progress=lambda name, _: seen.append(name))
  assert seen == list(plan)
  want = np.stack([to_kernel(ref[f"layers.{i}.q.weight"]) for i in range(3)])
  np.testing.assert_array_equal(np.asarray(out["layers/q/kernel"]), want)
  assert out["layers/q/kernel"].sharding == plan["layers/q/kernel"].sharding
  assert out["proj/kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out["proj/kernel"]), ref["proj.weight"].T.astype(np.float32))
  bad = {"x": sio.Target("proj.weight", NamedSharding(mesh, P()), shape=(8, 4))}
  with pytest.raises(sio.WeightsError, match=r"shape mismatch for parameter x: .* gives \(4, 8\), "
                                             r"the model expects \(8, 4\)"):
    sio.place(reader, bad)
  with pytest.raises(sio.WeightsError, match="has no tensor nope"):
    sio.place(reader, {"x": sio.Target("nope", NamedSharding(mesh, P()))})


def test_large_slices_in_huge_page_buffers_outlive_the_reader(tmp_path):
  """Device slices of 2 MiB and more are read, concurrently, into anonymous huge-page
  mappings that jax's CPU client adopts without a copy: the mapping must live as long as the
  placed array, not as long as the host reference."""
  import gc
  mesh = _mesh()
  rng = np.random.default_rng(5)
  big = rng.normal(size=(4096, 1024)).astype(ml_dtypes.bfloat16)  # 8 MiB: 2 MiB per fsdp row block
  sio.save_safetensors({"big": big}, str(tmp_path / "m.safetensors"))
  reader = sio.open_safetensors(str(tmp_path / "m.safetensors"))
  host = reader.read_rows("big", 0, 1024)
  assert host.ctypes.data % 4096 == 0 and host.flags.writeable
  owner = host
  while isinstance(owner, np.ndarray):
    owner = owner.base
  owner = owner.obj if isinstance(owner, memoryview) else owner
  assert isinstance(owner, mmap.mmap) or not hasattr(mmap, "MADV_HUGEPAGE")
  del host
  sharding = NamedSharding(mesh, P("fsdp"))
  out = sio.place(reader, {"big": sio.Target("big", sharding)})["big"]
  del reader
  gc.collect()
  assert out.sharding == sharding
  np.testing.assert_array_equal(np.asarray(out).view(np.uint16), big.view(np.uint16))
  np.testing.assert_array_equal(np.asarray(out + 0).view(np.uint16), big.view(np.uint16))


def test_tensor_reader_reports_missing_and_unexpected_together():
  r = sio.TensorReader({"a": np.ones(2, ml_dtypes.bfloat16), "b": np.ones(1)}, "ck.safetensors",
                       dtype=np.float32)
  assert r.get("a").dtype == np.float32 and r.get("zz") is None
  with pytest.raises(sio.WeightsError, match=r"ck.safetensors does not match[\s\S]*missing keys "
                                             r"\(1\): zz[\s\S]*unexpected keys \(1\): b"):
    r.finish()
  keep = sio.TensorReader({"a": np.ones(2, ml_dtypes.bfloat16)}, "x")
  assert keep.get("a").dtype == np.dtype(ml_dtypes.bfloat16)
