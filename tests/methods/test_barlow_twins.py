"""The Barlow Twins loss against an independent float64 computation of its value and
gradient, and its behaviour under sharding, collectives, bfloat16 and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import loss_testing

from corinfomax_jax.methods.barlow_twins import barlow_twins_loss


# ---------------------------------------------------------------------------------
# An independent float64 reference, written from facebookresearch/barlowtwins' forward
# (BatchNorm1d(affine=False) in train mode, then c = bn(z1)^T bn(z2) / N), with its
# gradient derived by hand.
# ---------------------------------------------------------------------------------
def ref_barlow_twins(z1, z2, lambd=0.0051, scale=1.0, bn_eps=1e-5):
  """Float64 NumPy: returns (loss, on_diag, off_diag, (dloss/dz1, dloss/dz2))."""
  z = [np.asarray(x, np.float64) for x in (z1, z2)]
  n = z[0].shape[0]
  normed, inv_std = [], []
  for x in z:
    xc = x - x.mean(0)
    inv_std.append(1 / np.sqrt(np.mean(xc**2, 0) + bn_eps))  # biased variance
    normed.append(xc * inv_std[-1])
  c = normed[0].T @ normed[1] / n
  off = c - np.diag(np.diag(c))
  on_diag = np.sum((np.diag(c) - 1)**2)
  off_diag = np.sum(off**2)
  loss = scale * (on_diag + lambd * off_diag)
  # dloss/dc, then through c to each standardised view, then batch norm's backward pass:
  # dz = inv_std * (g - mean_N(g) - zn * mean_N(g * zn)) for g = dloss/dzn.
  dc = scale * (2 * np.diag(np.diag(c) - 1) + 2 * lambd * off)
  dnormed = (normed[1] @ dc.T / n, normed[0] @ dc / n)
  grads = tuple(s * (g - g.mean(0) - zn * np.mean(g * zn, 0))
                for g, zn, s in zip(dnormed, normed, inv_std))
  return loss, on_diag, off_diag, grads


views = functools.partial(loss_testing.views, noise=0.5)  # noisier views than VICReg's
_loss_and_grads = loss_testing.loss_and_grads
_relative_error = loss_testing.relative_error



def test_reference_gradient_matches_its_finite_differences():
  # The hand-derived gradient of the reference, checked once against the reference's
  # own value, so that the comparisons below compare with something right.
  rng = np.random.default_rng(0)
  z1, z2 = (z.astype(np.float64) for z in views(rng, 24, 6))
  kw = dict(lambd=0.3, scale=2.0)  # a large lambd, so the off-diagonal part counts
  g1, g2 = ref_barlow_twins(z1, z2, **kw)[3]
  h = 1e-6
  for _ in range(3):
    v1, v2 = rng.normal(size=(2, 24, 6))
    fd = (ref_barlow_twins(z1 + h * v1, z2 + h * v2, **kw)[0] -
          ref_barlow_twins(z1 - h * v1, z2 - h * v2, **kw)[0]) / (2 * h)
    np.testing.assert_allclose(np.sum(g1 * v1) + np.sum(g2 * v2), fd, rtol=1e-7)


@pytest.mark.parametrize("n,d", [(64, 8), (128, 64), (256, 512), (256, 2048)])
def test_matches_float64_reference(n, d):
  rng = np.random.default_rng(n + d)
  z1, z2 = views(rng, n, d)
  kw = dict(lambd=0.0051, scale=1.0)
  (loss, metrics), grads = jax.jit(
      functools.partial(_loss_and_grads, functools.partial(barlow_twins_loss, **kw)))(z1, z2)
  ref_loss, ref_on, ref_off, ref_grads = ref_barlow_twins(z1, z2, **kw)
  # Measured (float32, XLA:CPU): value and sums <= 3e-7 relative; gradient <= 8e-7 in
  # norm, <= 2e-6 elementwise against the largest entry (D = 8 to 2048).
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["on_diag"]), ref_on, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["off_diag"]), ref_off, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    assert _relative_error(got, want) < 1e-4
  assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def test_scale_and_lambd_enter_linearly():
  rng = np.random.default_rng(1)
  z1, z2 = views(rng, 32, 16)
  _, m = barlow_twins_loss(z1, z2)
  loss, m2 = barlow_twins_loss(z1, z2, lambd=0.2, scale=3.0)
  for key in ("on_diag", "off_diag"):
    np.testing.assert_allclose(m2[key], m[key], rtol=1e-6)  # the sums are unweighted
  np.testing.assert_allclose(float(loss), 3.0 * (m["on_diag"] + 0.2 * m["off_diag"]),
                             rtol=1e-6)


def test_identical_decorrelated_views_cost_nothing_and_flipped_ones_cost_four_a_dimension():
  # Columns orthonormal after centring, scaled to biased variance 1, then shifted: with
  # z2 = z1, c = I / (1 + 1e-5). A version that skipped centring or standardisation, or
  # divided by N - 1, would be far from it.
  rng = np.random.default_rng(2)
  n, d = 32, 16
  x = rng.normal(size=(n, d))
  q, _ = np.linalg.qr(x - x.mean(0))
  z = (q * np.sqrt(n) + rng.normal(size=d) * 3).astype(np.float32)
  _, m = barlow_twins_loss(z, z)
  np.testing.assert_allclose(float(m["on_diag"]), d * (1e-5 / (1 + 1e-5))**2, rtol=0.05)
  assert float(m["off_diag"]) < 1e-10
  # A dimension's sign flipped in one view correlates -1: (-1 - 1)^2 = 4 each.
  flip = np.where(np.arange(d) < 5, -1.0, 1.0).astype(np.float32)
  _, m = barlow_twins_loss(z, z * flip)
  np.testing.assert_allclose(float(m["on_diag"]), 4 * 5, rtol=1e-4)
  # Standardisation makes it blind to a positive scale and a shift of each feature.
  z1, z2 = views(rng, n, d)
  a, b = rng.uniform(0.5, 4.0, size=(2, d)), rng.normal(size=(2, d))
  loss, _ = barlow_twins_loss(z1, z2)
  affine, _ = barlow_twins_loss((a[0] * z1 + b[0]).astype(np.float32),
                                (a[1] * z2 + b[1]).astype(np.float32))
  np.testing.assert_allclose(float(affine), float(loss), rtol=1e-4)


# ---------------------------------------------------------------------------------
# Bad hyperparameters (sharding, dtypes and bad views: test_stateless_losses.py).
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(lambd=-0.0051), dict(scale=-1), dict(lambd=float("nan")),
                                dict(scale=float("inf"))])
def test_negative_or_non_finite_lambd_and_scale_are_refused(kw):
  name = next(iter(kw))
  with pytest.raises(ValueError, match=f"{name} = "):
    barlow_twins_loss(jnp.ones((4, 8)), jnp.ones((4, 8)), **kw)


def test_traced_hyperparameters_are_not_checked():
  z1, z2 = views(np.random.default_rng(7), 8, 4)
  loss = jax.jit(lambda w: barlow_twins_loss(z1, z2, lambd=w, scale=w)[0])(0.5)
  assert np.isfinite(float(loss))
