"""Tests of corinfomax_jax.data.crops: the host's crops against torchvision and PIL."""
import math
import os
import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from corinfomax_jax.data import crops

CIFAR_IMAGE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
               / "train" / "cat" / "0003.jpg")


def _draws(batch, seed=0, columns=crops.HOST_DRAWS):
  return tf.random.stateless_uniform([batch, columns], seed=[seed, 7])


def _smooth_uint8(height, width, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, size=(1, 5, 5, 3)).astype(np.float32)
  image = tf.image.resize(small, [height, width], method="bilinear")[0]
  return np.round(image.numpy()).astype(np.uint8)


def _torchvision_window(h, w, u, scale, ratio):
  """torchvision RandomResizedCrop.get_params with the given draws."""
  n = crops.CROP_ATTEMPTS
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
  u = _draws(40, seed=height)[:, :4 * crops.CROP_ATTEMPTS].numpy()
  for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (3.0, 4.0))]:
    for row in u:
      got = [int(v) for v in crops.crop_window(height, width, row, scale,
                                                 ratio)]
      want = _torchvision_window(height, width, row.astype(np.float64), scale,
                                 ratio)
      assert got == list(want), (row, scale, ratio)
      top, left, h, w = got
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width


def test_crop_window_falls_back_to_centre_crop():
  # No box of full area with aspect 2 fits a square: centred 32x16.
  u = _draws(1)[0, :4 * crops.CROP_ATTEMPTS]
  got = [int(v) for v in crops.crop_window(32, 32, u, (1.0, 1.0), (2.0, 2.0))]
  assert got == [8, 0, 16, 32]


def test_random_resized_crop_is_the_references_pil_crop_resize_and_flip_bit_for_bit():
  # torchvision's RandomResizedCrop then RandomHorizontalFlip on a PIL image:
  # img.crop(window).resize((size, size), BICUBIC), mirrored where the flip draw < p.
  # Ours must give the same bytes for the same draws.
  image = _smooth_uint8(40, 30) ^ np.uint8(0b1010)  # some texture for the bicubic taps
  u = _draws(8).numpy()
  flipped = 0
  for row in u:
    out = crops.random_resized_crop(image, row, 24, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
    assert out.shape == (24, 24, 3) and out.dtype == tf.uint8
    top, left, h, w = crops.crop_window(40, 30, row[:4 * crops.CROP_ATTEMPTS], (0.08, 1.0),
                                        (3 / 4, 4 / 3))
    ref = Image.fromarray(image).crop((left, top, left + w, top + h))
    ref = ref.resize((24, 24), Image.BICUBIC)
    if row[crops.FLIP_COLUMN] < 0.5:
      ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
      flipped += 1
    np.testing.assert_array_equal(out.numpy(), np.asarray(ref))
  assert 0 < flipped < len(u)  # both branches ran


def test_resize_center_crop_matches_pil():
  if os.path.exists(CIFAR_IMAGE):
    image = np.asarray(Image.open(CIFAR_IMAGE).convert("RGB"))
  else:
    image = _smooth_uint8(32, 32)
  out = crops.resize_center_crop(image, 32, 8 / 7).numpy()
  assert out.shape == (32, 32, 3)
  ref = np.asarray(Image.fromarray(image).resize((36, 36), Image.BICUBIC))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, ref[2:34, 2:34])
  # Non-square: the shorter side becomes int(size * ratio).
  wide = _smooth_uint8(30, 60)
  out = crops.resize_center_crop(wide, 16, 1.5).numpy()
  ref = np.asarray(Image.fromarray(wide).resize((48, 24), Image.BICUBIC))
  np.testing.assert_array_equal(out, ref[4:20, 16:32])


def test_crops_in_one_call_equal_crops_one_by_one():
  image = _smooth_uint8(40, 30)
  u = np.random.default_rng(3).uniform(size=(2, crops.HOST_DRAWS)).astype(np.float32)
  specs = ((24, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, "bicubic"),
           (16, (0.5, 1.0), (1.0, 1.0), 1.0, "bilinear"))
  together = crops.random_resized_crops(image, [u[0], u[1]], specs)
  assert [t.shape for t in together] == [(24, 24, 3), (16, 16, 3)]
  for out, row, spec in zip(together, u, specs):
    one = crops.random_resized_crop(image, row, spec[0], spec[1], spec[2], spec[3], spec[4])
    np.testing.assert_array_equal(out.numpy(), one.numpy())
  with pytest.raises(ValueError, match="'area'"):
    crops.random_resized_crops(image, [u[0]], ((8, (1.0, 1.0), (1.0, 1.0), 0.0, "area"),))


def test_bilinear_resize_center_crop_is_the_reference_test_view():
  # The semi-supervised reference's test view: Resize(256) + CenterCrop(224) on a PIL
  # image, torchvision's default (bilinear) resize; 256 = int(224 * 8 / 7).
  image = _smooth_uint8(375, 500)
  out = crops.resize_center_crop(image, 224, 8 / 7, "bilinear").numpy()
  ref = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))
  top, left = int(round((256 - 224) / 2)), int(round((341 - 224) / 2))
  np.testing.assert_array_equal(out, ref[top:top + 224, left:left + 224])
  bicubic = crops.resize_center_crop(image, 224, 8 / 7).numpy()
  assert not np.array_equal(out, bicubic)  # the two resizes differ on this image
  with pytest.raises(ValueError, match="'nearest'.*bicubic"):
    crops.resize_center_crop(image, 224, 8 / 7, "nearest")


def test_flip_reverses_columns_where_the_draw_says():
  image = _smooth_uint8(6, 6)

  def crop(flip_u, p):  # the whole image at its own size: only the flip acts
    u = np.zeros(crops.HOST_DRAWS, np.float32)
    u[crops.FLIP_COLUMN] = flip_u
    return crops.random_resized_crop_np(image, u, 6, (1.0, 1.0), (1.0, 1.0), p)

  np.testing.assert_array_equal(crop(0.3, 0.5), image[:, ::-1])
  np.testing.assert_array_equal(crop(0.7, 0.5), image)
  np.testing.assert_array_equal(crop(0.0, 0.0), image)
