"""Vision Transformers as big_vision builds them (big_vision/models/vit.py), the ViT table.

The sizes are big_vision's `decode_variant` ("Ti", "S", "B"); the module and parameter
names are its non-scanned layout ("embedding", "pos_embedding", "cls",
"Transformer/encoderblock_<i>/...", "Transformer/encoder_norm"), so its published
checkpoints load by name (`load_big_vision_npz`). The features are the final LayerNorm's
tokens, average-pooled ("gap") or the class token ("tok"); no pre-logits layer.

The position embeddings cover the patch grid of the images the module is initialised
with, so the image size is the configuration's (config.image_size) and the patch size is
an option: ViT-Ti/4 at 32 px is `create_vit("vit_ti16", patch_size=4)` on 32 px images.
There is no BatchNorm and no dropout: `train` changes nothing.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from corinfomax_jax.models import layers
from corinfomax_jax.models.layers import Dtype

# big_vision's decode_variant: width, depth, MLP size, heads; the patch is the name's.
VITS = {
    "vit_ti16": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "vit_s16": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "vit_b16": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
}
DEFAULT_PATCH_SIZE = 16
POSEMBS = ("learn", "sincos2d")
POOLS = ("gap", "tok")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0
                     ) -> np.ndarray:
  """The fixed 2-D sine-cosine position embeddings of an h x w grid (MoCo v3's, as
  big_vision's posemb_sincos_2d): (1, h * w, width) float32, row-major patches."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, not "
                     f"{width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / temperature**omega
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) - GELU - Dense(width): the transformer block's MLP."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                               kernel_init=nn.initializers.xavier_uniform(),
                               bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(dense(self.mlp_dim)(x))  # Dense_0
    return dense(x.shape[-1])(y)  # Dense_1


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm self-attention and MLP, each with its residual."""
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x + MlpBlock(self.mlp_dim, self.dtype)(y)


class Encoder(nn.Module):
  """`depth` blocks named encoderblock_<i>, then the final LayerNorm "encoder_norm"."""
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dtype,
                         name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="encoder_norm")(x)


class ViT(nn.Module):
  """A ViT returning pooled float32 features (or logits with a head).

  Attributes:
    width, depth, mlp_dim, num_heads: the variant's sizes (VITS).
    patch_size: the side of the square patches; the image side must be a multiple.
    posemb: "learn" (a parameter, N(0, 1/width)) or "sincos2d" (fixed, no parameter).
    pool: "gap" (mean of the tokens) or "tok" (a class token, parameter "cls").
    num_classes: if set, a zero-initialised Dense "head" on the features (for
      parameter counts against big_vision's and timm's; pretraining leaves it None).
    dtype: computation dtype; parameters stay float32.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = DEFAULT_PATCH_SIZE
  posemb: str = "learn"
  pool: str = "gap"
  num_classes: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # no BatchNorm, no dropout
    n, height, width_px, _ = x.shape
    p = self.patch_size
    if height % p or width_px % p:
      raise ValueError(f"ViT patch size {p} does not divide the {height}x{width_px} "
                       "images: set config.image_size to a multiple of "
                       "config.model.patch_size")
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="embedding")(x)
    _, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)),
                      (1, h * w, c), jnp.float32)
    else:
      pe = jnp.asarray(posemb_sincos_2d(h, w, c))
    x = x + jnp.asarray(pe, self.dtype)
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(jnp.asarray(cls, self.dtype), (n, 1, 1)), x], axis=1)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype,
                name="Transformer")(x)
    features = (x[:, 0] if self.pool == "tok" else jnp.mean(x, axis=1)).astype(jnp.float32)
    if self.num_classes is None:
      return features
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name="head")(features)


def check_patch_size(patch_size) -> None:
  """Raises ValueError unless `patch_size` is a positive int."""
  if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
    raise ValueError(f"patch_size {patch_size!r} must be a positive integer (16 is "
                     "ViT-S/16's; 4 suits 32 px images)")


def check_posemb(posemb) -> None:
  if posemb not in POSEMBS:
    raise ValueError(f"posemb {posemb!r} is not supported; accepted: {list(POSEMBS)}")


def check_pool(pool) -> None:
  if pool not in POOLS:
    raise ValueError(f"pool {pool!r} is not supported; accepted: {list(POOLS)} (gap: "
                     "mean of the tokens, tok: the class token)")


# The keyword arguments of `create_vit`, each with its check (ValueError if bad).
OPTIONS = {
    "patch_size": check_patch_size,
    "posemb": check_posemb,
    "pool": check_pool,
    "dtype": layers.parse_dtype,
    "num_classes": layers.check_num_classes,  # a head, for parameter counts only
}


def check_image_size(image_size: int, patch_size: int = DEFAULT_PATCH_SIZE, **_) -> None:
  """Raises ValueError unless `patch_size` divides `image_size` (whole patches only)."""
  if image_size % patch_size:
    raise ValueError(f"image size {image_size} is not a multiple of the ViT's patch size "
                     f"{patch_size}")


def create_vit(name: str, *, patch_size: int = DEFAULT_PATCH_SIZE, posemb: str = "learn",
               pool: str = "gap", dtype="float32", num_classes: Optional[int] = None
               ) -> ViT:
  """The ViT of VITS[name]; the values are checked by `models.create_backbone`.

  Args:
    name: a key of VITS ("vit_ti16", "vit_s16", "vit_b16").
    patch_size: the patch side (the name's 16 by default).
    posemb: "learn" or "sincos2d".
    pool: "gap" or "tok".
    dtype: computation dtype, "float32" | "bfloat16" or a jnp dtype.
    num_classes: None (pooled features out) or the size of a head.

  Returns:
    The unbound ViT module.
  """
  return ViT(patch_size=patch_size, posemb=posemb, pool=pool, num_classes=num_classes,
             dtype=layers.parse_dtype(dtype), **VITS[name])
