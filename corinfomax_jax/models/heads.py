"""Heads on a backbone's features: the CorInfoMax projector and the linear classifier.

The linear classifier is one function pair used by every mode that trains one: the
online probe (pretraining), the offline linear probe (--mode=linear_eval) and the
fine-tuning head (--mode=finetune).
"""
from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from corinfomax_jax.models import layers

PROJECTOR_FORM = re.compile(r"[0-9]+(-[0-9]+)*")  # "2048-2048-64"
HEAD_INITS = ("zeros", "normal", "lecun_normal")


def parse_projector(spec) -> tuple[int, ...]:
  """The projector's layer sizes: hidden sizes, then the output dim D.

  Args:
    spec: a sequence of positive integers, (2048, 2048, 64) or [2048, 2048, 64], or
      the same as a string, "2048-2048-64".

  Returns:
    The sizes as a tuple; anything else raises ValueError saying what is accepted.
  """
  if isinstance(spec, str) and PROJECTOR_FORM.fullmatch(spec):
    spec = tuple(int(s) for s in spec.split("-"))
  if (isinstance(spec, (tuple, list)) and spec
      and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in spec)):
    return tuple(spec)
  raise ValueError(
      f"projector {spec!r} is malformed: expected positive integers, hidden sizes then "
      "the output dim, e.g. (2048, 2048, 64) or '2048-2048-64' (or (64,) for a single "
      "linear layer)")


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
      x = nn.Dense(size, kernel_init=layers.linear_kernel_init,
                   bias_init=layers.linear_bias_init(x.shape[-1]), name=f"linear{i}")(x)
      if self.batch_norm:
        x = layers.batch_norm(train, jnp.float32, name=f"bn{i}")(x)
      x = nn.relu(x)
    return nn.Dense(self.sizes[-1], use_bias=False, kernel_init=layers.linear_kernel_init,
                    name=f"linear{len(self.sizes) - 1}")(x)


def linear_logits(params, features: jax.Array) -> jax.Array:
  """The linear classifier: features @ kernel + bias, in float32.

  Args:
    params: {"kernel": (D, C), "bias": (C,)} float32, as `init_linear_head` makes them.
    features: (N, D) features of any float dtype.

  Returns:
    (N, C) float32 logits.
  """
  return features.astype(jnp.float32) @ params["kernel"] + params["bias"]


def init_linear_head(feature_dim: int, num_classes: int, *, init: str = "zeros",
                     stddev: float = 0.01, rng=None) -> dict[str, jax.Array]:
  """The parameters of `linear_logits` for D = feature_dim, C = num_classes.

  Args:
    feature_dim: D, the size of the features.
    num_classes: C.
    init: "zeros": kernel and bias 0 (solo-learn's online probe; the fine-tuning head,
      whose first loss is then ln C). "normal": kernel N(0, stddev^2), bias 0.
      "lecun_normal": flax.linen.Dense's default (truncated normal of variance 1/D,
      bias 0), drawn by Dense itself so a seed gives the offline probe's earlier values.
    stddev: the kernel's standard deviation for init="normal".
    rng: a PRNG key; needed by "normal" and "lecun_normal".

  Returns:
    {"kernel": (D, C), "bias": (C,)}, float32.
  """
  if init not in HEAD_INITS:
    raise ValueError(f"linear head init {init!r} is not supported; accepted: "
                     f"{list(HEAD_INITS)}")
  if init != "zeros" and rng is None:
    raise ValueError(f"linear head init {init!r} draws random values: pass rng")
  bias = jnp.zeros((num_classes,), jnp.float32)
  if init == "zeros":
    return {"kernel": jnp.zeros((feature_dim, num_classes), jnp.float32), "bias": bias}
  if init == "normal":
    kernel = stddev * jax.random.normal(rng, (feature_dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": bias}
  params = nn.Dense(num_classes).init(rng, jnp.zeros((1, feature_dim)))["params"]
  return {"kernel": params["kernel"], "bias": params["bias"]}
