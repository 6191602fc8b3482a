"""layers.Attention: every implementation that runs on CPU equals the einsum reference
(masks, causal, grouped-query heads, cross-attention with key padding, KV cache), and
`auto` resolves for the target platform, not the host."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.models import layers



def _run(impl, x, kv=None, mask=None, kv_mask=None, **fields):
  module = layers.Attention(num_heads=4, impl=impl, **fields)
  params = module.init(jax.random.key(0), x, kv, mask, kv_mask=kv_mask)
  return np.asarray(module.apply(params, x, kv, mask, kv_mask=kv_mask))


def _inputs(b=2, t=8, d=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)


def _naive(x, kv, params, heads, kv_heads, mask):
  """Direct formula: softmax(q k^T / sqrt(d) masked) v, keys/values repeated per group."""
  p = params["params"]
  q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btd,dhk->bthk", kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("btd,dhk->bthk", kv, p["value"]["kernel"]) + p["value"]["bias"]
  k, v = np.repeat(k, heads // kv_heads, 2), np.repeat(v, heads // kv_heads, 2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -1e30)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", w, v)
  return np.einsum("bqhd,hdo->bqo", o, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_einsum_matches_direct_formula_gqa_causal_padding(kv_heads):
  x = _inputs()
  kv_mask = jnp.array([[False, False, True, True, True, True, True, True], [True] * 8])
  module = layers.Attention(num_heads=4, num_kv_heads=kv_heads, causal=True, impl="einsum")
  params = module.init(jax.random.key(1), x, kv_mask=kv_mask)
  got = module.apply(params, x, kv_mask=kv_mask)
  mask = np.tril(np.ones((8, 8), bool))[None, None] & np.asarray(kv_mask)[:, None, None, :]
  want = _naive(np.asarray(x), np.asarray(x), jax.tree.map(np.asarray, nn.unbox(params)), 4, kv_heads, mask)
  rows = np.asarray(kv_mask)  # padded queries see no key: their output is undefined
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=2e-5)


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "mask": dict(mask=True),
    "gqa_causal_kvmask": dict(causal=True, num_kv_heads=2, kv_mask=True),
    "cross_padding": dict(cross=True, kv_mask=True),
    "mqa_mask_and_kvmask": dict(num_kv_heads=1, mask=True, kv_mask=True),
}


def _case(name, t=8, tk=12):
  case = dict(CASES[name])
  x = _inputs(t=t)
  kv = _inputs(t=tk, seed=3) if case.pop("cross", False) else None
  kv_len = tk if kv is not None else t
  mask = kv_mask = None
  if case.pop("mask", False):
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 4, t, kv_len))
    mask = mask.at[..., 0].set(True)
  if case.pop("kv_mask", False):
    lengths = jnp.array([kv_len, kv_len // 2])
    kv_mask = jnp.arange(kv_len)[None] >= (kv_len - lengths)[:, None]  # left padding
    kv_mask = kv_mask.at[:, -1].set(True)
  return x, kv, mask, kv_mask, case


@pytest.mark.parametrize("name", list(CASES))
def test_xla_equals_einsum(name):
  x, kv, mask, kv_mask, fields = _case(name)
  want = _run("einsum", x, kv, mask, kv_mask, **fields)
  got = _run("xla", x, kv, mask, kv_mask, **fields)
  if fields.get("causal") and kv_mask is not None:
    keep = np.asarray(kv_mask)[:, :, None]  # padded queries (no visible key) are undefined
    want, got = want * keep, got * keep
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_splash_kernel_equals_einsum_in_interpreter(causal):
  """The Pallas TPU kernel run by Pallas' interpreter on CPU, with key padding (segment ids)
  and grouped-query heads; 128 is its block size."""
  x = _inputs(b=2, t=128, d=64)
  kv_mask = jnp.arange(128)[None] >= jnp.array([0, 40])[:, None]
  fields = dict(causal=causal, num_kv_heads=2)
  want = _run("einsum", x, None, None, kv_mask, **fields)
  got = _run("splash", x, None, None, kv_mask, **fields)
  keep = np.asarray(kv_mask)[:, :, None] if causal else np.ones_like(want, bool)
  np.testing.assert_allclose(got * keep, want * keep, atol=2e-5)


def test_kernels_fall_back_to_xla_where_they_cannot_run():
  module = layers.Attention(num_heads=4, impl="splash")
  q = jnp.zeros((1, 7, 4, 8))
  assert module._pick(q, q, None, None, False, False) == "xla"          # not a block multiple
  q128 = jnp.zeros((1, 128, 4, 8))
  assert module._pick(q128, q128, None, None, False, False) == "splash"
  assert module._pick(q128, q128, None, None, False, True) == "xla"     # decode with a cache
  assert module._pick(q128, q128, jnp.ones((1, 1, 128, 128), bool), None, False, False) == "xla"
  assert module._pick(q128, q128, None, None, True, False) == "einsum"  # dropout
  cudnn = layers.Attention(num_heads=4, impl="cudnn")
  assert cudnn._pick(q128, q128, None, None, False, False) == "xla"     # float32
  assert cudnn._pick(q128.astype(jnp.bfloat16), q128, None, None, False, False) == "cudnn"


def test_resolve_attention_impl_follows_the_target_platform():
  assert layers.resolve_attention_impl("auto", "cpu") == "einsum"
  assert layers.resolve_attention_impl("auto", "tpu") == "splash"
  assert layers.resolve_attention_impl("auto", "cuda") == "cudnn"
  assert layers.resolve_attention_impl("xla", "tpu") == "xla"
  assert layers.current_platform() == "cpu"
  with layers.target_platform("tpu"):
    assert layers.current_platform() == "tpu"
    assert layers.resolve_attention_impl("auto") == "splash"
    with layers.target_platform("gpu"):
      assert layers.resolve_attention_impl("auto") == "cudnn"
    assert layers.resolve_attention_impl("auto") == "splash"
  assert layers.resolve_attention_impl("auto") == "einsum"
  with pytest.raises(ValueError, match="valid: auto, einsum, xla, cudnn, splash"):
    layers.resolve_attention_impl("flash")
  with pytest.raises(ValueError, match="unknown platform"):
    with layers.target_platform("metal"):
      pass


def test_cpu_host_tracing_for_tpu_picks_the_tpu_kernel():
  """Under target_platform("tpu") a CPU host lowers the Mosaic (Pallas TPU) splash kernel,
  as `pathjax compile` does for a TPU topology; without it, the CPU einsum path."""
  x = _inputs(b=1, t=128, d=64)
  module = layers.Attention(num_heads=4, causal=True)
  params = module.init(jax.random.key(0), x)
  with layers.target_platform("tpu"):
    text = jax.jit(module.apply).trace(params, x).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text and "splash" in text
  cpu_text = jax.jit(module.apply).lower(params, x).as_text()
  assert "tpu_custom_call" not in cpu_text and "splash" not in cpu_text


def test_record_attention_picks_names_the_kernel_each_call_traced():
  """ViT-L/16 at 224 px has 197 tokens: not a multiple of splash's 128 block, so "auto" on
  a TPU traces XLA's attention there and splash at 128 tokens; the record says which."""
  module = layers.Attention(num_heads=4)
  params = module.init(jax.random.key(0), _inputs(b=1, t=128, d=64))
  with layers.target_platform("tpu"), layers.record_attention_picks() as picks:
    for t in (128, 197, 197):
      jax.eval_shape(module.apply, params, _inputs(b=1, t=t, d=64))
  assert picks == {("splash", 128, 128): 1, ("xla", 197, 197): 2}
  with layers.record_attention_picks() as on_cpu:
    jax.eval_shape(module.apply, params, _inputs(b=1, t=128, d=64))
  assert on_cpu == {("einsum", 128, 128): 1}


