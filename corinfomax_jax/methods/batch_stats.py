"""Batch statistics over the global batch, shared by the methods' losses.

Each loss sees its local rows; under `jax.jit` with a sharded batch they are the whole
batch (the compiler inserts the reductions), and inside shard_map, pmap or a named vmap
`axis_name` names the mapped axis over which `global_sum` adds the devices' partial sums.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The statistics are the numerically delicate part: keep every matmul at full float32
# precision, even on TPUs and on GPUs whose default float32 matmul is bf16 or tf32.
HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _psum_of_replicated_loss(x, axis_name):
  """psum whose backward pass hands each device the cotangent unchanged.

  Under pmap, vmap or shard_map(check_vma=False) every device holds the same copy of
  the loss, and plain psum's transpose would add up those copies' cotangents, making
  each device's gradient axis_size times too large. The gradient of one global loss
  with respect to a device's shard is the cotangent of the sum itself.
  """
  return jax.lax.psum(x, axis_name)


def _psum_fwd(x, axis_name):
  return jax.lax.psum(x, axis_name), None


def _psum_bwd(axis_name, _, g):
  del axis_name
  return (g,)


_psum_of_replicated_loss.defvjp(_psum_fwd, _psum_bwd)


def _varying_axes(x) -> frozenset:
  """The mesh axes over which shard_map's type system knows x to vary, if it tracks it."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)  # older jax
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(vma or ())


def global_sum(x: jax.Array, axis_name) -> jax.Array:
  """Sum over the batch axis 0; over all devices of `axis_name` when it is given."""
  s = jnp.sum(x, axis=0)
  if axis_name is None:
    return s
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if set(names) <= _varying_axes(x):
    # shard_map tracks replication: psum's own transpose is already the right gradient.
    return jax.lax.psum(s, axis_name)
  return _psum_of_replicated_loss(s, axis_name)


def global_count(n: int, axis_name) -> int | jax.Array:
  return n if axis_name is None else n * jax.lax.axis_size(axis_name)


def is_number(value) -> bool:
  """A Python or NumPy number (checked eagerly), not a traced array."""
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def check_axis_name(fn: str, axis_name) -> None:
  """ValueError naming `axis_name` unless it is None or an axis bound where fn is called."""
  if axis_name is None:
    return
  try:
    jax.lax.axis_size(axis_name)
  except NameError:  # jax's way of saying no enclosing map binds this name
    raise ValueError(
        f"{fn}: axis_name={axis_name!r} is not bound here: it is only for use inside "
        "shard_map / pmap / a named vmap over that axis (pass None under jax.jit, where a "
        "sharded batch is summed over by the compiler)") from None


def checked_views(fn: str, z1, z2, axis_name):
  """(z1, z2, N): the two views as arrays and the global batch size N of their (N, D)
  rows, after checking what a user can get wrong.

  Args:
    fn: the loss's name, to start each message with.
    z1, z2: the projector outputs: arrays, NumPy arrays or (nested) lists of numbers.
    axis_name: the loss's `axis_name`, None or an axis bound by an enclosing map.

  Returns:
    (z1, z2, n) with z1, z2 jax arrays (dtype unchanged: the loss casts them) and n an
    int, or a traced value under a map whose size is not static.

  Raises TypeError for complex values, ValueError for shapes that are not one (N, D)
  for both, an unbound axis_name or a global batch N < 2.
  """
  z1, z2 = jnp.asarray(z1), jnp.asarray(z2)
  for name, z in (("z1", z1), ("z2", z2)):
    if jnp.issubdtype(z.dtype, jnp.complexfloating):
      raise TypeError(f"{fn}: {name} has dtype {z.dtype}; complex values are not "
                      "accepted: expected real (floating, integer or boolean) values")
    if z.ndim != 2:
      raise ValueError(f"{fn}: {name} must be 2-D (N, D), got shape {z.shape}")
  if z1.shape != z2.shape:
    raise ValueError(
        f"{fn}: z1 and z2 must have the same shape, got {z1.shape} and {z2.shape}")
  check_axis_name(fn, axis_name)
  n = global_count(z1.shape[0], axis_name)
  if isinstance(n, int) and n < 2:
    raise ValueError(f"{fn}: z1 and z2 hold a global batch of N={n} rows; the batch "
                     "statistics need N >= 2")
  return z1, z2, n


def off_diagonal_sq_sum(c: jax.Array) -> jax.Array:
  """sum of the squared off-diagonal entries of a square matrix."""
  # Masked, not sum(c^2) - sum(diag^2): that difference would cancel when the diagonal
  # dominates, which is exactly where a decorrelated representation sits.
  off = jnp.where(jnp.eye(c.shape[0], dtype=bool), 0.0, c)
  return jnp.sum(off * off)


class BatchCovariances(NamedTuple):
  """The last batch's covariance of each view's projector output (D, D) float32.

  The trainer's state for a method whose loss carries none: it lets the covariance
  spectrum be logged the same way for every method. It takes no part in the loss.
  """
  cov1: jax.Array
  cov2: jax.Array


def zero_covariances(dim: int) -> BatchCovariances:
  zeros = jnp.zeros((dim, dim), jnp.float32)
  return BatchCovariances(zeros, zeros)


def batch_covariances(z1: jax.Array, z2: jax.Array) -> BatchCovariances:
  """Each view's covariance over the (global) batch, centred and divided by N, with its
  gradient stopped (z the whole batch, or a batch sharded under jax.jit)."""
  def cov(z):
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    zc = z - jnp.mean(z, axis=0)
    return jnp.matmul(zc.T, zc, precision=HIGHEST) / z.shape[0]
  return BatchCovariances(cov(z1), cov(z2))


def check_hyperparameter(method: str, name: str, value, *, low: float = 0.0,
                         high: float | None = None, high_open: bool = False) -> None:
  """ValueError naming `name` unless value is a finite number in [low, high] (or
  [low, high) with high_open)."""
  ok = is_number(value) and np.isfinite(value) and value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    bound = "" if high is None else f" and {'<' if high_open else '<='} {high}"
    raise ValueError(f"{method}: {name} = {value!r} is invalid: expected a number >= "
                     f"{low}{bound}")


class StatelessMethod:
  """What a method whose loss carries no state shares (VICReg, Barlow Twins).

  A subclass is a frozen dataclass of non-negative hyperparameters (its config section)
  with a `name` and `stateless_loss(z1, z2) -> (loss, metrics)`. Its trainer state is the
  last batch's covariances, so the spectrum is logged as for CorInfoMax.
  """
  name = ""

  def __post_init__(self):
    for field in dataclasses.fields(self):
      check_hyperparameter(self.name, field.name, getattr(self, field.name))

  def stateless_loss(self, z1, z2):
    raise NotImplementedError

  def init_state(self, dim: int) -> BatchCovariances:
    return zero_covariances(dim)

  def loss(self, z1, z2, state: BatchCovariances):
    del state  # the loss has no state: the new one is this batch's covariances
    loss, metrics = self.stateless_loss(z1, z2)
    return loss, batch_covariances(z1, z2), metrics

  def covariances(self, state: BatchCovariances):
    return state.cov1, state.cov2
