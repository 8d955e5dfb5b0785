"""Flax backbones (torchvision ResNet-18/50, optional CIFAR stem) and the projector.

The architecture and initialisation follow torchvision's `resnet18`/`resnet50` with
`zero_init_residual=True`, as the CorInfoMax reference code builds them; the CIFAR
stem (3x3 stride-1 first conv, no max-pool) is the one the paper uses for 32 px images.
Layer names mirror torchvision's (`conv1`, `bn1`, `layer1_0`, ...) so weights can be
ported by name.

BatchNorm has no `axis_name`: the trainer jits the step over a globally sharded batch,
so a batch mean inside jit already spans every device.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _batch_norm(train: bool, dtype: Dtype, zero_scale: bool = False,
                name: Optional[str] = None) -> nn.BatchNorm:
  # torch momentum 0.1 == flax momentum 0.9 (weight kept by the running average).
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
      name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Dtype,
          name: Optional[str] = None) -> nn.Conv:
  # Symmetric padding as torchvision; "SAME" would pad (0, 1) at stride 2.
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=_conv_init, name=name)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: two 3x3 convs; the last BN scale starts at 0."""
  filters: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv(self.filters, 3, self.strides, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, name="bn1")(y))
    y = _conv(self.filters, 3, 1, self.dtype, "conv2")(y)
    y = _batch_norm(train, self.dtype, zero_scale=True, name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      shortcut = _conv(self.filters, 1, self.strides, self.dtype, "downsample_conv")(x)
      shortcut = _batch_norm(train, self.dtype, name="downsample_bn")(shortcut)
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
    y = _conv(self.filters, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, name="bn1")(y))
    y = _conv(self.filters, 3, self.strides, self.dtype, "conv2")(y)
    y = nn.relu(_batch_norm(train, self.dtype, name="bn2")(y))
    y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
    y = _batch_norm(train, self.dtype, zero_scale=True, name="bn3")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = _conv(out_features, 1, self.strides, self.dtype, "downsample_conv")(x)
      shortcut = _batch_norm(train, self.dtype, name="downsample_bn")(shortcut)
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
      x = _conv(self.num_filters, 3, 1, self.dtype, "conv1")(x)
    else:
      x = _conv(self.num_filters, 7, 2, self.dtype, "conv1")(x)
    x = nn.relu(_batch_norm(train, self.dtype, name="bn1")(x))
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
                    kernel_init=_linear_kernel_init,
                    bias_init=_linear_bias_init(in_features), name="fc")(features)


BACKBONES = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck),
}


def _check_backbone_name(name: str) -> dict:
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; accepted names: {sorted(BACKBONES)}")
  return BACKBONES[name]


def _check_width(width: int) -> None:
  if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
    raise ValueError(f"backbone width {width!r} must be a positive integer (64 is "
                     "torchvision's)")


def create_backbone(name: str, *, cifar_stem: bool = False, width: int = 64,
                    num_classes: Optional[int] = None,
                    dtype: Dtype = jnp.float32) -> ResNet:
  """Returns the ResNet named `name` ("resnet18" or "resnet50")."""
  spec = _check_backbone_name(name)
  _check_width(width)
  return ResNet(num_filters=width, cifar_stem=cifar_stem, num_classes=num_classes,
                dtype=dtype, **spec)


def backbone_feature_dim(name: str, width: int = 64) -> int:
  """Size of the pooled feature: 512 for resnet18, 2048 for resnet50 at width 64."""
  spec = _check_backbone_name(name)
  _check_width(width)
  return width * 2**(len(spec["stage_sizes"]) - 1) * spec["block_cls"].expansion


_PROJECTOR_FORM = re.compile(r"[0-9]+(-[0-9]+)*")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_projector(spec) -> tuple[int, ...]:
  """The projector's layer sizes: hidden sizes, then the output dim D.

  Accepts a sequence of positive integers, (2048, 2048, 64), or the same as a string,
  "2048-2048-64".
  """
  if isinstance(spec, str) and _PROJECTOR_FORM.fullmatch(spec):
    spec = tuple(int(s) for s in spec.split("-"))
  if (isinstance(spec, (tuple, list)) and spec
      and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in spec)):
    return tuple(spec)
  raise ValueError(
      f"projector {spec!r} is malformed: expected positive integers, hidden sizes then "
      "the output dim, e.g. (2048, 2048, 64) or '2048-2048-64' (or (64,) for a single "
      "linear layer)")


def parse_dtype(dtype) -> Dtype:
  """"float32" | "bfloat16" (or the jnp dtype itself) -> the jnp dtype."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not supported; accepted: {sorted(DTYPES)}")
    return DTYPES[dtype]
  return dtype


class Projector(nn.Module):
  """[Linear(+BN)-ReLU] per hidden size, then a Linear without bias.

  Runs in float32 whatever the backbone dtype: it is cheap, and its output feeds a
  covariance whose log-determinant is sensitive to rounding.
  """
  sizes: Sequence[int]
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    for i, size in enumerate(self.sizes[:-1]):
      x = nn.Dense(size, kernel_init=_linear_kernel_init,
                   bias_init=_linear_bias_init(x.shape[-1]), name=f"linear{i}")(x)
      if self.batch_norm:
        x = _batch_norm(train, jnp.float32, name=f"bn{i}")(x)
      x = nn.relu(x)
    return nn.Dense(self.sizes[-1], use_bias=False, kernel_init=_linear_kernel_init,
                    name=f"linear{len(self.sizes) - 1}")(x)


class CorInfoMaxModel(nn.Module):
  """Backbone + projector; `__call__(x, train)` returns (features, z), both float32.

  z is not normalised (the loss does it). The trainer passes each view separately, so
  BatchNorm statistics are per view, as in the reference.
  """
  backbone_name: str = "resnet18"
  projector: tuple[int, ...] = (2048, 2048, 64)
  projector_bn: bool = False
  cifar_stem: bool = False
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    features = ResNet(num_filters=self.width, cifar_stem=self.cifar_stem,
                      dtype=self.dtype, name="backbone",
                      **_check_backbone_name(self.backbone_name))(x, train)
    z = Projector(parse_projector(self.projector), self.projector_bn,
                  name="projector")(features, train)
    return features, z


def create_model(backbone: str = "resnet18", *, projector=(2048, 2048, 64),
                 projector_bn: bool = False, cifar_stem: bool = False, width: int = 64,
                 dtype="float32") -> CorInfoMaxModel:
  """The CorInfoMax model; bad names or sizes raise ValueError here, before any tracing.

  The keyword arguments are the keys of `config.model`: `create_model(**config.model)`.
  `projector`: (hidden sizes..., D) or "2048-2048-64"; `dtype`: "float32" or
  "bfloat16", the compute dtype of the backbone (parameters stay float32).
  """
  _check_backbone_name(backbone)
  _check_width(width)
  return CorInfoMaxModel(backbone_name=backbone, projector=parse_projector(projector),
                         projector_bn=bool(projector_bn), cifar_stem=bool(cifar_stem),
                         width=width, dtype=parse_dtype(dtype))