def test_splash_under_a_mesh_runs_per_shard():
  """With a mesh set, the kernel runs through shard_map split as the logical rules split
  the activations (batch over "data", heads over "tensor"), and equals einsum."""
  import flax.linen as nn
  from jax.sharding import AxisType
  x = _inputs(b=4, t=128, d=64)
  kv_mask = jnp.arange(128)[None] >= jnp.array([0, 40, 3, 100])[:, None]
  want = _run("einsum", x, None, None, kv_mask, num_kv_heads=2)
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  rules = (("act_batch", "data"), ("act_heads", "tensor"), ("act_len", None), ("act_kv", None))
  module = layers.Attention(num_heads=4, num_kv_heads=2, impl="splash")
  params = module.init(jax.random.key(0), x)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    text = jax.jit(module.apply).lower(params, x, kv_mask=kv_mask).as_text()
    got = jax.jit(module.apply)(params, x, kv_mask=kv_mask)
  assert "shard_map" in text or "sdy.manual_computation" in text
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_kv_cache_prefill_then_extend_equals_full_attention(impl):
  """Prefill 5 tokens (left padded), then one token at a time, equals causal attention over
  the whole sequence at once."""
  b, t, total, max_len = 2, 5, 9, 12
  x = _inputs(b=b, t=total)
  kv_mask = jnp.arange(total)[None] >= jnp.array([0, 2])[:, None]
  module = layers.Attention(num_heads=4, num_kv_heads=2, causal=True, impl=impl)
  params = module.init(jax.random.key(0), x)
  full = np.asarray(module.apply(params, x, kv_mask=kv_mask))
  cache = layers.init_kv_cache(b, 2, max_len, 8)
  slots = jnp.zeros((b, max_len), bool).at[:, :total].set(kv_mask)
  out, cache = module.apply(params, x[:, :t], kv_mask=slots, cache=cache, cache_index=0)
  outs = [np.asarray(out)]
  for i in range(t, total):
    out, cache = module.apply(params, x[:, i:i + 1], kv_mask=slots, cache=cache, cache_index=i)
    outs.append(np.asarray(out))
  got = np.concatenate(outs, axis=1)
  keep = np.asarray(kv_mask)[:, :, None]
  np.testing.assert_allclose(got * keep, full * keep, atol=1e-5)
  assert cache[0].shape == (b, 2, max_len, 8)


def test_cache_has_logical_axes_and_rules():
  from pathjax import sharding
  names = dict(sharding.FSDP_TENSOR_RULES)
  for axis in layers.CACHE_AXES:
    assert axis in names
