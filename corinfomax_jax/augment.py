"""The two-view augmentation of CorInfoMax (Ozsoy et al., 2022), as small TF ops.

Every random choice is an explicit uniform draw in [0, 1) passed to the op, so
an op is a pure function of (images, draws) and the caller decides where the
randomness comes from (`view_draws`: stateless, from seed, step, row and view).
An op with probability p applies to an example when its draw is < p, so p=0
never applies and p=1 always does.

Two stages:
  * on one decoded uint8 image of any size: `random_resized_crop`
    (torchvision's RandomResizedCrop, bicubic, antialiased like PIL) or
    `resize_center_crop`;
  * on float32 [B, S, S, 3] in [0, 1]: `flip`, `color_jitter`, `grayscale`,
    `gaussian_blur`, `solarize`, `normalize`, in that order (`augment_batch`
    chains them for one view). The input pipeline calls them with B = 1 under
    XLA, where an op is computed only when its draw applies it.

Colour jitter follows torchvision's float semantics (brightness, contrast and
saturation are blends with a factor uniform in [1-x, 1+x], clamped to [0, 1];
hue shifts the HSV hue by a uniform amount in [-h, h]) in the fixed order
brightness, contrast, saturation, hue; torchvision permutes the order per call.
"""
import dataclasses
import math
from typing import Any, Mapping

import tensorflow as tf

# Uniform draws per example per view, by use; `DRAWS` gives each a column range.
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then centres.
_DRAW_WIDTHS = (
    ("crop", 4 * CROP_ATTEMPTS),  # scale, log-ratio, top, left per attempt
    ("flip", 1),
    ("jitter", 5),  # apply, brightness, contrast, saturation, hue
    ("grayscale", 1),
    ("blur", 2),  # apply, sigma
    ("solarize", 1),
)
DRAWS = {}
_start = 0
for _name, _width in _DRAW_WIDTHS:
  DRAWS[_name] = (_start, _start + _width)
  _start += _width
NUM_DRAWS = _start
del _start, _name, _width

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision.



@dataclasses.dataclass(frozen=True)
class ViewSettings:
  """The numbers one view uses (hashable: compiled functions are cached by it)."""
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip_p: float
  jitter_p: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  grayscale_p: float
  blur_p: float
  blur_sigma: tuple[float, float]
  blur_kernel_frac: float
  solarize_p: float
  solarize_threshold: float


# Keys every view reads; `view1` / `view2` sub-dicts may override any of them.
_VIEW_KEYS = tuple(f.name for f in dataclasses.fields(ViewSettings))


def paper_config(mean, std) -> dict[str, Any]:
  """The paper's two-view recipe (CorInfoMax reference code), every number a key.

  Shared keys apply to both views; `view1` and `view2` hold what differs and may
  override any shared key. `probe` is the linear-probe training view (crop and
  flip only; it too may override any shared key) and `test_resize_ratio` the
  resize-then-centre-crop ratio of the test view.
  """
  return dict(
      mean=tuple(mean),
      std=tuple(std),
      crop_scale=(0.08, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      flip_p=0.5,
      jitter_p=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_p=0.2,
      blur_p=0.0,  # set per view below
      blur_sigma=(0.1, 2.0),
      blur_kernel_frac=0.1,  # kernel ~10% of the image side, odd (BYOL)
      solarize_p=0.0,  # set per view below
      solarize_threshold=0.5,
      view1=dict(blur_p=1.0, solarize_p=0.0),
      view2=dict(blur_p=0.1, solarize_p=0.2),
      probe=dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 flip_p=0.5),
      test_resize_ratio=8 / 7,
  )


def _as_dict(config) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def view_config(config: Mapping[str, Any], view: str) -> ViewSettings:
  """The numbers one view uses: shared keys updated by `config[view]`."""
  config = _as_dict(config)
  if view not in config:
    raise ValueError(f"Augmentation config has no {view!r} entry; it has "
                     f"{sorted(config)}.")
  overrides = _as_dict(config[view])
  unknown = sorted(set(overrides) - set(_VIEW_KEYS))
  if unknown:
    raise ValueError(f"Augmentation config {view!r} has unknown keys {unknown};"
                     f" a view may set {list(_VIEW_KEYS)}.")
  merged = {k: config[k] for k in _VIEW_KEYS}
  merged.update(overrides)
  return ViewSettings(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in merged.items()})


