"""torchvision's ResNet-18/50 in Flax, with an optional CIFAR stem; the ResNet table.

The architecture and initialisation follow torchvision's `resnet18`/`resnet50` with
`zero_init_residual=True`, as the CorInfoMax reference code builds them; the CIFAR
stem (3x3 stride-1 first conv, no max-pool) is the one the paper uses for 32 px images.
Layer names mirror torchvision's (`conv1`, `bn1`, `layer1_0`, ...) so weights can be
ported by name (`interop.torchvision`, which reads RESNETS for the layout).

BatchNorm has no `axis_name`: the trainer jits the step over a globally sharded batch,
so a batch mean inside jit already spans every device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from corinfomax_jax.models import layers
from corinfomax_jax.models.layers import Dtype


class BasicBlock(nn.Module):
  """torchvision BasicBlock: two 3x3 convs; the last BN scale starts at 0."""
  filters: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = layers.conv(self.filters, 3, self.strides, self.dtype, "conv1")(x)
    y = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(y))
    y = layers.conv(self.filters, 3, 1, self.dtype, "conv2")(y)
    y = layers.batch_norm(train, self.dtype, zero_scale=True, name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      shortcut = layers.conv(self.filters, 1, self.strides, self.dtype,
                             "downsample_conv")(x)
      shortcut = layers.batch_norm(train, self.dtype, name="downsample_bn")(shortcut)
    return nn.relu(shortcut + y)


class Bottleneck(nn.Module):
  """torchvision v1.5 Bottleneck: 1x1, 3x3 (carries the stride), 1x1 x4 channels."""
  filters: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_features = self.filters * self.expansion
    y = layers.conv(self.filters, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(y))
    y = layers.conv(self.filters, 3, self.strides, self.dtype, "conv2")(y)
    y = nn.relu(layers.batch_norm(train, self.dtype, name="bn2")(y))
    y = layers.conv(out_features, 1, 1, self.dtype, "conv3")(y)
    y = layers.batch_norm(train, self.dtype, zero_scale=True, name="bn3")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = layers.conv(out_features, 1, self.strides, self.dtype,
                             "downsample_conv")(x)
      shortcut = layers.batch_norm(train, self.dtype, name="downsample_bn")(shortcut)
    return nn.relu(shortcut + y)


class ResNet(nn.Module):
  """ResNet returning global-average-pooled float32 features (or logits with a head).

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: BasicBlock or Bottleneck.
    num_filters: width of the first stage (64 in torchvision); stage i has
      num_filters * 2**i channels before the block expansion.
    cifar_stem: 3x3 stride-1 first conv and no max-pool, for 32 px images.
    num_classes: if set, a Dense head on the pooled features (used to compare
      parameter counts with torchvision; self-supervised training leaves it None).
    dtype: computation dtype; parameters stay float32.
  """
  stage_sizes: Sequence[int]
  block_cls: type
  num_filters: int = 64
  cifar_stem: bool = False
  num_classes: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = jnp.asarray(x, self.dtype)
    if self.cifar_stem:
      x = layers.conv(self.num_filters, 3, 1, self.dtype, "conv1")(x)
    else:
      x = layers.conv(self.num_filters, 7, 2, self.dtype, "conv1")(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(x))
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2**i, strides, self.dtype,
                           name=f"layer{i + 1}_{j}")(x, train)
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    if self.num_classes is None:
      return features
    in_features = features.shape[-1]
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=layers.linear_kernel_init,
                    bias_init=layers.linear_bias_init(in_features), name="fc")(features)


# The ResNet table: torchvision's (blocks per stage, block class) of each depth.
RESNETS = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck),
}


def check_width(width) -> None:
  """Raises ValueError unless `width` (the first stage's channels) is a positive int."""
  if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
    raise ValueError(f"backbone width {width!r} must be a positive integer (64 is "
                     "torchvision's)")


def check_cifar_stem(cifar_stem) -> None:
  """Raises ValueError unless `cifar_stem` is True or False."""
  if not isinstance(cifar_stem, bool):
    raise ValueError(f"cifar_stem {cifar_stem!r} must be True or False")


# The keyword arguments of `create_resnet`, each with its check (ValueError if bad).
OPTIONS = {
    "width": check_width,
    "cifar_stem": check_cifar_stem,
    "dtype": layers.parse_dtype,
    # A torchvision-style fc head, for parameter counts; not for the CorInfoMax model.
    "num_classes": layers.check_num_classes,
}


def create_resnet(name: str, *, width: int = 64, cifar_stem: bool = False,
                  dtype="float32", num_classes: Optional[int] = None) -> ResNet:
  """The ResNet of RESNETS[name]; the values are checked by `models.create_backbone`.

  Args:
    name: a key of RESNETS ("resnet18", "resnet50").
    width: channels of the first stage (64 is torchvision's).
    cifar_stem: 3x3 stride-1 first conv and no max-pool, for 32 px images.
    dtype: computation dtype, "float32" | "bfloat16" or a jnp dtype.
    num_classes: None (pooled features out) or the size of an fc head.

  Returns:
    The unbound ResNet module.
  """
  return ResNet(num_filters=width, cifar_stem=cifar_stem, num_classes=num_classes,
                dtype=layers.parse_dtype(dtype), **RESNETS[name])
