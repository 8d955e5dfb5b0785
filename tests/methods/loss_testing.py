"""Helpers the loss tests share: correlated test views and value-and-gradient."""
import jax
import numpy as np


def views(rng, n, d, noise=0.3, dtype=np.float32):
  """Two correlated views with a mean, feature scales both sides of 1 and correlations."""
  scales = np.linspace(0.2, 2.0, d)
  mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
  base = (rng.normal(size=(n, d)) * scales) @ mix + 0.5
  z1 = base + noise * rng.normal(size=(n, d))
  z2 = base + noise * rng.normal(size=(n, d))
  return z1.astype(dtype), z2.astype(dtype)


def loss_and_grads(loss_fn, z1, z2):
  """((loss, metrics), (dloss/dz1, dloss/dz2)) of a loss returning (loss, metrics)."""
  return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(z1, z2)


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)