def with_overrides(config: Mapping[str, Any],
                   overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  """`config` with the keys of `overrides` replaced (view1/view2/probe merged).

  Raises ValueError for a key `config` does not have.
  """
  out = _as_dict(config)
  for key, value in _as_dict(overrides or {}).items():
    if key not in out:
      raise ValueError(f"Unknown augmentation key {key!r}; the keys are "
                       f"{sorted(out)}.")
    if key in ("view1", "view2", "probe"):
      out[key] = {**_as_dict(out[key]), **_as_dict(value)}
    else:
      out[key] = value
  return out


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first out-of-range number of `config`."""
  config = _as_dict(config)
  for key in ("mean", "std"):
    if len(config[key]) != 3:
      raise ValueError(f"aug config {key}={config[key]!r}: need 3 numbers.")
  if min(config["std"]) <= 0:
    raise ValueError(f"aug config std={config['std']!r}: must be > 0.")
  if config["test_resize_ratio"] < 1:
    raise ValueError(f"aug config test_resize_ratio="
                     f"{config['test_resize_ratio']}: must be >= 1.")
  views = {name: view_config(config, name)
           for name in ("view1", "view2", "probe")}
  for name, view in views.items():
    for key, value in dataclasses.asdict(view).items():
      where = f"aug config {name}.{key}={value!r}"
      if key.endswith("_p") and not 0 <= value <= 1:
        raise ValueError(f"{where}: a probability must lie in [0, 1].")
      if key in ("crop_scale", "crop_ratio", "blur_sigma"):
        if len(value) != 2 or not 0 < value[0] <= value[1]:
          raise ValueError(f"{where}: need (low, high) with 0 < low <= high.")
      if key in ("brightness", "contrast", "saturation") and not 0 <= value:
        raise ValueError(f"{where}: must be >= 0.")
    if not 0 <= view.hue <= 0.5:
      raise ValueError(f"aug config {name}.hue={view.hue}: need [0, 0.5].")
    if view.crop_scale[1] > 1:
      raise ValueError(f"aug config {name}.crop_scale={view.crop_scale}: "
                       "the area fraction cannot exceed 1.")


def view_draws(seed: tf.Tensor, rows: tf.Tensor,
               global_batch_size: int) -> tf.Tensor:
  """Uniform draws [len(rows), NUM_DRAWS] for the given rows of a global batch.

  `seed` is a stateless seed (shape [2]) already specific to (step, view); the
  draws of a row do not depend on which process asks for it.
  """
  u = tf.random.stateless_uniform([global_batch_size, NUM_DRAWS], seed=seed)
  return tf.gather(u, rows)


def _columns(u, name):
  start, stop = DRAWS[name]
  return u[..., start:stop]


# ---------------------------------------------------------------- per example


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


def _resize_bicubic(image, size_hw):
  # antialias=True filters when shrinking, as PIL's bicubic resize does.
  out = tf.image.resize(image, size_hw, method="bicubic", antialias=True)
  return tf.clip_by_value(out / 255.0, 0.0, 1.0)


def random_resized_crop(image, u, size: int, scale, ratio):
  """uint8 [h, w, 3] -> float32 [size, size, 3] in [0, 1]; u: [4*CROP_ATTEMPTS]."""
  shape = tf.shape(image)
  top, left, h, w = crop_window(shape[0], shape[1], u, scale, ratio)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
  out = _resize_bicubic(crop, [size, size])
  return tf.ensure_shape(out, [size, size, 3])


def resize_center_crop(image, size: int, resize_ratio: float):
  """Shorter side to int(size * resize_ratio) (bicubic), then centre crop.

  uint8 [h, w, 3] -> float32 [size, size, 3] in [0, 1] (torchvision Resize(int)
  followed by CenterCrop).
  """
  target = int(size * resize_ratio)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  # torchvision: the long side becomes int(target * long / short).
  new_h = tf.where(h <= w, target, (target * h) // short)
  new_w = tf.where(h <= w, (target * w) // short, target)
  resized = _resize_bicubic(image, tf.stack([new_h, new_w]))
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  out = tf.slice(resized, tf.stack([top, left, 0]), [size, size, 3])
  return tf.ensure_shape(out, [size, size, 3])


# ------------------------------------------------------------------ per batch
# images: float32 [B, H, W, 3] in [0, 1]; u: that op's draws, [B] or [B, k].


def _per_example(mask):
  return tf.reshape(mask, [-1, 1, 1, 1])


def _where(apply, fn, images):
  """fn(images) for the examples where `apply` [B] holds, else images."""
  if images.shape[0] == 1:  # one example (the pipeline): compute only if used
    return tf.cond(apply[0], lambda: fn(images), lambda: images)
  return tf.where(_per_example(apply), fn(images), images)


def flip(images, u, p: float):
  """Horizontal flip of the examples whose draw u [B] is < p."""
  return _where(u < p, lambda x: tf.reverse(x, axis=[2]), images)


def _gray(images):
  return tf.reduce_sum(images * tf.constant(_GRAY_WEIGHTS), -1, keepdims=True)


def _factor(u, strength):
  return tf.reshape(1.0 - strength + 2.0 * strength * u, [-1, 1, 1, 1])


def _blend(images, other, factor):
  return tf.clip_by_value(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def _shift_hue(images, shift):
  """Adds `shift` [B] (in turns) to the HSV hue, as torchvision's adjust_hue.

  Branch-free RGB -> (hue, chroma, value) -> RGB, with one division.
  """
  r, g, b = tf.unstack(images, axis=-1)
  value = tf.maximum(tf.maximum(r, g), b)
  chroma = value - tf.minimum(tf.minimum(r, g), b)
  is_r, is_g = value == r, value == g
  num = tf.where(is_r, g - b, tf.where(is_g, b - r, r - g))
  sector = tf.where(is_r, 0.0, tf.where(is_g, 2.0, 4.0))
  hue6 = num / tf.where(chroma > 0, chroma, 1.0) + sector  # sixths of a turn
  hue6 += 6.0 * tf.reshape(shift, [-1, 1, 1])
  hue6 -= 6.0 * tf.floor(hue6 / 6.0)  # now in [0, 6)

  def channel(n):
    k = n + hue6
    k = tf.where(k >= 6.0, k - 6.0, k)
    return value - chroma * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)
  return tf.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def color_jitter(images, u, p: float, brightness: float, contrast: float,
                 saturation: float, hue: float):
  """torchvision ColorJitter, applied to the examples whose u[:, 0] < p.

  u: [B, 5] draws: apply, brightness, contrast, saturation, hue.
  """
  def jitter(out):
    if brightness > 0:
      out = _blend(out, 0.0, _factor(u[:, 1], brightness))
    if contrast > 0:
      mean = tf.reduce_mean(_gray(out), axis=[1, 2, 3], keepdims=True)
      out = _blend(out, mean, _factor(u[:, 2], contrast))
    if saturation > 0:
      out = _blend(out, _gray(out), _factor(u[:, 3], saturation))
    if hue > 0:
      out = tf.clip_by_value(_shift_hue(out, hue * (2.0 * u[:, 4] - 1.0)),
                             0.0, 1.0)
    return out
  return _where(u[:, 0] < p, jitter, images)


def grayscale(images, u, p: float):
  """Luma replicated to 3 channels for the examples whose draw u [B] is < p."""
  return _where(u < p, lambda x: tf.broadcast_to(_gray(x), tf.shape(x)),
                images)


def blur_kernel_size(image_size: int, frac: float) -> int:
  """Odd kernel size of about frac * image_size (23 taps at 224 px, 3 at 32)."""
  k = int(frac * image_size)
  return k + 1 if k % 2 == 0 else k


def gaussian_blur(images, u, p: float, sigma, kernel_size: int):
  """Separable Gaussian blur (reflect padding) where u[:, 0] < p.

  u: [B, 2] draws: apply, sigma (uniform in the (low, high) `sigma` range).
  """
  radius = kernel_size // 2
  if radius == 0:
    return images
  height, width = images.shape[1], images.shape[2]
  if radius >= min(height, width):
    raise ValueError(f"Blur kernel of {kernel_size} taps is too wide for "
                     f"{height}x{width} images.")
  s = sigma[0] + (sigma[1] - sigma[0]) * u[:, 1]
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  weights = tf.exp(-tf.square(taps)[None, :] / (2.0 * tf.square(s)[:, None]))
  weights /= tf.reduce_sum(weights, axis=1, keepdims=True)  # [B, k]

  def blur(x):
    # Shift-and-add is as fast as XLA's convolution or a banded matmul here.
    padded = tf.pad(x, [[0, 0], [radius, radius], [0, 0], [0, 0]],
                    mode="REFLECT")
    out = 0.0
    for t in range(kernel_size):
      out += tf.reshape(weights[:, t], [-1, 1, 1, 1]) * padded[:, t:t + height]
    padded = tf.pad(out, [[0, 0], [0, 0], [radius, radius], [0, 0]],
                    mode="REFLECT")
    out = 0.0
    for t in range(kernel_size):
      out += (tf.reshape(weights[:, t], [-1, 1, 1, 1])
              * padded[:, :, t:t + width])
    return out
  return _where(u[:, 0] < p, blur, images)


def solarize(images, u, p: float, threshold: float):
  """Values >= threshold become 1 - value, for examples whose draw u [B] < p."""
  return _where(u < p, lambda x: tf.where(x >= threshold, 1.0 - x, x), images)


def normalize(images, mean, std):
  return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def augment_batch(images, u, view: ViewSettings):
  """Flip, jitter, grayscale, blur, solarize of one view (unnormalised).

  images: float32 [B, S, S, 3] crops in [0, 1]; u: [B, NUM_DRAWS]; view: the
  numbers from `view_config`.
  """
  size = images.shape[1]
  x = flip(images, _columns(u, "flip")[:, 0], view.flip_p)
  x = color_jitter(x, _columns(u, "jitter"), view.jitter_p, view.brightness,
                   view.contrast, view.saturation, view.hue)
  x = grayscale(x, _columns(u, "grayscale")[:, 0], view.grayscale_p)
  if view.blur_p > 0:
    x = gaussian_blur(x, _columns(u, "blur"), view.blur_p, view.blur_sigma,
                      blur_kernel_size(size, view.blur_kernel_frac))
  if view.solarize_p > 0:
    x = solarize(x, _columns(u, "solarize")[:, 0], view.solarize_p,
                 view.solarize_threshold)
  return x


def crop_draws(u):
  """The crop columns of draws u [..., NUM_DRAWS]."""
  return _columns(u, "crop")


def flip_draws(u):
  """The flip column of draws u [B, NUM_DRAWS], as [B]."""
  return _columns(u, "flip")[:, 0]
