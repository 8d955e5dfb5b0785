"""The host's share of a view: crop, resize and flip one decoded image, as the reference does.

The input pipeline calls these per example on the host (tf.data); everything after the
crop runs on the accelerator (`augment`). Every random choice is an explicit uniform
draw in [0, 1), so an op is a pure function of (image, draws):
  * `random_resized_crop`: torchvision's RandomResizedCrop (10 attempts, then the
    centred fallback), then its RandomHorizontalFlip: the window is cut out and resized
    by PIL's own bicubic (or, as torchvision's default, bilinear) resize, as the
    reference does on its PIL images: bit-exact
    with the reference for JPEGs and 8-bit PNGs, whose decoded pixels
    (`sources.decode_image`) are PIL's own;
  * `resize_center_crop`: torchvision's Resize(int) + CenterCrop, for evaluation;
`HOST_DRAWS` columns per example per view: crop (4 per attempt), then flip.

The per-image work is numpy and PIL inside one `tf.numpy_function` per image (all its
views' crops, `random_resized_crops`): at 224 px it is 2-3x faster than TensorFlow's
antialiased resize plus a graph of scalar ops, and PIL releases the GIL while it
resizes, so tf.data's threads run it in parallel.
"""
import math

import numpy as np
from PIL import Image
import tensorflow as tf

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then centres.
CROP_COLUMNS = (0, 4 * CROP_ATTEMPTS)  # scale, log-ratio, top, left per attempt
FLIP_COLUMN = 4 * CROP_ATTEMPTS
HOST_DRAWS = FLIP_COLUMN + 1
# The random crop's resize: the reference's pretraining views are bicubic; its
# semi-supervised views use torchvision's default, bilinear.
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def crop_window(height: int, width: int, u, scale, ratio) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (top, left, h, w).

  Args:
    height, width: the image size.
    u: [4 * CROP_ATTEMPTS] uniform draws (scale, log-ratio, top, left per attempt).
    scale: (low, high) range of the crop area as a fraction of the image area.
    ratio: (low, high) range of the crop aspect ratio w / h (log-uniform).
  """
  n = CROP_ATTEMPTS
  u = np.asarray(u, np.float64)
  target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0:n])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(log_lo + (log_hi - log_lo) * u[n:2 * n])
  cw = np.round(np.sqrt(target_area * aspect))
  ch = np.round(np.sqrt(target_area / aspect))
  fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
  if fits.any():
    k = int(np.argmax(fits))  # the first attempt that fits
    h, w = int(ch[k]), int(cw[k])
    top = min(int(u[2 * n + k] * (height - h + 1)), height - h)
    left = min(int(u[3 * n + k] * (width - w + 1)), width - w)
    return top, left, h, w
  # No attempt fits: the largest centred box with the ratio clamped to range.
  in_ratio = width / height
  w = round(height * ratio[1]) if in_ratio > ratio[1] else width
  h = round(width / ratio[0]) if in_ratio < ratio[0] else height
  return (height - h) // 2, (width - w) // 2, h, w


def _check_interpolation(interpolation: str, what: str) -> None:
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"{what} interpolation {interpolation!r} is not supported; accepted: "
                     f"{list(INTERPOLATIONS)}")


def _pil_resize(image: np.ndarray, height: int, width: int,
                interpolation: str = "bicubic") -> np.ndarray:
  # PIL's resize is the reference's (torchvision resizes PIL images with it):
  # antialiased bicubic (or bilinear) in fixed point, rounded to uint8.
  return np.asarray(Image.fromarray(image).resize((width, height),
                                                  INTERPOLATIONS[interpolation]))


def random_resized_crop_np(image: np.ndarray, u: np.ndarray, size: int, scale, ratio,
                           flip_p: float = 0.0,
                           interpolation: str = "bicubic") -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [size, size, 3]; u: the HOST_DRAWS columns of the draws;
  interpolation: a key of INTERPOLATIONS."""
  top, left, h, w = crop_window(image.shape[0], image.shape[1],
                                u[CROP_COLUMNS[0]:CROP_COLUMNS[1]], scale, ratio)
  out = _pil_resize(image[top:top + h, left:left + w], size, size, interpolation)
  if u[FLIP_COLUMN] < flip_p:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def resize_center_crop_np(image: np.ndarray, size: int, resize_ratio: float,
                          interpolation: str = "bicubic") -> np.ndarray:
  """Shorter side to int(size * resize_ratio) (PIL's bicubic, or `interpolation`, a key
  of INTERPOLATIONS), then the centre size x size."""
  target = int(size * resize_ratio)
  h, w = image.shape[:2]
  # torchvision: the long side becomes int(target * long / short).
  new_h, new_w = (target, target * w // h) if h <= w else (target * h // w, target)
  resized = _pil_resize(image, new_h, new_w, interpolation)
  top = int(round((new_h - size) / 2))
  left = int(round((new_w - size) / 2))
  return np.ascontiguousarray(resized[top:top + size, left:left + size])


def random_resized_crop(image, u, size: int, scale, ratio, flip_p: float = 0.0,
                        interpolation: str = "bicubic"):
  """tf uint8 [h, w, 3] -> uint8 [size, size, 3]: random_resized_crop_np in tf.data."""
  _check_interpolation(interpolation, "crop")
  out = tf.numpy_function(
      lambda im, uu: random_resized_crop_np(im, uu, size, scale, ratio, flip_p,
                                            interpolation),
      [image, u], tf.uint8, stateful=False)
  return tf.ensure_shape(out, [size, size, 3])


def random_resized_crops(image, draws, specs):
  """tf uint8 [h, w, 3] -> one crop per spec, all in one host call.

  Each spec is (size, scale, ratio, flip_p, interpolation) and each crop is
  random_resized_crop_np of the image with its own row of `draws`: the same pixels as
  calling random_resized_crop once per view, with one trip from tf.data into Python per
  image instead of one per view.
  """
  for spec in specs:
    _check_interpolation(spec[4], "crop")

  def crop_all(im, *us):
    return tuple(random_resized_crop_np(im, u, *spec) for u, spec in zip(us, specs))

  outs = tf.numpy_function(crop_all, [image, *draws], [tf.uint8] * len(specs),
                           stateful=False)
  return [tf.ensure_shape(out, [spec[0], spec[0], 3]) for out, spec in zip(outs, specs)]


def resize_center_crop(image, size: int, resize_ratio: float,
                       interpolation: str = "bicubic"):
  """tf uint8 [h, w, 3] -> uint8 [size, size, 3] (torchvision Resize(int) + CenterCrop)."""
  _check_interpolation(interpolation, "resize")
  out = tf.numpy_function(lambda im: resize_center_crop_np(im, size, resize_ratio,
                                                           interpolation),
                          [image], tf.uint8, stateful=False)
  return tf.ensure_shape(out, [size, size, 3])

