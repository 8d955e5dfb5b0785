"""The CorInfoMax view ops after the crop, in jax.numpy, for the accelerator.

The host decodes, crops (RandomResizedCrop) and flips, and sends uint8 crops
[N, S, S, 3]; everything else (colour jitter, grayscale, Gaussian blur,
solarisation, normalisation) runs here, inside the jitted train step.

Every op is a pure function of (images, draws): each random choice is an
explicit uniform draw in [0, 1) per example, and an op with probability p
applies to an example when its draw is < p (p=0 never, p=1 always). Each op
works on each example alone (no reduction across the batch axis), so on a
batch sharded over devices it runs with no communication, and the result does
not depend on the sharding. Shapes and the numbers of the config are static:
configs hold Python numbers, and an op whose probability or strength is 0 is
left out of the traced computation.

Draws: one row of `NUM_DRAWS` uniforms per example per view; `DRAWS[name]`
gives the (start, stop) columns of each op:
  jitter     apply, brightness, contrast, saturation, hue, then 4 columns
             whose argsort is the order of the four ops for that example (as
             torchvision's `torch.randperm(4)`: op k runs at step rank(k));
  grayscale  apply;
  blur       apply, sigma (uniform in the (low, high) range);
  solarize   apply.
`random_view` draws them with `jax.random.uniform`; pass your own to `view`
to control them (e.g. the same draws on every device, or from a host seed).

The numbers come from the recipe (`recipe.ViewSettings`, one per view, or a mapping
with the keys `VIEW_KEYS`; others are ignored).

Composing a loop by hand:
  settings = recipe.views(recipe.resolve("cifar10", None))
  x1 = view(crops1, draws1, settings.view1, mean=m, std=s)
  x2 = view(crops2, draws2, settings.view2, mean=m, std=s)
"""
import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from corinfomax_jax.data import recipe

_DRAW_WIDTHS = (
    ("jitter", 9),  # apply, brightness, contrast, saturation, hue, order x4
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

# The keys `view` reads: the device part of a view's settings.
VIEW_KEYS = recipe.DEVICE_KEYS

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision.


def _columns(draws, name):
  start, stop = DRAWS[name]
  return draws[:, start:stop]


def _per_example(values):
  """[N] -> [N, 1, 1, 1], to broadcast against images."""
  return jnp.reshape(values, (-1, 1, 1, 1))


def _apply_where(u, p, new, images):
  """new where the example's draw u [N] is < p, else images."""
  return jnp.where(_per_example(jnp.reshape(u, (-1,)) < p), new, images)


def _check_float_images(images, where):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{where}: images must be [N, H, W, 3]; got shape "
                     f"{tuple(images.shape)}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{where}: images must be floating point in [0, 1]; got "
                     f"dtype {images.dtype}.")


def _check_uint8_images(images, where):
  if images.dtype != jnp.uint8:
    raise ValueError(f"{where}: images must be uint8 crops [N, S, S, 3]; got "
                     f"dtype {images.dtype} (shape {tuple(images.shape)}).")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{where}: images must be uint8 [N, S, S, 3]; got shape "
                     f"{tuple(images.shape)}.")


# ---------------------------------------------------------------- colour


def _gray(images):
  """Luma [N, H, W, 1]."""
  w = jnp.asarray(_GRAY_WEIGHTS, images.dtype)
  return jnp.sum(images * w, axis=-1, keepdims=True)


