"""Tests of corinfomax_jax.augment: each op alone, against references."""
import colorsys
import math
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from corinfomax_jax import augment

CIFAR_IMAGE = "/work/shared/data/cifar10/train/cat/0003.jpg"


def _draws(batch, seed=0, columns=augment.NUM_DRAWS):
  return tf.random.stateless_uniform([batch, columns], seed=[seed, 7])


def _images(batch=6, size=16, seed=1):
  """Smooth random colour images in [0, 1], float32 [batch, size, size, 3]."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(size=(batch, 4, 4, 3)).astype(np.float32)
  return tf.image.resize(small, [size, size], method="bilinear")


def _smooth_uint8(height, width, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, size=(1, 5, 5, 3)).astype(np.float32)
  image = tf.image.resize(small, [height, width], method="bilinear")[0]
  return np.round(image.numpy()).astype(np.uint8)


def _torchvision_window(h, w, u, scale, ratio):
  """torchvision RandomResizedCrop.get_params with the given draws."""
  n = augment.CROP_ATTEMPTS
  area = h * w
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for k in range(n):
    target = area * (scale[0] + (scale[1] - scale[0]) * u[k])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[n + k])
    cw = round(math.sqrt(target * aspect))
    ch = round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      return (int(u[2 * n + k] * (h - ch + 1)), int(u[3 * n + k] * (w - cw + 1)),
              ch, cw)
  in_ratio = w / h
  if in_ratio < min(ratio):
    cw, ch = w, round(w / min(ratio))
  elif in_ratio > max(ratio):
    ch, cw = h, round(h * max(ratio))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


# ---------------------------------------------------------------- crops


@pytest.mark.parametrize("height,width", [(32, 32), (20, 50), (375, 500)])
def test_crop_window_matches_torchvision(height, width):
  u = _draws(40, seed=height)[:, :4 * augment.CROP_ATTEMPTS].numpy()
  for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (3.0, 4.0))]:
    for row in u:
      got = [int(v) for v in augment.crop_window(height, width, row, scale,
                                                 ratio)]
      want = _torchvision_window(height, width, row.astype(np.float64), scale,
                                 ratio)
      assert got == list(want), (row, scale, ratio)
      top, left, h, w = got
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width


def test_crop_window_falls_back_to_centre_crop():
  # No box of full area with aspect 2 fits a square: centred 32x16.
  u = _draws(1)[0, :4 * augment.CROP_ATTEMPTS]
  got = [int(v) for v in augment.crop_window(32, 32, u, (1.0, 1.0), (2.0, 2.0))]
  assert got == [8, 0, 16, 32]


def test_random_resized_crop_shape_range_and_bicubic_like_pil():
  image = _smooth_uint8(40, 30)
  u = _draws(3)
  for row in u:
    out = augment.random_resized_crop(image, augment.crop_draws(row), 24,
                                      (0.08, 1.0), (3 / 4, 4 / 3))
    assert out.shape == (24, 24, 3) and out.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out)) <= float(tf.reduce_max(out)) <= 1.0
  # Whole-image "crop" (scale 1, ratio of the image) is PIL's bicubic resize.
  square = _smooth_uint8(40, 40)
  out = augment.random_resized_crop(square, augment.crop_draws(u[0]), 24,
                                    (1.0, 1.0), (1.0, 1.0)).numpy()
  ref = np.asarray(Image.fromarray(square).resize((24, 24), Image.BICUBIC))
  assert np.abs(out * 255 - ref).max() <= 1.01  # PIL rounds to uint8


def test_resize_center_crop_matches_pil():
  if os.path.exists(CIFAR_IMAGE):
    image = np.asarray(Image.open(CIFAR_IMAGE).convert("RGB"))
  else:
    image = _smooth_uint8(32, 32)
  out = augment.resize_center_crop(image, 32, 8 / 7).numpy()
  assert out.shape == (32, 32, 3)
  ref = np.asarray(Image.fromarray(image).resize((36, 36), Image.BICUBIC))
  assert np.abs(out * 255 - ref[2:34, 2:34]).max() <= 1.01
  # Non-square: the shorter side becomes int(size * ratio).
  wide = _smooth_uint8(30, 60)
  out = augment.resize_center_crop(wide, 16, 1.5).numpy()
  ref = np.asarray(Image.fromarray(wide).resize((48, 24), Image.BICUBIC))
  assert np.abs(out * 255 - ref[4:20, 16:32]).max() <= 1.01


# ------------------------------------------------------------ batch ops


BATCH_OPS = {
    "flip": lambda x, u, p: augment.flip(x, u[:, 0], p),
    "jitter": lambda x, u, p: augment.color_jitter(x, u[:, :5], p, 0.4, 0.4,
                                                   0.2, 0.1),
    "grayscale": lambda x, u, p: augment.grayscale(x, u[:, 0], p),
    "blur": lambda x, u, p: augment.gaussian_blur(x, u[:, :2], p, (0.1, 2.0),
                                                  5),
    "solarize": lambda x, u, p: augment.solarize(x, u[:, 0], p, 0.5),
}


@pytest.mark.parametrize("name", sorted(BATCH_OPS))
def test_batch_op_p0_identity_p1_always(name):
  op = BATCH_OPS[name]
  x, u = _images(), _draws(6)
  assert np.array_equal(op(x, u, 0.0).numpy(), x.numpy())
  out = op(x, u, 1.0).numpy()
  assert out.shape == x.shape
  assert out.min() >= 0.0 and out.max() <= 1.0
  changed = np.abs(out - x.numpy()).reshape(6, -1).max(axis=1) > 1e-4
  assert changed.all(), name


@pytest.mark.parametrize("name", sorted(BATCH_OPS))
def test_batch_op_applies_where_draw_below_p(name):
  op = BATCH_OPS[name]
  x = _images()
  u = tf.constant(np.tile([[0.1], [0.9]], (3, 5)), tf.float32)  # rows alternate
  out = op(x, u, 0.5).numpy()
  changed = np.abs(out - x.numpy()).reshape(6, -1).max(axis=1) > 1e-4
  assert changed.tolist() == [True, False] * 3


@pytest.mark.parametrize("name", sorted(BATCH_OPS))
def test_batch_op_on_one_example_equals_its_row(name):
  # A batch of one (the pipeline's case) computes the op only when applied.
  op = BATCH_OPS[name]
  x, u = _images(), _draws(6)
  batch = op(x, u, 0.5).numpy()
  for i in range(6):
    np.testing.assert_allclose(op(x[i:i + 1], u[i:i + 1], 0.5).numpy()[0],
                               batch[i], atol=1e-6)


def test_flip_reverses_columns():
  x = _images()
  out = augment.flip(x, tf.zeros([6]), 1.0)
  assert np.array_equal(out.numpy(), x.numpy()[:, :, ::-1])


def test_color_jitter_factors_follow_torchvision():
  x = _images(batch=2, size=4)
  xn = x.numpy()
  gray = xn @ np.array([0.2989, 0.587, 0.114], np.float32)
  # Draw 1.0 gives factor 1 + x, draw 0.0 gives 1 - x.
  hi = tf.constant([[0.0, 1.0, 1.0, 1.0, 0.5]] * 2)
  out = augment.color_jitter(x, hi, 1.0, 0.4, 0, 0, 0).numpy()
  np.testing.assert_allclose(out, np.clip(1.4 * xn, 0, 1), atol=1e-6)
  out = augment.color_jitter(x, hi, 1.0, 0, 0.4, 0, 0).numpy()
  mean = gray.mean(axis=(1, 2))[:, None, None, None]
  np.testing.assert_allclose(out, np.clip(1.4 * xn - 0.4 * mean, 0, 1),
                             atol=1e-6)
  out = augment.color_jitter(x, hi, 1.0, 0, 0, 0.2, 0).numpy()
  np.testing.assert_allclose(out, np.clip(1.2 * xn - 0.2 * gray[..., None], 0,
                                          1), atol=1e-6)
  # Hue: draw 1.0 shifts the HSV hue by +h.
  out = augment.color_jitter(x, tf.constant([[0.0, 0.5, 0.5, 0.5, 1.0]] * 2),
                             1.0, 0, 0, 0, 0.1).numpy()
  for pixel, got in zip(xn.reshape(-1, 3), out.reshape(-1, 3)):
    h, s, v = colorsys.rgb_to_hsv(*pixel)
    np.testing.assert_allclose(got, colorsys.hsv_to_rgb((h + 0.1) % 1, s, v),
                               atol=1e-5)


def test_hue_shift_matches_tf_image_hsv_round_trip():
  rng = np.random.default_rng(0)
  ties = rng.integers(0, 6, size=(8, 8, 8, 3)) / 5  # greys and equal channels
  x = np.concatenate([ties, rng.uniform(size=(8, 8, 8, 3))]).astype(np.float32)
  shift = rng.uniform(-0.5, 0.5, size=16).astype(np.float32)
  u = np.zeros((16, 5), np.float32)
  u[:, 4] = (shift / 0.5 + 1) / 2  # hue strength 0.5: shift = 0.5 * (2u - 1)
  out = augment.color_jitter(x, u, 1.0, 0, 0, 0, 0.5).numpy()
  hsv = tf.image.rgb_to_hsv(x)
  h = tf.math.floormod(hsv[..., 0] + shift[:, None, None], 1.0)
  ref = tf.image.hsv_to_rgb(tf.stack([h, hsv[..., 1], hsv[..., 2]], -1))
  np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_grayscale_uses_luma_weights():
  x = _images()
  out = augment.grayscale(x, tf.zeros([6]), 1.0).numpy()
  luma = x.numpy() @ np.array([0.2989, 0.587, 0.114], np.float32)
  for c in range(3):
    np.testing.assert_allclose(out[..., c], luma, atol=1e-6)


def test_gaussian_blur_kernel_and_reference():
  assert augment.blur_kernel_size(224, 0.1) == 23
  assert augment.blur_kernel_size(32, 0.1) == 3
  assert augment.blur_kernel_size(64, 0.1) == 7
  x = _images(batch=2, size=12)
  u = tf.constant([[0.0, 0.0], [0.0, 1.0]])  # sigma 0.1 and 2.0
  out = augment.gaussian_blur(x, u, 1.0, (0.1, 2.0), 5).numpy()
  for i, sigma in enumerate([0.1, 2.0]):
    taps = np.arange(-2, 3)
    k = np.exp(-taps**2 / (2 * sigma**2))
    k /= k.sum()
    pad = np.pad(x.numpy()[i], [(2, 2), (2, 2), (0, 0)], mode="reflect")
    rows = sum(k[t] * pad[t:t + 12] for t in range(5))
    ref = sum(k[t] * rows[:, t:t + 12] for t in range(5))
    np.testing.assert_allclose(out[i], ref, atol=1e-5)
  # Blur keeps a constant image constant.
  flat = tf.fill([1, 8, 8, 3], 0.3)
  np.testing.assert_allclose(
      augment.gaussian_blur(flat, tf.constant([[0.0, 0.7]]), 1.0, (0.1, 2.0),
                            3).numpy(), 0.3, atol=1e-6)


def test_solarize_inverts_above_threshold():
  x = tf.constant([0.0, 0.2, 0.49, 0.5, 0.8, 1.0], shape=[1, 1, 6, 1])
  x = tf.tile(x, [1, 1, 1, 3])
  out = augment.solarize(x, tf.zeros([1]), 1.0, 0.5).numpy()[0, 0, :, 0]
  np.testing.assert_allclose(out, [0.0, 0.2, 0.49, 0.5, 0.2, 0.0], atol=1e-6)


def test_normalize():
  x = tf.fill([1, 2, 2, 3], 0.5)
  out = augment.normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 0.5)).numpy()
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 1.0])


# ------------------------------------------------------- views and draws


def test_view_draws_depend_only_on_seed_and_row():
  seed = tf.constant([3, 4], tf.int64)
  full = augment.view_draws(seed, tf.range(8), 8).numpy()
  part = augment.view_draws(seed, tf.constant([5, 6]), 8).numpy()
  assert np.array_equal(part, full[5:7])
  assert full.shape == (8, augment.NUM_DRAWS)
  assert 0 <= full.min() and full.max() < 1
  assert np.array_equal(augment.view_draws(seed, tf.range(8), 8).numpy(), full)
  other = augment.view_draws(tf.constant([3, 5], tf.int64), tf.range(8), 8)
  assert not np.allclose(other.numpy(), full)


def test_two_views_differ_and_seed_reproduces():
  config = augment.paper_config((0.5,) * 3, (0.25,) * 3)
  view1 = augment.view_config(config, "view1")
  view2 = augment.view_config(config, "view2")
  assert (view1.blur_p, view1.solarize_p) == (1.0, 0.0)
  assert (view2.blur_p, view2.solarize_p) == (0.1, 0.2)
  x = tf.image.convert_image_dtype(_images(batch=4, size=16), tf.float32)

  def views(seed):
    u1 = augment.view_draws(tf.constant([seed, 1], tf.int64), tf.range(4), 4)
    u2 = augment.view_draws(tf.constant([seed, 2], tf.int64), tf.range(4), 4)
    return (augment.augment_batch(x, u1, view1).numpy(),
            augment.augment_batch(x, u2, view2).numpy())

  a1, a2 = views(0)
  b1, b2 = views(0)
  c1, _ = views(1)
  assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
  assert not np.allclose(a1, a2)
  assert not np.allclose(a1, c1)


def test_view_override_and_config_checks():
  config = augment.paper_config((0.5,) * 3, (0.25,) * 3)
  assert config["crop_scale"] == (0.08, 1.0)
  assert (config["brightness"], config["contrast"], config["saturation"],
          config["hue"], config["jitter_p"], config["grayscale_p"]) == (
              0.4, 0.4, 0.2, 0.1, 0.8, 0.2)
  augment.check_config(config)
  config["view2"] = dict(config["view2"], crop_scale=(0.2, 1.0))
  assert augment.view_config(config, "view2").crop_scale == (0.2, 1.0)
  assert augment.view_config(config, "view1").crop_scale == (0.08, 1.0)
  bad = dict(config, view1=dict(blur_p=1.5))
  with pytest.raises(ValueError, match=r"view1\.blur_p=1\.5"):
    augment.check_config(bad)
  with pytest.raises(ValueError, match="unknown keys.*blur_q"):
    augment.view_config(dict(config, view1=dict(blur_q=1.0)), "view1")
  with pytest.raises(ValueError, match="crop_scale"):
    augment.check_config(dict(config, crop_scale=(0.5, 0.1)))


def test_with_overrides_merges_views_and_rejects_unknown_keys():
  config = augment.paper_config((0.5,) * 3, (0.25,) * 3)
  merged = augment.with_overrides(config, {"hue": 0.05,
                                           "view2": {"solarize_p": 0.5}})
  assert merged["hue"] == 0.05
  assert merged["view2"] == {"blur_p": 0.1, "solarize_p": 0.5}
  assert config["hue"] == 0.1 and config["view2"]["solarize_p"] == 0.2
  assert augment.with_overrides(config, None) == config
  with pytest.raises(ValueError, match="Unknown augmentation key 'hu'"):
    augment.with_overrides(config, {"hu": 0.05})
