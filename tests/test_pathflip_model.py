"""PathFLIP context transformer and region head vs their PyTorch counterparts; the
Attention options they use (separate value input, returned weights)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.models import layers
from pathjax.models import pathflip as pf

torch = pytest.importorskip("torch", reason="parity references need torch (pip install -e .[reference])")

TOL = dict(rtol=1e-5, atol=1e-5)


def _randomize(module, seed):
  """Non-trivial weights everywhere (torch zero-inits biases, ones LayerNorm scales)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      scale_one = "norm" in name and name.endswith("weight")
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if scale_one else 0.0))
  return module


def _state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_context_encoder_matches_torch(activation, with_mask):
  d, heads, ffn, depth, b, n = 32, 4, 64, 2, 3, 7
  layer = torch.nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.1, activation=activation,
                                           batch_first=True, norm_first=False)
  ref = _randomize(torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False), 0).eval()
  x = np.random.default_rng(1).normal(size=(b, n, d)).astype(np.float32)
  mask = np.ones((b, n), bool)
  if with_mask:
    mask[1, 5:] = False
    mask[2, 1:3] = False
  with torch.no_grad():
    want = ref(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(~mask) if with_mask else None)
  params = pf.convert_transformer_encoder(_state(ref), depth=depth, num_heads=heads)
  model = pf.ContextEncoder(depth=depth, num_heads=heads, mlp_dim=ffn, activation=activation)
  got = model.apply({"params": params}, x, mask if with_mask else None)
  np.testing.assert_allclose(np.asarray(got)[mask], want.numpy()[mask], **TOL)
  # the converted tree has exactly the module's structure and shapes
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
  assert jax.tree.structure(nn.meta.unbox(abstract)) == jax.tree.structure(params)
  assert jax.tree.map(lambda a, p: a.shape == p.shape, nn.meta.unbox(abstract), params) == \
      jax.tree.map(lambda _: True, params)


def test_context_encoder_dropout_in_training():
  model = pf.ContextEncoder(depth=2, num_heads=4, mlp_dim=64, deterministic=False)
  x = jnp.ones((2, 5, 32)) + jnp.arange(32.0) / 32
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)["params"]
  run = lambda seed: model.apply({"params": params}, x, rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(run(1), run(2))
  np.testing.assert_array_equal(run(3), run(3))
  eval_out = pf.ContextEncoder(depth=2, num_heads=4, mlp_dim=64).apply({"params": params}, x)
  assert not np.allclose(run(1), eval_out)


@pytest.mark.parametrize("with_mask", [False, True])
def test_region_head_matches_torch(with_mask):
  d, heads, b, t, l = 32, 4, 2, 5, 6
  gen_mods = {name: torch.nn.Linear(d, d) for name in ("W_q", "W_k", "W_v")}
  mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
  ref = _randomize(torch.nn.ModuleDict({**gen_mods, "mha": mha}), 2).eval()
  rng = np.random.default_rng(3)
  texts = rng.normal(size=(b, t, d)).astype(np.float32)
  regions = rng.normal(size=(b, l, d)).astype(np.float32)
  mask = np.ones((b, l), bool)
  if with_mask:
    mask[0, 4:] = False
  with torch.no_grad():
    tt, rr = torch.from_numpy(texts), torch.from_numpy(regions)
    want, want_w = ref["mha"](ref["W_q"](tt), ref["W_k"](rr), ref["W_v"](rr),
                              key_padding_mask=torch.from_numpy(~mask) if with_mask else None,
                              need_weights=True, average_attn_weights=True)
  params = pf.convert_region_head(_state(ref), num_heads=heads)
  got, got_w = pf.RegionHead(width=d, num_heads=heads).apply(
      {"params": params}, texts, regions, mask if with_mask else None)
  assert got.shape == (b, t, d) and got_w.shape == (b, t, l)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(got_w), want_w.numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(got_w).sum(-1), 1.0, **TOL)
  if with_mask:
    assert np.all(np.asarray(got_w)[0, :, 4:] == 0)