def _blend(images, other, factor):
  """torchvision's _blend for floats: factor * x + (1 - factor) * other in [0, 1]."""
  return jnp.clip(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def _factor(u, strength):
  """torchvision's factor uniform in [max(0, 1 - x), 1 + x], as [N, 1, 1, 1]."""
  low, high = max(0.0, 1.0 - strength), 1.0 + strength
  return _per_example(low + (high - low) * u)


def _shift_hue(images, shift):
  """Adds `shift` [N] (in turns) to the HSV hue, as torchvision's adjust_hue.

  Branch-free RGB -> (hue, chroma, value) -> RGB, with one division.
  """
  r, g, b = images[..., 0], images[..., 1], images[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  is_r, is_g = value == r, value == g
  num = jnp.where(is_r, g - b, jnp.where(is_g, b - r, r - g))
  sector = jnp.where(is_r, 0.0, jnp.where(is_g, 2.0, 4.0))
  hue6 = num / jnp.where(chroma > 0, chroma, 1.0) + sector  # sixths of a turn
  hue6 = hue6 + 6.0 * jnp.reshape(shift, (-1, 1, 1))
  hue6 = hue6 - 6.0 * jnp.floor(hue6 / 6.0)  # now in [0, 6)

  def channel(n):
    k = n + hue6
    k = jnp.where(k >= 6.0, k - 6.0, k)
    return value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  out = jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)
  return jnp.clip(out, 0.0, 1.0)


def color_jitter(images, u, p: float, brightness: float, contrast: float,
                 saturation: float, hue: float):
  """torchvision ColorJitter where u[:, 0] < p, in a per-example random order.

  images: float [N, H, W, 3] in [0, 1]; u: [N, 9] draws (the "jitter"
  columns): apply, brightness, contrast, saturation, hue, then the order keys.
  An op of strength 0 is skipped (its order key is then unused).
  """
  _check_float_images(images, "color_jitter")
  ops = []  # (op id as in torchvision: 0..3, op)
  if brightness > 0:
    ops.append((0, lambda x: _blend(x, 0.0, _factor(u[:, 1], brightness))))
  if contrast > 0:
    ops.append((1, lambda x: _blend(
        x, jnp.mean(_gray(x), axis=(1, 2, 3), keepdims=True),
        _factor(u[:, 2], contrast))))
  if saturation > 0:
    ops.append((2, lambda x: _blend(x, _gray(x), _factor(u[:, 3],
                                                         saturation))))
  if hue > 0:
    ops.append((3, lambda x: _shift_hue(x, hue * (2.0 * u[:, 4] - 1.0))))
  if not ops:
    return images
  # The enabled ops run in the order of their keys: the full permutation
  # restricted to them, so a skipped op does not cost a step.
  keys = u[:, 5:9][:, [op_id for op_id, _ in ops]]
  order = jnp.argsort(keys, axis=1)  # order[:, k]: which op runs at step k
  out = images
  for k in range(len(ops)):
    candidates = [fn(out) for _, fn in ops]
    step = candidates[0]
    for j in range(1, len(ops)):
      step = jnp.where(_per_example(order[:, k] == j), candidates[j], step)
    out = step
  return _apply_where(u[:, 0], p, out, images)


def grayscale(images, u, p: float):
  """Luma replicated to 3 channels where the draw u [N] is < p."""
  _check_float_images(images, "grayscale")
  return _apply_where(u, p, jnp.broadcast_to(_gray(images), images.shape),
                      images)


# ------------------------------------------------------------------ blur


def _blur_radius(size: int, max_sigma: float) -> int:
  return min(math.ceil(3.0 * max_sigma), size - 1)


def _gaussian_taps(sigma, radius: int):
  """Normalised Gaussian weights [N, 2 * radius + 1] for sigmas [N]."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  s = jnp.maximum(sigma.astype(jnp.float32), 1e-6)[:, None]  # 0 -> identity
  w = jnp.exp(-jnp.square(t)[None, :] / (2.0 * jnp.square(s)))
  return w / jnp.sum(w, axis=1, keepdims=True)


def _blur_shift_add(images, sigma, radius_h: int, radius_w: int):
  """Separable blur: sum of edge-padded shifted copies, H then W."""
  out = images
  for axis, radius in ((1, radius_h), (2, radius_w)):
    if radius == 0:
      continue
    size = out.shape[axis]
    w = _gaussian_taps(sigma, radius).astype(images.dtype)
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(out, pad, mode="edge")
    acc = 0.0
    for t in range(2 * radius + 1):
      acc = acc + (_per_example(w[:, t])
                   * jax.lax.slice_in_dim(padded, t, t + size, axis=axis))
    out = acc
  return out


def _fold_matrix(size: int, radius: int) -> np.ndarray:
  """One-hot [taps, size, size]: tap t of row i reads row clip(i + t - r)."""
  rows = np.arange(size)[None, :] + np.arange(-radius, radius + 1)[:, None]
  return np.eye(size, dtype=np.float32)[np.clip(rows, 0, size - 1)]


def _blur_banded(images, sigma, radius_h: int, radius_w: int):
  """Separable blur as two batched matmuls by banded [N, size, size] matrices.

  The edge-clamped taps are folded onto the border columns of each matrix.
  """
  out = images
  hp = jax.lax.Precision.HIGHEST  # a bf16 pass (TPU/GPU default) errs by ~1/255
  if radius_h > 0:
    m = jnp.einsum("nt,tij->nij", _gaussian_taps(sigma, radius_h),
                   _fold_matrix(out.shape[1], radius_h), precision=hp)
    out = jnp.einsum("nij,njwc->niwc", m.astype(out.dtype), out, precision=hp)
  if radius_w > 0:
    m = jnp.einsum("nt,tij->nij", _gaussian_taps(sigma, radius_w),
                   _fold_matrix(out.shape[2], radius_w), precision=hp)
    out = jnp.einsum("nkl,nilc->nikc", m.astype(out.dtype), out, precision=hp)
  return out


def gaussian_blur(images, sigma, *, max_sigma=None):
  """Gaussian blur with a per-example sigma, as PIL's GaussianBlur(radius=sigma).

  images: float [N, H, W, 3] in [0, 1]; sigma: [N] standard deviations in
  pixels. A true (sampled, normalised) Gaussian of radius ceil(3 * sigma_max)
  taps, clipped to H - 1 / W - 1, with edge (replicate) padding. The radius
  must be static: from `max_sigma` when given, else from the largest sigma,
  which must then be concrete (not traced); sigmas above `max_sigma` are
  truncated to its radius.
  """
  _check_float_images(images, "gaussian_blur")
  n, height, width, _ = images.shape
  if tuple(jnp.shape(sigma)) != (n,):
    raise ValueError(f"gaussian_blur: sigma must have shape ({n},), one per "
                     f"image; got shape {tuple(jnp.shape(sigma))}.")
  if max_sigma is None:
    try:
      max_sigma = float(np.max(np.asarray(sigma))) if n else 0.0
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError) as e:
      raise ValueError(
          "gaussian_blur: sigma is traced (under jit), so the kernel radius "
          "cannot be read from it; pass max_sigma= (a Python number, the "
          "largest sigma it may take).") from e
  radius_h = _blur_radius(height, max_sigma)
  radius_w = _blur_radius(width, max_sigma)
  # Banded matmul, not shift-and-add: measured 2-3x faster on 2 CPU cores at
  # 32/64 px and no slower at 224 px, and matmuls are what GPUs/TPUs do best.
  return _blur_banded(images, jnp.asarray(sigma), radius_h, radius_w)


def blur(images, u, p: float, sigma_range):
  """gaussian_blur where u[:, 0] < p, with sigma = low + (high - low) * u[:, 1].

  u: [N, 2] draws (the "blur" columns).
  """
  low, high = sigma_range
  sigma = low + (high - low) * u[:, 1]
  return _apply_where(u[:, 0], p, gaussian_blur(images, sigma,
                                                max_sigma=high), images)


def solarize(images, u, p: float, threshold: float = 0.5):
  """Values >= threshold become 1 - value, where the draw u [N] is < p."""
  _check_float_images(images, "solarize")
  return _apply_where(u, p, jnp.where(images >= threshold, 1.0 - images,
                                      images), images)


def normalize(images, mean, std):
  """(images - mean) / std, per channel."""
  mean = jnp.asarray(mean, images.dtype)
  std = jnp.asarray(std, images.dtype)
  return (images - mean) / std


# ----------------------------------------------------------------- views


def normalize_uint8(images_uint8, mean, std, dtype=jnp.float32):
  """Evaluation view: uint8 [N, S, S, 3] -> normalised [N, S, S, 3] of dtype."""
  images_uint8 = jnp.asarray(images_uint8)
  _check_uint8_images(images_uint8, "normalize_uint8")
  x = images_uint8.astype(jnp.float32) / 255.0
  return normalize(x, mean, std).astype(dtype)


def view(images_uint8, draws, cfg: Mapping[str, Any], *, mean, std,
         dtype=jnp.float32):
  """One augmented view: jitter, grayscale, blur, solarize, normalise, cast.

  images_uint8: [N, S, S, 3] uint8 crops; draws: [N, NUM_DRAWS] uniforms in
  [0, 1); cfg: Python numbers under `VIEW_KEYS` (other keys are ignored).
  """
  images_uint8, draws = jnp.asarray(images_uint8), jnp.asarray(draws)
  _check_uint8_images(images_uint8, "view")
  n = images_uint8.shape[0]
  if tuple(draws.shape) != (n, NUM_DRAWS):
    raise ValueError(f"view: draws must have shape ({n}, {NUM_DRAWS}) for "
                     f"{n} images; got shape {tuple(draws.shape)}.")
  if dataclasses.is_dataclass(cfg):
    cfg = dataclasses.asdict(cfg)
  missing = [k for k in VIEW_KEYS if k not in cfg]
  if missing:
    raise ValueError(f"view: cfg lacks {missing}; it needs {list(VIEW_KEYS)}.")
  draws = draws.astype(jnp.float32)
  x = images_uint8.astype(jnp.float32) / 255.0
  if cfg["jitter_p"] > 0:
    x = color_jitter(x, _columns(draws, "jitter"), cfg["jitter_p"],
                     cfg["brightness"], cfg["contrast"], cfg["saturation"],
                     cfg["hue"])
  if cfg["grayscale_p"] > 0:
    x = grayscale(x, _columns(draws, "grayscale")[:, 0], cfg["grayscale_p"])
  if cfg["blur_p"] > 0:
    x = blur(x, _columns(draws, "blur"), cfg["blur_p"], cfg["blur_sigma"])
  if cfg["solarize_p"] > 0:
    x = solarize(x, _columns(draws, "solarize")[:, 0], cfg["solarize_p"],
                 cfg["solarize_threshold"])
  return normalize(x, mean, std).astype(dtype)


def random_view(images_uint8, key, cfg: Mapping[str, Any], *, mean, std,
                dtype=jnp.float32):
  """`view` with draws = jax.random.uniform(key, [N, NUM_DRAWS])."""
  _check_uint8_images(images_uint8, "random_view")
  draws = jax.random.uniform(key, (images_uint8.shape[0], NUM_DRAWS))
  return view(images_uint8, draws, cfg, mean=mean, std=std, dtype=dtype)
