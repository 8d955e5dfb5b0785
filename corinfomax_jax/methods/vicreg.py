"""The VICReg loss (Bardes, Ponce and LeCun, ICLR 2022), in pure jax.numpy.

VICReg keeps two views' projector outputs z1, z2 together (invariance: their mean squared
distance), keeps each feature's standard deviation above 1 over the batch (variance: a
hinge), and decorrelates the features (covariance: the squared off-diagonal entries of
each view's covariance). As facebookresearch/vicreg's main_vicreg.py does, the variance
and covariance are taken over the global batch, gathered from all devices.

The reference's symbols, as they enter here:
  sim_weight  the invariance weight (sim_coeff, lambda in the paper);
  var_weight  the variance weight (std_coeff, mu);
  cov_weight  the covariance weight (cov_coeff, nu);
  eps         added to each variance before the square root (epsilon, 1e-4).

No Flax, no TensorFlow, no I/O: this module is importable anywhere jax is.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from corinfomax_jax.methods.batch_stats import checked_views
from corinfomax_jax.methods.batch_stats import off_diagonal_sq_sum
from corinfomax_jax.methods.batch_stats import HIGHEST as _HIGHEST
from corinfomax_jax.methods.batch_stats import StatelessMethod
from corinfomax_jax.methods.batch_stats import global_count as _global_count
from corinfomax_jax.methods.batch_stats import global_sum as _global_sum
from corinfomax_jax.methods.batch_stats import is_number as _is_number


def _centred_scatter(z: jax.Array, axis_name) -> jax.Array:
  """sum_n (z_n - m)(z_n - m)^T over the global batch, m its mean: (D, D) float32.

  The centre enters with its gradient stopped, and that is exact: the centred scatter is
  stationary in its centre (d/dm gives -sum_n (z_n - m) = 0 at the mean). So per-device
  work only reads the all-reduced mean as a constant, which keeps the gradient right
  under pmap and vmap too (see corinfomax._branch_update on why that matters).
  """
  n = _global_count(z.shape[0], axis_name)
  centre = jax.lax.stop_gradient(_global_sum(z, axis_name) / n)
  zc = z - centre
  return _global_sum(jnp.matmul(zc.T, zc, precision=_HIGHEST)[None], axis_name)


def vicreg_loss(z1: jax.Array,
                z2: jax.Array,
                *,
                sim_weight: float = 25.0,
                var_weight: float = 25.0,
                cov_weight: float = 1.0,
                eps: float = 1e-4,
                axis_name=None):
  """The VICReg loss of a batch of view pairs, as facebookresearch/vicreg computes it.

  With z1, z2 of shape (N, D), for each view b, over the global batch:
    zc_b  = z_b - mean_N(z_b)
    var_b = sum_N(zc_b^2) / (N - 1)                     (per dimension)
    C_b   = zc_b^T zc_b / (N - 1)
  and
    sim_loss = mean over N and D of (z1 - z2)^2
    var_loss = (mean_D relu(1 - sqrt(var_1 + eps)) + mean_D relu(1 - sqrt(var_2 + eps))) / 2
    cov_loss = (sum_{i != j} C_1[i, j]^2 + sum_{i != j} C_2[i, j]^2) / D
    loss     = sim_weight * sim_loss + var_weight * var_loss + cov_weight * cov_loss.

  The reference takes sim_loss on each device's shard and lets data-parallel training
  average it; with equal shards that is the global mean taken here.

  N is the global batch. Under `jax.jit` with z sharded over devices, the sums above
  cover all devices (the compiler inserts the reductions). Inside `shard_map`, `pmap` or
  a named `vmap` pass the mapped `axis_name`: per-device partial sums are then combined
  with `psum`, so value and gradient equal the global computation.

  Statistics are computed in float32 whatever the dtype of z (e.g. bfloat16), with
  matmuls at full float32 precision.

  Raises TypeError for complex z; ValueError if z1 or z2 is not 2-D, if their shapes
  differ, for an `axis_name` that no enclosing map binds, for a global batch N < 2 (no
  variance; a local shard of one under `axis_name` is fine), or for a weight or eps
  that is negative or not finite, given as a Python number (traced values are not
  checked). eps = 0 is accepted, but the gradient of sqrt is then infinite for a
  feature that is constant over the batch.

  Args:
    z1, z2: (N, D) projector outputs of the two views (the local shard under
      `axis_name`): arrays or (nested) lists; integer and boolean values become float32.
    sim_weight: weight of the invariance term.
    var_weight: weight of the variance term.
    cov_weight: weight of the covariance term.
    eps: added to each variance before the square root.
    axis_name: the mapped axis (or tuple of axes) over which the batch is split, or
      None when z holds the whole batch (also when it is a sharded global array).

  Returns:
    (loss, metrics) with metrics a dict of float32 scalars: "loss", and the unweighted
    terms "sim_loss", "var_loss", "cov_loss".
  """
  z1, z2, n = checked_views("vicreg_loss", z1, z2, axis_name)
  for name, value in (("sim_weight", sim_weight), ("var_weight", var_weight),
                      ("cov_weight", cov_weight), ("eps", eps)):
    if _is_number(value) and not (np.isfinite(value) and value >= 0):
      raise ValueError(f"vicreg_loss: {name} = {value!r} must be a finite number >= 0")
  dim = z1.shape[1]
  z1 = z1.astype(jnp.float32)
  z2 = z2.astype(jnp.float32)

  sim_loss = jnp.sum(_global_sum((z1 - z2)**2, axis_name)) / (n * dim)

  var_loss = 0.0
  cov_loss = 0.0
  for z in (z1, z2):
    cov = _centred_scatter(z, axis_name) / (n - 1)
    std = jnp.sqrt(jnp.diagonal(cov) + eps)
    var_loss += jnp.mean(jax.nn.relu(1.0 - std)) / 2
    cov_loss += off_diagonal_sq_sum(cov) / dim

  loss = sim_weight * sim_loss + var_weight * var_loss + cov_weight * cov_loss
  # A float64 weight (under jax_enable_x64) must not promote what the caller logs.
  loss = jnp.asarray(loss, jnp.float32)
  metrics = {
      "loss": loss,
      "sim_loss": sim_loss,
      "var_loss": var_loss,
      "cov_loss": cov_loss,
  }
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class VICReg(StatelessMethod):
  """VICReg for the trainer: the fields are the keys of `config.vicreg`.

  The loss carries no state; the trainer's state is the last batch's covariances
  (batch_stats.StatelessMethod), for the spectrum that every method logs.
  """
  sim_weight: float = 25.0
  var_weight: float = 25.0
  cov_weight: float = 1.0
  eps: float = 1e-4
  name: ClassVar[str] = "vicreg"

  def stateless_loss(self, z1, z2):
    return vicreg_loss(z1, z2, sim_weight=self.sim_weight, var_weight=self.var_weight,
                       cov_weight=self.cov_weight, eps=self.eps)
