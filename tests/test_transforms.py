"""Patch decoding and augmentation: formulas, the dihedral group, host vs device paths."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from pathjax.input import transforms

LUMA = np.array([0.299, 0.587, 0.114])
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def jitter_direct(v, brightness, contrast, saturation, hue, mean_luma):
  """Colour jitter of RGB vectors v [N, 3], one step at a time."""
  v = brightness * v
  v = contrast * v + (1 - contrast) * brightness * mean_luma   # towards the mean grey
  v = saturation * v + (1 - saturation) * (v @ LUMA)[:, None]  # towards luma
  yiq = v @ YIQ.T
  c, s = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
  i, q = yiq[:, 1].copy(), yiq[:, 2].copy()
  yiq[:, 1], yiq[:, 2] = c * i - s * q, s * i + c * q
  return yiq @ np.linalg.inv(YIQ).T


@pytest.mark.parametrize("args", [(1.0, 1.0, 1.0, 0.0, 128.0), (1.1, 0.9, 1.2, 0.03, 101.0),
                                  (0.85, 1.15, 0.7, -0.05, 190.0)])
def test_color_matrix_matches_stepwise_formula(args):
  v = np.random.default_rng(0).uniform(0, 255, (50, 3))
  m = np.asarray(transforms.color_matrix(*args)).reshape(3, 4)
  np.testing.assert_allclose(v @ m[:, :3].T + m[:, 3], jitter_direct(v, *args), atol=1e-9)


def test_dihedral_steps_match_pil():
  x = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  for k, op in enumerate(transforms._DIHEDRAL):
    want = x if op is None else np.asarray(Image.fromarray(x).transpose(op))
    t, lr, tb = transforms.DIHEDRAL_STEPS[k]
    got = x.transpose(1, 0, 2) if t else x
    got = got[:, ::-1] if lr else got
    got = got[::-1] if tb else got
    np.testing.assert_array_equal(got, want, err_msg=f"dihedral {k}")


def _jpeg(arr, mode="RGB"):
  buf = io.BytesIO()
  Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def test_fast_decode_equals_pil_and_falls_back():
  rng = np.random.default_rng(2)
  arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  data = _jpeg(arr)
  pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  np.testing.assert_array_equal(transforms.decode_to_array(data), pil)
  np.testing.assert_array_equal(transforms.decode_to_array(data, 40), pil)
  assert transforms.decode_to_array(data, 20).shape == (20, 20, 3)       # resized through PIL
  grey = transforms.decode_to_array(_jpeg(arr, "L"))                    # not RGB: PIL path
  assert grey.shape == (40, 40, 3) and (grey[..., 0] == grey[..., 1]).all()
  with pytest.raises(Exception):
    transforms.decode_to_array(data[:len(data) // 3] + b"\x00" * 10)


@pytest.mark.parametrize("hed_sigma", [0.0, 0.05])
def test_device_augmentation_matches_host(hed_sigma):
  import jax.numpy as jnp
  rng = np.random.default_rng(3)
  x = transforms.decode_to_array(_jpeg(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))
  spec = transforms.AugmentSpec(brightness=0.2, contrast=0.2, saturation=0.3, hue=0.05,
                                hed_sigma=hed_sigma)
  for k in range(8):
    params = transforms.sample_params(rng, spec)
    params["dihedral"] = k
    host = transforms.augment_image(x, params, 24)
    pixels, color, dihedral = transforms.augment_for_device(x, params, 24)
    if hed_sigma:  # stain jitter runs on the host in both paths
      assert not np.array_equal(pixels, x)
    dev = np.asarray(transforms.augment_on_device(jnp.asarray(pixels), jnp.asarray(color),
                                                  jnp.asarray(dihedral)))
    # PIL rounds to uint8, the device keeps floats: at most half a grey level apart.
    np.testing.assert_allclose(dev, host, atol=0.5 + 1e-4, err_msg=f"dihedral {k}")


def test_normalize_with_identity_augmentation_is_plain_normalize():
  import jax.numpy as jnp
  x = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8))
  color = jnp.broadcast_to(jnp.asarray(transforms.IDENTITY_COLOR), (2, 3, 3, 4))
  got = transforms.normalize_on_device(x, color=color, dihedral=jnp.zeros((2, 3), jnp.int32))
  np.testing.assert_allclose(np.asarray(got), np.asarray(transforms.normalize_on_device(x)), atol=1e-6)
