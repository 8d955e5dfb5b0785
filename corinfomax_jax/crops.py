"""The host's share of a view, in TensorFlow: crop, resize and flip one decoded image.

The input pipeline calls these per example on the host (tf.data); everything after the
crop runs on the accelerator (`augment`). Every random choice is an explicit uniform
draw in [0, 1), so an op is a pure function of (image, draws):
  * `random_resized_crop`: torchvision's RandomResizedCrop (10 attempts, then the
    centred fallback), bicubic and antialiased like PIL, rounded to uint8;
  * `resize_center_crop`: torchvision's Resize(int) + CenterCrop, for evaluation;
  * `flip`: horizontal, where the draw is < p.
`HOST_DRAWS` columns per example per view: crop (4 per attempt), then flip.
"""
import math

import tensorflow as tf

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then centres.
CROP_COLUMNS = (0, 4 * CROP_ATTEMPTS)  # scale, log-ratio, top, left per attempt
FLIP_COLUMN = 4 * CROP_ATTEMPTS
HOST_DRAWS = FLIP_COLUMN + 1


def crop_window(height, width, u, scale, ratio):
  """torchvision RandomResizedCrop.get_params: (top, left, h, w) as int32.

  Args:
    height, width: the image size (int32 scalars).
    u: [4 * CROP_ATTEMPTS] uniform draws.
    scale: (low, high) range of the crop area as a fraction of the image area.
    ratio: (low, high) range of the crop aspect ratio w / h (log-uniform).
  """
  n = CROP_ATTEMPTS
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  target_area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0:n])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[n:2 * n])
  cw = tf.round(tf.sqrt(target_area * aspect))
  ch = tf.round(tf.sqrt(target_area / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # first fitting attempt
  ch_k, cw_k = ch[first], cw[first]
  top_k = tf.minimum(tf.floor(u[2 * n + first] * (h - ch_k + 1)), h - ch_k)
  left_k = tf.minimum(tf.floor(u[3 * n + first] * (w - cw_k + 1)), w - cw_k)
  # No attempt fits: the largest centred box with the ratio clamped to range.
  in_ratio = w / h
  fall_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fall_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  fall_top = tf.floor((h - fall_h) / 2)
  fall_left = tf.floor((w - fall_w) / 2)
  any_fit = tf.reduce_any(fits)
  box = tf.where(any_fit, tf.stack([top_k, left_k, ch_k, cw_k]),
                 tf.stack([fall_top, fall_left, fall_h, fall_w]))
  return tf.unstack(tf.cast(box, tf.int32))


def _resize_bicubic_uint8(image, size_hw):
  # antialias=True filters when shrinking, as PIL's bicubic resize does; PIL then
  # rounds to uint8, and so do we.
  out = tf.image.resize(image, size_hw, method="bicubic", antialias=True)
  return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def random_resized_crop(image, u, size: int, scale, ratio):
  """uint8 [h, w, 3] -> uint8 [size, size, 3]; u: the crop columns of the draws."""
  shape = tf.shape(image)
  top, left, h, w = crop_window(shape[0], shape[1], u, scale, ratio)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
  return tf.ensure_shape(_resize_bicubic_uint8(crop, [size, size]), [size, size, 3])


def resize_center_crop(image, size: int, resize_ratio: float):
  """Shorter side to int(size * resize_ratio) (bicubic), then the centre size x size.

  uint8 [h, w, 3] -> uint8 [size, size, 3] (torchvision Resize(int) + CenterCrop).
  """
  target = int(size * resize_ratio)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  # torchvision: the long side becomes int(target * long / short).
  new_h = tf.where(h <= w, target, (target * h) // short)
  new_w = tf.where(h <= w, (target * w) // short, target)
  resized = _resize_bicubic_uint8(image, tf.stack([new_h, new_w]))
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  out = tf.slice(resized, tf.stack([top, left, 0]), [size, size, 3])
  return tf.ensure_shape(out, [size, size, 3])


def flip(image, u, p: float):
  """Horizontal flip of one image [h, w, 3] when its draw u (a scalar) is < p."""
  if p <= 0:
    return image
  return tf.cond(u < p, lambda: tf.reverse(image, axis=[1]), lambda: image)
