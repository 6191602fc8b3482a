"""Quick unit checks of the ViT and the CLIP text tower."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax.traverse_util import flatten_dict, unflatten_dict
from pathjax.models.text import TextTransformer
from pathjax.models.vit import ViT, variant_fields

SMALL = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)


def _images(n=2, size=32, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3))


def unstack(params, depth):
  """Scanned params (encoder/blocks stacked on axis 0) -> unscanned (encoder/blocks_{i})."""
  flat = flatten_dict(nn.unbox(params), sep="/")
  out = {k: v for k, v in flat.items() if not k.startswith("encoder/blocks/")}
  for k, v in flat.items():
    if k.startswith("encoder/blocks/"):
      for i in range(depth):
        out[k.replace("encoder/blocks/", f"encoder/blocks_{i}/")] = v[i]
  return unflatten_dict(out, sep="/")


@pytest.mark.parametrize("kw, prefix", [
    (dict(), 1),
    (dict(reg_tokens=4, pos_embed_on_prefix=False, mlp_activation="swiglu",
          layer_scale_init=1e-5), 5),
    (dict(class_token=False, pool="avg"), 0),
    (dict(pool="avg_fc_norm", num_classes=7, pre_norm=True), 1),
])
def test_vit_shapes(kw, prefix):
  model = ViT(**SMALL, **kw)
  params = model.init(jax.random.PRNGKey(0), _images(1))
  out = model.apply(params, _images())
  assert out["tokens"].shape == (2, prefix + 16, 32)
  assert out["patch_tokens"].shape == (2, 16, 32)
  assert out["pooled"].shape == (2, kw.get("num_classes") or 32)


def test_vit_dynamic_image_size():
  model = ViT(**SMALL)
  params = model.init(jax.random.PRNGKey(0), _images(1))
  out = model.apply(params, _images(size=48))
  assert out["patch_tokens"].shape == (2, 36, 32)


def test_text_shapes_and_pooling():
  model = TextTransformer(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64,
                          context_length=8, embed_dim=16, eos_id=49)
  ids = jnp.array([[48, 3, 4, 49, 0, 0, 0, 0], [48, 5, 49, 0, 0, 0, 0, 0]])
  params = model.init(jax.random.PRNGKey(0), ids)
  out = model.apply(params, ids)
  assert out["pooled"].shape == (2, 16) and out["tokens"].shape == (2, 8, 32)
  # Causal: changing tokens after the eos does not change the pooled features.
  ids2 = ids.at[:, -1].set(7)
  np.testing.assert_allclose(model.apply(params, ids2)["pooled"], out["pooled"], atol=1e-6)
  # argmax pooling (eos_id < 0) finds the same position when eos is the largest id.
  model_argmax = model.clone(eos_id=-1)
  np.testing.assert_allclose(model_argmax.apply(params, ids)["pooled"], out["pooled"], atol=1e-6)
  with pytest.raises(ValueError, match="exceed the context length"):
    model.apply(params, jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("kind", ["vit", "text"])
def test_scan_and_unscanned_agree(kind):
  if kind == "vit":
    scanned = ViT(**SMALL, reg_tokens=2, layer_scale_init=0.3)
    x = _images()
  else:
    scanned = TextTransformer(vocab_size=50, width=32, depth=3, num_heads=4, mlp_dim=64,
                              context_length=8, embed_dim=16)
    x = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 50)
  params = nn.unbox(scanned.init(jax.random.PRNGKey(1), x)["params"])
  plain = scanned.clone(scan=False)
  want = scanned.apply({"params": params}, x)["pooled"]
  got = plain.apply({"params": unstack(params, scanned.depth)}, x)["pooled"]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The unscanned init has the same names as the unstacked tree.
  ref = plain.init(jax.random.PRNGKey(1), x)["params"]
  assert set(flatten_dict(ref, sep="/")) == set(flatten_dict(unstack(params, scanned.depth), sep="/"))


@pytest.mark.parametrize("remat, scan", [("full", True), ("dots_no_batch", True), ("dots", False)])
def test_remat_policies_run_and_match(remat, scan):
  base = ViT(**SMALL, scan=scan)
  x = _images()
  params = nn.unbox(base.init(jax.random.PRNGKey(0), x))

  def loss(model, p):
    return jnp.sum(model.apply(p, x)["pooled"] ** 2)
  g_ref = jax.jit(jax.grad(lambda p: loss(base, p)))(params)
  g = jax.jit(jax.grad(lambda p: loss(base.clone(remat=remat), p)))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_unknown_remat_policy():
  model = ViT(**SMALL, remat="sometimes")
  with pytest.raises(ValueError, match="unknown remat policy"):
    model.init(jax.random.PRNGKey(0), _images(1))


def test_bf16_runs():
  model = ViT(**SMALL, dtype=jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(0), _images(1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # param_dtype stays fp32
  out = model.apply(params, _images())
  assert out["pooled"].dtype == jnp.bfloat16
  ref = model.clone(dtype=jnp.float32).apply(params, _images())["pooled"]
  assert np.abs(np.asarray(out["pooled"], np.float32) - np.asarray(ref)).max() < 0.1
  text = TextTransformer(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64,
                         context_length=8, embed_dim=16, dtype=jnp.bfloat16)
  ids = jnp.ones((2, 8), jnp.int32)
  tp = text.init(jax.random.PRNGKey(0), ids)
  assert text.apply(tp, ids)["pooled"].dtype == jnp.bfloat16


def test_variant_fields():
  assert variant_fields("L/16") == dict(width=1024, depth=24, num_heads=16, mlp_dim=4096,
                                        patch_size=16)
  with pytest.raises(ValueError, match="valid variants: .*B/16"):
    variant_fields("Z/16")


@pytest.mark.slow
def test_bench_encoders_runs(capsys):
  import argparse

  from pathjax.bench import encoders
  parser = argparse.ArgumentParser()
  encoders.register(parser)
  args = parser.parse_args(["--variant", "Ti/16", "--image-size", "32", "--batch-size", "2",
                            "--iters", "1", "--matmul-size", "256", "--no-timm"])
  assert encoders.main(args) == 0
  out = capsys.readouterr().out
  assert "jax matmul" in out and "pathjax    fwd_bwd" in out and "GFLOP/s" in out