def test_attention_value_input_and_weights():
  """value_input changes only the values; returned weights are softmax(q k / sqrt(d)) per head
  and reproduce the output."""
  b, n, m, d, h = 2, 3, 4, 8, 2
  rng = np.random.default_rng(0)
  x, kv, vin = (rng.normal(size=s).astype(np.float32) for s in ((b, n, d), (b, m, d), (b, m, d)))
  att = layers.Attention(num_heads=h)
  params = att.init(jax.random.key(0), x, kv)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  out, w = att.apply({"params": params}, x, kv, value_input=vin, return_weights=True)
  assert w.shape == (b, h, n, m)
  p = jax.tree.map(np.asarray, nn.meta.unbox(params))
  q = np.einsum("bnd,dhk->bnhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bmd,dhk->bmhk", kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bmd,dhk->bmhk", vin, p["value"]["kernel"]) + p["value"]["bias"]
  s = np.einsum("bnhk,bmhk->bhnm", q, k) / np.sqrt(d // h)
  probs = np.exp(s - s.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(w), probs, **TOL)
  o = np.einsum("bhnm,bmhk->bnhk", probs, v)
  want = np.einsum("bnhk,hke->bne", o, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(np.asarray(out), want, **TOL)
  # without value_input the values come from kv, and the plain call returns the same output
  plain = att.apply({"params": params}, x, kv)
  np.testing.assert_allclose(np.asarray(att.apply({"params": params}, x, kv, return_weights=True)[0]),
                             np.asarray(plain), **TOL)
  with pytest.raises(ValueError, match="cache"):
    att.apply({"params": params}, x, return_weights=True,
              cache=layers.init_kv_cache(b, h, 8, d // h), cache_index=0)


def test_heads_start_from_torchs_default_init_and_the_region_attention_looks():
  """Trained from scratch, the heads start where torch's modules start: every kernel's std
  equals the torch counterpart's (nn.Linear, nn.MultiheadAttention's in/out projections,
  nn.TransformerEncoderLayer's feed-forward) within sampling error. With std-0.02 kernels the
  region attention was uniform (1e-4 logits) and never learned to localize."""
  d, heads_, ffn = 128, 8, 256
  model = pf.PathFLIPHeads(width=d, depth=1, num_heads=heads_, mlp_dim=ffn, region_heads=heads_,
                           dropout_rate=0.0)
  tokens = jax.random.normal(jax.random.key(1), (2, 13, d))
  texts = jax.random.normal(jax.random.key(2), (2, 5, d))
  params = nn.unbox(model.init(jax.random.key(0), tokens, texts))["params"]
  torch.manual_seed(0)
  layer = torch.nn.TransformerEncoderLayer(d, heads_, ffn, batch_first=True)
  linear = torch.nn.Linear(d, d)
  std = lambda a: float(np.std(np.asarray(a)))
  ctx, head = params["context"]["layers_0"], params["region_head"]
  want = {"mha in-projection": std(layer.self_attn.in_proj_weight.detach()),
          "mha out-projection": std(layer.self_attn.out_proj.weight.detach()),
          "ffn linear1": std(layer.linear1.weight.detach()), "ffn linear2": std(layer.linear2.weight.detach()),
          "linear": std(linear.weight.detach())}
  got = {"mha in-projection": [ctx["attention"][n]["kernel"] for n in ("query", "key", "value")]
         + [head["attention"][n]["kernel"] for n in ("query", "key", "value")],
         "mha out-projection": [ctx["attention"]["out"]["kernel"], head["attention"]["out"]["kernel"]],
         "ffn linear1": [ctx["mlp"]["fc1"]["kernel"]], "ffn linear2": [ctx["mlp"]["fc2"]["kernel"]],
         "linear": [head[n]["kernel"] for n in ("w_q", "w_k", "w_v")]}
  for name, kernels in got.items():
    for k in kernels:
      np.testing.assert_allclose(std(k), want[name], rtol=0.05, err_msg=name)
  # At init the region weights already depend on the text (torch-sized logits).
  _, _, w = model.apply({"params": params}, tokens, texts)
  spread = np.asarray(w).std(axis=1).mean()       # across texts, per region
  assert spread > 1e-3, spread


def test_region_attention_focus():
  from pathjax.recipes.pathflip import region_attention_focus
  valid = np.array([[True, True, True, True, False]])
  uniform = np.where(valid, 0.25, 0.0)[:, None].repeat(2, 1)
  one = np.zeros((1, 2, 5))
  one[0, :, 1] = 1.0
  assert abs(float(region_attention_focus(uniform, valid))) < 1e-6
  assert abs(float(region_attention_focus(one, valid)) - 1.0) < 1e-6
  half = np.where(valid, [0.5, 0.5, 0.0, 0.0, 0.0], 0.0)[:, None].repeat(2, 1)
  np.testing.assert_allclose(float(region_attention_focus(half, valid)), 1 - np.log(2) / np.log(4), rtol=1e-6)
