"""The Barlow Twins loss (Zbontar et al., ICML 2021), in pure jax.numpy.

Barlow Twins standardises each view's projector outputs over the batch and drives the
cross-correlation matrix of the two views towards the identity: ones on the diagonal
make the views agree feature by feature, zeros off it decorrelate the features. As
facebookresearch/barlowtwins does (BatchNorm1d(affine=False) in train mode, made
SyncBatchNorm, and an all-reduced cross-correlation), every statistic is taken over the
global batch.

The reference's symbols, as they enter here:
  lambd  weight of the off-diagonal (redundancy reduction) term, 0.0051 (lambda);
  scale  an overall factor (scale-loss in the reference's first release, 1 since).

No Flax, no TensorFlow, no I/O: this module is importable anywhere jax is.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from corinfomax_jax.methods.batch_stats import checked_views as _checked_views
from corinfomax_jax.methods.batch_stats import off_diagonal_sq_sum as _off_diagonal_sq_sum
from corinfomax_jax.methods.batch_stats import HIGHEST as _HIGHEST
from corinfomax_jax.methods.batch_stats import StatelessMethod
from corinfomax_jax.methods.batch_stats import global_count as _global_count
from corinfomax_jax.methods.batch_stats import global_sum as _global_sum
from corinfomax_jax.methods.batch_stats import is_number as _is_number

# torch.nn.BatchNorm1d's default eps, added to the variance inside the square root.
_BN_EPS = 1e-5


def _cross_correlation(z1: jax.Array, z2: jax.Array, axis_name) -> jax.Array:
  """bn(z1)^T bn(z2) / N over the global batch, bn the train-mode batch standardisation.

  Written from global sums only: the cross scatter sum_n (z1_n - m1)(z2_n - m2)^T and
  each view's sum of squared deviations, scaled afterwards by 1 / sqrt(var + eps). Per
  device, nothing that carries a gradient is read after an all-reduce; standardising
  each shard with the all-reduced statistics first would hand each device only its own
  part of the gradient through them under pmap and vmap (see objective._branch_update).
  The means enter with their gradient stopped, which is exact: both sums are stationary
  in the centres (each is linear in sum_n (z_n - m) = 0 at the mean).
  """
  n = _global_count(z1.shape[0], axis_name)
  zc1, zc2 = (z - jax.lax.stop_gradient(_global_sum(z, axis_name) / n) for z in (z1, z2))
  cross = _global_sum(jnp.matmul(zc1.T, zc2, precision=_HIGHEST)[None], axis_name)
  inv_std1, inv_std2 = (jax.lax.rsqrt(_global_sum(zc * zc, axis_name) / n + _BN_EPS)
                        for zc in (zc1, zc2))
  return inv_std1[:, None] * cross * inv_std2[None, :] / n


def barlow_twins_loss(z1: jax.Array,
                      z2: jax.Array,
                      *,
                      lambd: float = 0.0051,
                      scale: float = 1.0,
                      axis_name=None):
  """The Barlow Twins loss of a batch of view pairs, as facebookresearch/barlowtwins has it.

  With z1, z2 of shape (N, D), over the global batch:
    bn(z) = (z - mean_N(z)) / sqrt(var_N(z) + 1e-5)    (biased variance, per dimension)
    c     = bn(z1)^T bn(z2) / N                          (D, D)
  and
    on_diag  = sum_i (c[i, i] - 1)^2
    off_diag = sum_{i != j} c[i, j]^2
    loss     = scale * (on_diag + lambd * off_diag).

  N is the global batch. Under `jax.jit` with z sharded over devices, the sums above
  cover all devices (the compiler inserts the reductions). Inside `shard_map`, `pmap` or
  a named `vmap` pass the mapped `axis_name`: per-device partial sums are then combined
  with `psum`, so value and gradient equal the global computation.

  Statistics are computed in float32 whatever the dtype of z (e.g. bfloat16), with
  matmuls at full float32 precision.

  Raises TypeError for complex z; ValueError if z1 or z2 is not 2-D, if their shapes
  differ, for an `axis_name` that no enclosing map binds, for a global batch N < 2
  (nothing to standardise over, as torch's BatchNorm refuses; a local shard of one under
  `axis_name` is fine), or for lambd or scale negative or not finite, given as a Python
  number (traced values are not checked).

  Args:
    z1, z2: (N, D) projector outputs of the two views (the local shard under
      `axis_name`): arrays or (nested) lists; integer and boolean values become float32.
    lambd: weight of the off-diagonal term.
    scale: overall factor of the loss.
    axis_name: the mapped axis (or tuple of axes) over which the batch is split, or
      None when z holds the whole batch (also when it is a sharded global array).

  Returns:
    (loss, metrics) with metrics a dict of float32 scalars: "loss", and the unweighted
    sums "on_diag", "off_diag".
  """
  z1, z2, _ = _checked_views("barlow_twins_loss", z1, z2, axis_name)
  for name, value in (("lambd", lambd), ("scale", scale)):
    if _is_number(value) and not (np.isfinite(value) and value >= 0):
      raise ValueError(f"barlow_twins_loss: {name} = {value!r} must be a finite number >= 0")
  c = _cross_correlation(z1.astype(jnp.float32), z2.astype(jnp.float32), axis_name)
  on_diag = jnp.sum((jnp.diagonal(c) - 1.0)**2)
  off_diag = _off_diagonal_sq_sum(c)
  # A float64 weight (under jax_enable_x64) must not promote what the caller logs.
  loss = jnp.asarray(scale * (on_diag + lambd * off_diag), jnp.float32)
  return loss, {"loss": loss, "on_diag": on_diag, "off_diag": off_diag}


@dataclasses.dataclass(frozen=True)
class BarlowTwins(StatelessMethod):
  """Barlow Twins for the trainer: the fields are the keys of `config.barlow_twins`.

  The loss carries no state; the trainer's state is the last batch's covariances
  (batch_stats.StatelessMethod), for the spectrum that every method logs.
  """
  lambd: float = 0.0051
  scale: float = 1.0
  name: ClassVar[str] = "barlow_twins"

  def stateless_loss(self, z1, z2):
    return barlow_twins_loss(z1, z2, lambd=self.lambd, scale=self.scale)
