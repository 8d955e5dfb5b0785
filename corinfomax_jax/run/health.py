"""Whether a train state is healthy: finite, and neither diverged nor collapsed.

Pretraining checks the updated state at every progress report and before every
checkpoint (`Detector`), so a state that is not healthy is never saved and the latest
checkpoint stays the last healthy one; every mode that reads a checkpoint refuses one
whose parameters are not finite (`nonfinite_weights`, through
checkpoints.restore_latest).

The thresholds (config.divergence) are ones no healthy run comes near:
- the parameters' global norm above `max_norm_ratio` (1e3) times the seeded
  initialisation's: healthy runs stay within a few times it (the tiny test run reads
  1.4x after 4 steps; a cifar10_cpu run 1.5x at steps 200 to 400, flat), while a
  learning rate of 1e6 reads 2.6e6x after its first step;
- CorInfoMax's covariance with every eigenvalue below `floor_factor` (10) times eps in
  both branches: logdet(R + eps I) is then within D ln(11) of its floor D ln(eps) and
  the representation carries no variance (the largest eigenvalue of a cifar10_cpu run
  reads 1.8e-2, of the tiny test run 1e-4; the check fires below 10 eps = 1e-7).
The effective rank is not used: tiny healthy runs read 1.2 to 1.6 out of 8.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


def _parts(state) -> list[tuple[str, Any]]:
  """(name, subtree) of a TrainState, or of the dict a checkpoint reads as."""
  if isinstance(state, dict):
    return list(state.items())
  return [(f.name, getattr(state, f.name)) for f in dataclasses.fields(state)]


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def nonfinite_parts(state, names=None) -> list[str]:
  """The parts of `state` (a TrainState or its dict: "params", "opt_state", ...) that
  hold a NaN or an infinity, in order; only those in `names` when given. [] when finite.
  """
  bad = []
  for name, tree in _parts(state):
    if names is not None and name not in names:
      continue
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if leaves and not bool(_all_finite(leaves)):
      bad.append(name)
  return bad


def nonfinite_weights(state) -> str | None:
  """Why a checkpoint's network is unusable ("NaN or infinite values in params"), or
  None: what every reading mode checks."""
  bad = nonfinite_parts(state, ("params", "batch_stats"))
  return f"NaN or infinite values in {' and '.join(bad)}" if bad else None


@jax.jit
def global_norm(tree) -> jax.Array:
  """sqrt of the sum of squares of every leaf, scaled by the largest magnitude first, so
  that parameters of 1e28 read as such instead of overflowing float32 to inf."""
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
  scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
  safe = jnp.where(scale > 0, scale, 1.0)
  return safe * jnp.sqrt(sum(jnp.sum(jnp.square(x / safe)) for x in leaves))


@jax.jit
def _largest_eigenvalue(cov):
  cov = cov.astype(jnp.promote_types(cov.dtype, jnp.float32))
  return jnp.linalg.eigvalsh(0.5 * (cov + cov.T))[-1]


class Detector:
  """`why(state)`: None for a healthy state, else what is wrong, in a few words.

  Always refuses non-finite values anywhere in the state; with `settings.enabled`, also
  a parameter norm above max_norm_ratio times `initial_params`'s, and (CorInfoMax) a
  covariance collapsed to its floor.
  """

  def __init__(self, settings, method, initial_params):
    self._settings = settings
    self._initial_norm = float(global_norm(initial_params))
    # The floor of logdet(R + eps I) is CorInfoMax's; other methods' covariances are
    # the last batch's, on no fixed scale.
    self._eps = method.eps if getattr(method, "name", "") == "corinfomax" else None
    self._method = method

  @property
  def initial_norm(self) -> float:
    return self._initial_norm

  def why(self, state) -> str | None:
    bad = nonfinite_parts(state)
    if bad:
      return f"NaN or infinite values in {', '.join(bad)}"
    settings = self._settings
    if not settings.enabled:
      return None
    parts = dict(_parts(state))
    norm = float(global_norm(parts["params"]))
    if norm > settings.max_norm_ratio * self._initial_norm:
      return (f"the parameters' global norm is {norm:.3g}, {norm / self._initial_norm:.3g} "
              f"times the initial {self._initial_norm:.3g}, above "
              f"config.divergence.max_norm_ratio = {settings.max_norm_ratio:g}")
    if self._eps:
      covs = self._method.covariances(parts["loss_state"])
      largest = max(float(_largest_eigenvalue(c)) for c in covs)
      floor = settings.floor_factor * self._eps
      if largest < floor:
        dim = covs[0].shape[-1]
        return (f"the covariance has collapsed: its largest eigenvalue is {largest:.3g}, "
                f"below config.divergence.floor_factor x eps = {floor:.3g}, so the "
                f"log-determinant is at its floor D ln(eps) = "
                f"{dim * math.log(self._eps):.1f}")
    return None
