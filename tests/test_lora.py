"""LoRA on a small LLM-shaped linen model (layers.Attention + SwiGLU layers.Mlp under nn.scan):
adapters where the regexes say, exact at init, merge == adapted forward, only adapters train."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathjax.convert import safetensors_io as sio
from pathjax.train import ParamSplit
from pathjax.models import layers, lora


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = x + layers.Attention(num_heads=2, use_bias=False, causal=True, name="attn")(
        nn.RMSNorm(name="norm1")(x))
    x = x + layers.Mlp(24, "swiglu", name="mlp")(nn.RMSNorm(name="norm2")(x))
    return x, None


class TinyLM(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(40, 16, name="embed")(ids)
    block = nn.remat(Block) if self.remat else Block
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=3, metadata_params={nn.PARTITION_NAME: "layers"})(name="layers")(x, None)
    return nn.Dense(40, name="head")(x)


CFG = lora.LoraConfig(rank=4, alpha=8.0)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _init(model=TinyLM(), cfg=CFG):
  """Initialised once per (model, config): init under nn.scan is slow on a loaded 2-core CPU."""
  boxed = jax.jit(lambda r: lora.init(model, cfg, r, IDS))(jax.random.key(0))["params"]
  return boxed, nn.unbox(boxed)


def _randomize_b(params, seed=1):
  flat = lora._flat(params)
  rng = np.random.default_rng(seed)
  for k, v in flat.items():
    if k.endswith("lora_b"):
      flat[k] = jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype)
  return lora._unflat(flat)


def test_adapters_on_the_target_kernels_with_logical_names():
  boxed, params = _init()
  paths = lora.adapter_paths(params)
  want = {f"layers/{m}/{n}/lora_{ab}" for m, names in
          (("attn", ("query", "key", "value", "out")), ("mlp", ("fc1_gate", "fc1_up", "fc2")))
          for n in names for ab in "ab"}
  assert set(paths) == want  # not embed, head, norms
  assert params["layers"]["attn"]["query"]["lora_a"].shape == (3, 16, 4)      # [layers, in, r]
  assert params["layers"]["attn"]["query"]["lora_b"].shape == (3, 4, 2, 8)   # [layers, r, heads, kv]
  assert params["layers"]["attn"]["out"]["lora_a"].shape == (3, 2, 8, 4)      # [layers, heads, kv, r]
  assert params["layers"]["attn"]["out"]["lora_b"].shape == (3, 4, 16)
  assert params["layers"]["mlp"]["fc2"]["lora_a"].shape == (3, 24, 4)
  assert boxed["layers"]["attn"]["query"]["lora_a"].names == ("layers", "embed", None)
  assert boxed["layers"]["attn"]["query"]["lora_b"].names == ("layers", None, "heads", "kv")
  assert boxed["layers"]["mlp"]["fc2"]["lora_b"].names == ("layers", None, "embed")
  assert not np.any(np.asarray(params["layers"]["mlp"]["fc1_up"]["lora_b"]))
  assert np.any(np.asarray(params["layers"]["mlp"]["fc1_up"]["lora_a"]))


def test_exact_at_init_and_merge_equals_the_adapted_model():
  model = TinyLM()
  _, params = _init(model)
  base, ada = lora.split(params)
  base_logits = model.apply({"params": base}, IDS)
  adapted = lora.apply(model, CFG, {"params": params}, IDS)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base_logits))  # B = 0
  merged = lora.merge(base, ada, CFG)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))

  trained = _randomize_b(params)
  _, ada = lora.split(trained)
  adapted = lora.apply(model, CFG, {"params": trained}, IDS)
  merged = lora.merge(base, ada, CFG)
  merged_logits = model.apply({"params": merged}, IDS)
  assert float(jnp.max(jnp.abs(adapted - base_logits))) > 1e-2  # the adapters do something
  np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(adapted), atol=1e-5, rtol=0)
  # The merged kernel is W + alpha/rank * A B, checked with a direct formula for one kernel.
  q = trained["layers"]["attn"]["query"]
  want = np.asarray(q["kernel"]) + 2.0 * np.einsum("lir,lrhd->lihd", np.asarray(q["lora_a"]),
                                                   np.asarray(q["lora_b"]))
  np.testing.assert_allclose(np.asarray(merged["layers"]["attn"]["query"]["kernel"]), want,
                             atol=1e-6)
  back = lora.unmerge(merged, ada, CFG)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(base)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  assert lora._flat(lora.combine(base, ada)).keys() == lora._flat(trained).keys()


def test_remat_and_jit_and_dropout():
  model = TinyLM(remat=True)  # remat leaves the parameter tree as it is
  _, params = _init()
  params = _randomize_b(params)
  fn = jax.jit(lambda p: lora.apply(model, CFG, {"params": p}, IDS))
  np.testing.assert_allclose(np.asarray(fn(params)),
                             np.asarray(lora.apply(TinyLM(), CFG, {"params": params}, IDS)),
                             atol=1e-6)
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
  a = lora.apply(model, cfg, {"params": params}, IDS, deterministic=False,
                 rngs={"dropout": jax.random.key(1)})
  b = lora.apply(model, cfg, {"params": params}, IDS)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  np.testing.assert_allclose(np.asarray(b), np.asarray(fn(params)), atol=1e-6)


def test_only_adapters_change_in_training_with_the_base_frozen():
  model = TinyLM()
  _, params = _init(model)
  # As the trainer does: the base is frozen by lora.FREEZE_BASE and split off the state.
  split = ParamSplit((lora.FREEZE_BASE,))
  trainable, frozen = split.split(params)
  assert all(lora.is_adapter(k) for k in lora._flat(trainable))
  tx = optax.adam(1e-2)
  state = tx.init(trainable)

  def loss(p):
    logits = lora.apply(model, CFG, {"params": p}, IDS)
    return optax.softmax_cross_entropy_with_integer_labels(logits, IDS).mean()

  @jax.jit
  def step(t, s):
    grads = jax.grad(lambda t: loss(ParamSplit.merge(t, frozen)))(t)
    updates, s = tx.update(grads, s, t)
    return optax.apply_updates(t, updates), s

  for _ in range(3):  # A gets no gradient while B is zero: step twice at least
    trainable, state = step(trainable, state)
  new = ParamSplit.merge(trainable, frozen)
  flat0, flat1 = lora._flat(params), lora._flat(new)
  for k in flat0:
    same = np.array_equal(np.asarray(flat0[k]).view(np.uint32), np.asarray(flat1[k]).view(np.uint32))
    assert same != lora.is_adapter(k), k
  assert float(loss(new)) < float(loss(params))


def test_bad_configs_are_named(tmp_path):
  with pytest.raises(ValueError, match="invalid LoRA target regex"):
    lora.LoraConfig(targets=("(",))
  mlp = layers.Mlp(8, "swiglu")
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match="match no Dense kernel"):
    lora.init(mlp, lora.LoraConfig(targets=(r".*/nothing/kernel",)), jax.random.key(0), x)
  cfg = lora.LoraConfig.from_config({"rank": 2, "alpha": 4, "targets": [r"(.*/)?fc2/kernel"]})
  assert cfg.scale == 2.0 and cfg.targets == (r"(.*/)?fc2/kernel",)
  params = lora.init(mlp, cfg, jax.random.key(0), x)["params"]
  assert lora.adapter_paths(params) == ["fc2/lora_a", "fc2/lora_b"]


def test_save_merged_writes_sharded_safetensors(tmp_path):
  _, params = _init()
  params = _randomize_b(params)
  base, ada = lora.split(params)
  files = lora.save_merged(params, CFG, str(tmp_path / "model.safetensors"), max_shard_bytes=4000)
  assert files[-1].endswith(".safetensors.index.json") and len(files) > 2
  back = sio.load_safetensors(files[-1])
  merged = lora._flat(lora.merge(base, ada, CFG))
  assert set(back) == set(merged) and not any(lora.is_adapter(k) for k in back)
  for k, v in merged.items():
    np.testing.assert_array_equal(back[k], np.asarray(v))
