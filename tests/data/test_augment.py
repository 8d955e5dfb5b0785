"""Tests of corinfomax_jax.data.augment: the device ops against numpy/PIL references, the recipe."""
import colorsys
import functools
import glob
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
from PIL import Image, ImageFilter
import pytest

from corinfomax_jax.data import augment
from corinfomax_jax.data import recipe

ad = augment  # the device ops

CIFAR_TRAIN = str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
                  "cifar10" / "train")
GRAY = np.array([0.2989, 0.587, 0.114], np.float32)
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
# What recipe.view_config returns for the paper's view 2, with blur and
# solarisation made likelier so that a batch of 16 shows every op.
VIEW = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5,
            jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
            hue=0.1, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
            solarize_p=0.5, solarize_threshold=0.5)


def _images(batch=4, size=8, seed=1):
  """Smooth random colour images, float32 [batch, size, size, 3] in [0, 1]."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(size=(batch, 3, 3, 3))
  idx = np.linspace(0, 2, size)
  lo = np.floor(idx).astype(int).clip(0, 1)
  f = (idx - lo)[:, None]
  rows = small[:, lo] * (1 - f[None, :, :, None]) + small[:, lo + 1] * f[None, :, :, None]
  out = rows[:, :, lo] * (1 - f[None, None]) + rows[:, :, lo + 1] * f[None, None]
  return out.astype(np.float32)


def _uint8(batch=16, size=16, seed=2):
  return np.round(_images(batch, size, seed) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _cifar(size, per_class):
  """Real CIFAR-10 JPEGs, uint8 [10 * per_class, size, size, 3] (PIL bicubic)."""
  files = []
  for d in sorted(glob.glob(f"{CIFAR_TRAIN}/*")):
    files += sorted(glob.glob(f"{d}/*.jpg"))[:per_class]
  if len(files) < 10 * per_class:
    pytest.skip(f"CIFAR-10 JPEGs not found under {CIFAR_TRAIN}")
  images = []
  for f in files:
    image = Image.open(f).convert("RGB")
    if size != image.size[0]:
      image = image.resize((size, size), Image.BICUBIC)
    images.append(np.asarray(image))
  return np.stack(images)


def _np_blur(image, sigma, max_sigma=None):
  """Reference: sampled Gaussian, radius ceil(3 max_sigma) clipped, edge padding."""
  out = image.astype(np.float64)
  for axis in (0, 1):
    size = out.shape[axis]
    r = min(math.ceil(3 * (max_sigma or sigma)), size - 1)
    t = np.arange(-r, r + 1)
    w = np.exp(-t**2 / (2 * sigma**2))
    w /= w.sum()
    pad = [(0, 0)] * 3
    pad[axis] = (r, r)
    p = np.pad(out, pad, mode="edge")
    out = sum(w[k] * np.take(p, np.arange(k, k + size), axis=axis)
              for k in range(2 * r + 1))
  return out


# ------------------------------------------------------------------ blur


@pytest.mark.parametrize("size,per_class", [(32, 5), (64, 5), (224, 1)])
def test_gaussian_blur_matches_pil(size, per_class):
  images = _cifar(size, per_class)
  if size == 224:
    images = images[::3]  # 4 images keep the test fast
  for sigma in (0.5, 1.0, 2.0):
    ours = ad.gaussian_blur(jnp.asarray(images / 255.0, jnp.float32),
                            jnp.full((len(images),), sigma, jnp.float32))
    ours = np.asarray(ours) * 255.0
    pil = np.stack([np.asarray(Image.fromarray(x).filter(
        ImageFilter.GaussianBlur(radius=sigma))) for x in images])
    diff = np.abs(ours - pil).reshape(len(images), -1).mean(axis=1)
    assert diff.mean() <= 1.5, (size, sigma, diff.mean())
    assert diff.max() <= 2.0, (size, sigma, diff.max())
    # Not vacuous: a blur of twice the sigma is much further from PIL.
    wide = ad.gaussian_blur(jnp.asarray(images / 255.0, jnp.float32),
                            jnp.full((len(images),), 2 * sigma, jnp.float32))
    assert np.abs(np.asarray(wide) * 255.0 - pil).mean() > 1.5 * diff.mean()


def test_gaussian_blur_matches_numpy_per_example_sigma():
  x = _images(batch=4, size=9)
  sigma = np.array([0.3, 0.8, 1.5, 4.0], np.float32)  # 4.0: radius clipped to 8
  out = np.asarray(ad.gaussian_blur(jnp.asarray(x), jnp.asarray(sigma)))
  for i in range(4):
    np.testing.assert_allclose(out[i], _np_blur(x[i], float(sigma[i]), 4.0),
                               atol=1e-5)
  # The matmul form equals shift-and-add, the other way to compute it.
  r = ad._blur_radius(9, 4.0)
  np.testing.assert_allclose(
      out, ad._blur_shift_add(jnp.asarray(x), jnp.asarray(sigma), r, r),
      atol=1e-5)


def test_gaussian_blur_jit_needs_max_sigma_and_equals_eager():
  x = jnp.asarray(_images(batch=3, size=12))
  sigma = jnp.asarray([0.2, 1.0, 1.7])
  eager = ad.gaussian_blur(x, sigma)
  jitted = jax.jit(functools.partial(ad.gaussian_blur, max_sigma=1.7))(x, sigma)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)
  with pytest.raises(ValueError, match="max_sigma"):
    jax.jit(ad.gaussian_blur)(x, sigma)


def test_gaussian_blur_tiny_sigma_is_identity_and_keeps_constants():
  x = jnp.asarray(_images(batch=2, size=10))
  out = ad.gaussian_blur(x, jnp.asarray([1e-4, 1e-3]), max_sigma=2.0)
  np.testing.assert_allclose(out, x, atol=1e-3)
  flat = jnp.full((2, 7, 7, 3), 0.3)
  np.testing.assert_allclose(ad.gaussian_blur(flat, jnp.asarray([0.5, 2.0])),
                             0.3, atol=1e-6)


def test_blur_sigma_from_draw_where_applied():
  x = _images(batch=3, size=10)
  u = jnp.asarray([[0.0, 0.0], [0.3, 1.0], [0.9, 0.5]])  # p=0.5: rows 0, 1
  out = np.asarray(ad.blur(jnp.asarray(x), u, 0.5, (0.5, 2.0)))
  np.testing.assert_allclose(out[0], _np_blur(x[0], 0.5, 2.0), atol=1e-5)
  np.testing.assert_allclose(out[1], _np_blur(x[1], 2.0), atol=1e-5)
  np.testing.assert_array_equal(out[2], x[2])


# ---------------------------------------------------------------- colour


def _np_brightness(x, f):
  return np.clip(f * x, 0, 1)


def _np_contrast(x, f):
  return np.clip(f * x + (1 - f) * (x @ GRAY).mean(), 0, 1)


def _np_saturation(x, f):
  return np.clip(f * x + (1 - f) * (x @ GRAY)[..., None], 0, 1)


def _np_hue(x, shift):
  out = [colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
         for h, s, v in (colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3))]
  return np.asarray(out).reshape(x.shape)


def _jitter_draws(n, apply, factors, hue, order_keys):
  u = np.zeros((n, 9), np.float32)
  u[:, 0] = apply
  u[:, 1:4] = factors
  u[:, 4] = hue
  u[:, 5:9] = order_keys
  return u


def test_color_jitter_brightness_is_clipped_scaling():
  x = _images(batch=4)
  u = np.random.default_rng(0).uniform(size=(4, 9)).astype(np.float32)
  u[:, 0] = 0.0
  out = np.asarray(ad.color_jitter(jnp.asarray(x), u, 1.0, 0.4, 0, 0, 0))
  factor = 0.6 + 0.8 * u[:, 1]
  np.testing.assert_allclose(out, np.clip(factor[:, None, None, None] * x, 0,
                                          1), atol=1e-6)


def test_color_jitter_contrast_saturation_hue_match_numpy():
  x = _images(batch=3, size=4)
  u = _jitter_draws(3, 0.0, np.array([[0.0], [0.7], [1.0]]),
                    np.array([0.0, 0.3, 1.0]), 0.5)
  out = np.asarray(ad.color_jitter(jnp.asarray(x), u, 1.0, 0, 0.4, 0, 0))
  for i, f in enumerate(0.6 + 0.8 * u[:, 2]):
    np.testing.assert_allclose(out[i], _np_contrast(x[i], f), atol=1e-6)
  out = np.asarray(ad.color_jitter(jnp.asarray(x), u, 1.0, 0, 0, 0.2, 0))
  for i, f in enumerate(0.8 + 0.4 * u[:, 3]):
    np.testing.assert_allclose(out[i], _np_saturation(x[i], f), atol=1e-6)
  out = np.asarray(ad.color_jitter(jnp.asarray(x), u, 1.0, 0, 0, 0, 0.1))
  for i, shift in enumerate(0.1 * (2 * u[:, 4] - 1)):
    np.testing.assert_allclose(out[i], _np_hue(x[i], shift), atol=1e-5)


def test_color_jitter_order_per_example_follows_argsort_of_draws():
  x = np.repeat(_images(batch=1, size=4, seed=5), 2, axis=0)
  keys = np.array([[0.1, 0.2, 0.3, 0.4], [0.9, 0.5, 0.1, 0.3]], np.float32)
  u = _jitter_draws(2, 0.0, np.array([[1.0, 0.0, 1.0]]), 0.9, keys)
  out = np.asarray(ad.color_jitter(jnp.asarray(x), u, 1.0, 0.4, 0.4, 0.2,
                                   0.1))
  ops = [lambda y: _np_brightness(y, 1.4), lambda y: _np_contrast(y, 0.6),
         lambda y: _np_saturation(y, 1.2), lambda y: _np_hue(y, 0.08)]
  for i in range(2):
    ref = x[i]
    for op_id in np.argsort(keys[i]):  # torchvision: for fn_id in randperm(4)
      ref = ops[op_id](ref)
    np.testing.assert_allclose(out[i], ref, atol=1e-5)
  assert np.abs(out[0] - out[1]).max() > 1e-2  # the order matters here


def test_color_jitter_applies_where_draw_below_p():
  x = _images(batch=4)
  u = np.random.default_rng(3).uniform(size=(4, 9)).astype(np.float32)
  u[:, 0] = [0.1, 0.9, 0.2, 0.95]
  out = np.asarray(ad.color_jitter(jnp.asarray(x), u, 0.5, 0.4, 0.4, 0.2, 0.1))
  changed = np.abs(out - x).reshape(4, -1).max(axis=1) > 1e-4
  assert changed.tolist() == [True, False, True, False]
  np.testing.assert_array_equal(out[[1, 3]], x[[1, 3]])
  out = ad.color_jitter(jnp.asarray(x), u, 0.0, 0.4, 0.4, 0.2, 0.1)
  np.testing.assert_array_equal(out, x)


def test_grayscale_and_solarize_match_numpy():
  x = _images(batch=3)
  u = jnp.asarray([0.1, 0.6, 0.3])  # p=0.5: rows 0 and 2
  out = np.asarray(ad.grayscale(jnp.asarray(x), u, 0.5))
  luma = x @ GRAY
  for i in (0, 2):
    np.testing.assert_allclose(out[i], np.repeat(luma[i][..., None], 3, -1),
                               atol=1e-6)
  np.testing.assert_array_equal(out[1], x[1])
  out = np.asarray(ad.solarize(jnp.asarray(x), u, 0.5, threshold=0.4))
  ref = np.where(x >= 0.4, 1 - x, x)
  np.testing.assert_allclose(out[[0, 2]], ref[[0, 2]], atol=1e-7)
  np.testing.assert_array_equal(out[1], x[1])
  edge = jnp.asarray([0.0, 0.49, 0.5, 0.8, 1.0]).reshape(1, 1, 5, 1) * jnp.ones(3)
  out = ad.solarize(edge, jnp.zeros(1), 1.0)[0, 0, :, 0]
  np.testing.assert_allclose(out, [0.0, 0.49, 0.5, 0.2, 0.0], atol=1e-6)


# ----------------------------------------------------------------- views


def test_view_is_the_ops_in_order():
  images = _uint8(batch=8)
  draws = jax.random.uniform(jax.random.key(0), (8, ad.NUM_DRAWS))
  out = ad.view(images, draws, VIEW, mean=MEAN, std=STD)

  def cols(name):
    return draws[:, slice(*ad.DRAWS[name])]
  x = jnp.asarray(images, jnp.float32) / 255.0
  x = ad.color_jitter(x, cols("jitter"), 0.8, 0.4, 0.4, 0.2, 0.1)
  x = ad.grayscale(x, cols("grayscale")[:, 0], 0.2)
  x = ad.blur(x, cols("blur"), 0.5, (0.1, 2.0))
  x = ad.solarize(x, cols("solarize")[:, 0], 0.5, 0.5)
  np.testing.assert_allclose(out, ad.normalize(x, MEAN, STD), atol=1e-6)
  np.testing.assert_allclose(ad.normalize(jnp.full((1, 1, 1, 3), 0.5), MEAN,
                                          STD)[0, 0, 0],
                             (0.5 - np.array(MEAN)) / np.array(STD), atol=1e-6)
  # With every probability 0 the view is the evaluation view.
  off = {**VIEW, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0,
         "solarize_p": 0.0}
  np.testing.assert_array_equal(ad.view(images, draws, off, mean=MEAN, std=STD),
                                ad.normalize_uint8(images, MEAN, STD))
  # random_view is view with uniform draws from the key.
  np.testing.assert_array_equal(
      ad.random_view(images, jax.random.key(0), VIEW, mean=MEAN, std=STD),
      out)
  half = ad.random_view(images, jax.random.key(0), VIEW, mean=MEAN, std=STD,
                        dtype=jnp.bfloat16)
  assert half.dtype == jnp.bfloat16 and half.shape == images.shape


def test_view_sharded_over_8_devices_equals_one_device():
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
  images = _uint8(batch=16, size=16, seed=4)
  draws = jax.random.uniform(jax.random.key(1), (16, ad.NUM_DRAWS))
  step = jax.jit(functools.partial(ad.view, cfg=VIEW, mean=MEAN, std=STD))
  one = step(jax.device_put(images, jax.devices()[0]),
             jax.device_put(draws, jax.devices()[0]))
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
  batch = NamedSharding(mesh, PartitionSpec("batch"))
  images8, draws8 = jax.device_put(images, batch), jax.device_put(draws, batch)
  eight = step(images8, draws8)
  assert eight.sharding.is_equivalent_to(batch, 4)
  # To 1e-6 in pixel units: XLA compiles the float ops for 2 examples per
  # device differently from 16 on one (1 ulp), and 1/std scales that by ~4.
  np.testing.assert_allclose(np.asarray(eight) * STD, np.asarray(one) * STD,
                             atol=1e-6)
  # Each device augments its own examples: no collective in the program.
  hlo = step.lower(images8, draws8).compile().as_text()
  for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
    assert op not in hlo, op


def test_wrong_inputs_raise_naming_shape_or_dtype():
  images = _uint8(batch=4)
  draws = jnp.zeros((4, ad.NUM_DRAWS))
  with pytest.raises(ValueError, match="float32.*uint8|uint8.*float32"):
    ad.view(images.astype(np.float32), draws, VIEW, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
    ad.view(images[0], draws, VIEW, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match=r"\(4, 16, 16, 4\)"):
    ad.view(np.concatenate([images, images[..., :1]], -1), draws, VIEW,
            mean=MEAN, std=STD)
  with pytest.raises(ValueError, match=rf"\(4, {ad.NUM_DRAWS}\).*\(8, "):
    ad.view(images, jnp.zeros((8, ad.NUM_DRAWS)), VIEW, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="float32"):
    ad.random_view(images.astype(np.float32), jax.random.key(0), VIEW,
                   mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="float32"):
    ad.normalize_uint8(images.astype(np.float32), MEAN, STD)
  with pytest.raises(ValueError, match="solarize_p"):
    ad.view(images, draws, {k: v for k, v in VIEW.items()
                            if k != "solarize_p"}, mean=MEAN, std=STD)
  x = jnp.asarray(_images(batch=4))
  with pytest.raises(ValueError, match=r"\(4, 1\)"):
    ad.gaussian_blur(x, jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="uint8"):
    ad.gaussian_blur(jnp.asarray(images), jnp.ones(4))


def test_module_imports_no_tensorflow_or_flax():
  code = ("import sys; import corinfomax_jax.data.augment; "
          "bad = [m for m in ('tensorflow', 'flax') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"},
                 cwd=__file__.rsplit("/tests/", 1)[0])


def test_two_views_differ_and_the_draws_reproduce_them():
  settings = recipe.views(recipe.paper_config((0.5,) * 3, (0.25,) * 3))
  view1, view2 = settings.view1, settings.view2
  assert (view1.blur_p, view1.solarize_p) == (1.0, 0.0)
  assert (view2.blur_p, view2.solarize_p) == (0.1, 0.2)
  rng = np.random.default_rng(0)
  crops_ = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)

  def views(seed):
    u = np.random.default_rng(seed).uniform(size=(2, 4, augment.NUM_DRAWS))
    return (np.asarray(augment.view(crops_, u[0], view1, mean=MEAN, std=STD)),
            np.asarray(augment.view(crops_, u[1], view2, mean=MEAN, std=STD)))

  a1, a2 = views(0)
  b1, b2 = views(0)
  c1, _ = views(1)
  assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
  assert not np.allclose(a1, a2)
  assert not np.allclose(a1, c1)
