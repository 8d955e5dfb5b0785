"""Layers and initialisers that match PyTorch's, shared by the backbones and the heads.

Parameters are always float32; `dtype` is the computation dtype ("float32" or
"bfloat16", see `parse_dtype`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def parse_dtype(dtype) -> Dtype:
  """"float32" | "bfloat16" (or the jnp dtype itself) -> the jnp dtype.

  Args:
    dtype: a name in DTYPES, or a jnp dtype, returned as it is.

  Returns:
    The jnp dtype; a name not in DTYPES raises ValueError naming the accepted ones.
  """
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not supported; accepted: {sorted(DTYPES)}")
    return DTYPES[dtype]
  return dtype


def check_num_classes(num_classes) -> None:
  """A head's class count (for parameter counts): raises ValueError unless `num_classes`
  is None or a positive int."""
  if num_classes is not None and (not isinstance(num_classes, int)
                                  or isinstance(num_classes, bool) or num_classes <= 0):
    raise ValueError(f"num_classes {num_classes!r} must be None or a positive integer")


def linear_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """torch.nn.Linear's bias initialiser for a layer with `fan_in` inputs.

  Args:
    fan_in: the layer's number of inputs.

  Returns:
    An initialiser (key, shape, dtype) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)) values.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def batch_norm(train: bool, dtype: Dtype, zero_scale: bool = False,
               name: Optional[str] = None) -> nn.BatchNorm:
  """torch.nn.BatchNorm2d's defaults (momentum 0.1, eps 1e-5) as a Flax BatchNorm.

  Args:
    train: batch statistics (and an update of the running ones) if True, else the
      running statistics.
    dtype: computation dtype; scale, bias and statistics stay float32.
    zero_scale: start the scale at 0 (the last BN of a residual branch).
    name: the submodule's name.

  Returns:
    The BatchNorm module.
  """
  # torch momentum 0.1 == flax momentum 0.9 (weight kept by the running average).
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
      name=name)


def conv(features: int, kernel: int, stride: int, dtype: Dtype,
         name: Optional[str] = None) -> nn.Conv:
  """A square bias-free convolution with torchvision's padding and initialisation.

  Args:
    features: output channels.
    kernel: kernel size (kernel x kernel).
    stride: the stride in both directions.
    dtype: computation dtype; the kernel stays float32.
    name: the submodule's name.

  Returns:
    The Conv module, padded kernel // 2 on every side.
  """
  # Symmetric padding as torchvision; "SAME" would pad (0, 1) at stride 2.
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=conv_init, name=name)
