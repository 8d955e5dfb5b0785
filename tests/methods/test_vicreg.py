"""The VICReg loss against an independent float64 computation of its value and gradient,
and its behaviour under sharding, collectives, bfloat16 and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import loss_testing

from corinfomax_jax.methods.vicreg import vicreg_loss


# ---------------------------------------------------------------------------------
# An independent float64 reference, written from main_vicreg.py's formulas, with its
# gradient derived by hand.
# ---------------------------------------------------------------------------------
def ref_vicreg(z1, z2, sim_weight=25.0, var_weight=25.0, cov_weight=1.0, eps=1e-4):
  """Float64 NumPy: returns (loss, sim_loss, var_loss, cov_loss, (dloss/dz1, dloss/dz2))."""
  z = [np.asarray(x, np.float64) for x in (z1, z2)]
  n, d = z[0].shape
  diff = z[0] - z[1]
  sim_loss = np.mean(diff**2)
  grads = [sim_weight * 2 * diff / (n * d), -sim_weight * 2 * diff / (n * d)]
  var_loss = cov_loss = 0.0
  for b, x in enumerate(z):
    xc = x - x.mean(0)
    cov = xc.T @ xc / (n - 1)
    std = np.sqrt(np.diag(cov) + eps)
    active = (1 - std > 0).astype(np.float64)
    off = cov - np.diag(np.diag(cov))
    var_loss += np.mean(active * (1 - std)) / 2
    cov_loss += np.sum(off**2) / d
    # Through var_j = sum_n xc_nj^2 / (n - 1) and C = xc^T xc / (n - 1); the centring's
    # own derivative vanishes because sum_n xc_n = 0.
    grads[b] += var_weight * -active / (2 * d * std) * xc / (n - 1)
    grads[b] += cov_weight * 4 * xc @ off / (d * (n - 1))
  loss = sim_weight * sim_loss + var_weight * var_loss + cov_weight * cov_loss
  return loss, sim_loss, var_loss, cov_loss, tuple(grads)


views = loss_testing.views
_loss_and_grads = loss_testing.loss_and_grads
_relative_error = loss_testing.relative_error



def test_reference_gradient_matches_its_finite_differences():
  # The hand-derived gradient of the reference, checked once against the reference's
  # own value, so that the comparisons below compare with something right.
  rng = np.random.default_rng(0)
  z1, z2 = (z.astype(np.float64) for z in views(rng, 24, 6))
  g1, g2 = ref_vicreg(z1, z2)[4]
  h = 1e-6
  for _ in range(3):
    v1, v2 = rng.normal(size=(2, 24, 6))
    fd = (ref_vicreg(z1 + h * v1, z2 + h * v2)[0] -
          ref_vicreg(z1 - h * v1, z2 - h * v2)[0]) / (2 * h)
    np.testing.assert_allclose(np.sum(g1 * v1) + np.sum(g2 * v2), fd, rtol=1e-7)


@pytest.mark.parametrize("n,d", [(64, 8), (128, 64), (256, 512), (256, 2048)])
def test_matches_float64_reference(n, d):
  rng = np.random.default_rng(n + d)
  z1, z2 = views(rng, n, d)
  kw = dict(sim_weight=25.0, var_weight=25.0, cov_weight=1.0, eps=1e-4)
  (loss, metrics), grads = jax.jit(
      functools.partial(_loss_and_grads, functools.partial(vicreg_loss, **kw)))(z1, z2)
  ref_loss, ref_sim, ref_var, ref_cov, ref_grads = ref_vicreg(z1, z2, **kw)
  assert ref_var > 0.05 and ref_cov > 0.05  # every term is exercised
  # Measured (float32, XLA:CPU): value and terms <= 2e-7 relative; gradient <= 3e-7 in
  # norm, <= 7e-7 elementwise against the largest entry (D = 8 to 2048).
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["sim_loss"]), ref_sim, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["var_loss"]), ref_var, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cov_loss"]), ref_cov, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    assert _relative_error(got, want) < 1e-4
  assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def test_weights_enter_linearly():
  rng = np.random.default_rng(1)
  z1, z2 = views(rng, 32, 16)
  _, m = vicreg_loss(z1, z2)
  loss, m2 = vicreg_loss(z1, z2, sim_weight=2.0, var_weight=0.5, cov_weight=3.0)
  for key in ("sim_loss", "var_loss", "cov_loss"):
    np.testing.assert_allclose(m2[key], m[key], rtol=1e-6)  # the terms are unweighted
  np.testing.assert_allclose(
      float(loss), 2.0 * m["sim_loss"] + 0.5 * m["var_loss"] + 3.0 * m["cov_loss"], rtol=1e-6)


def test_identical_whitened_views_cost_nothing_and_collapsed_ones_cost_the_hinge():
  # Columns orthonormal after centring, scaled to variance exactly 1 with the N - 1
  # divisor, then shifted: sim, var (sqrt(1 + eps) > 1) and cov terms are all zero. A
  # version dividing by N (var 15/16), not centring, or counting the diagonal in the
  # covariance term would not give zero.
  rng = np.random.default_rng(2)
  n, d = 16, 8
  x = rng.normal(size=(n, d))
  q, _ = np.linalg.qr(x - x.mean(0))
  z = (q * np.sqrt(n - 1) + rng.normal(size=d) * 3).astype(np.float32)
  loss, m = vicreg_loss(z, z)
  assert float(m["sim_loss"]) == 0.0
  assert float(m["var_loss"]) == 0.0
  assert float(m["cov_loss"]) < 1e-10
  assert float(loss) < 1e-9
  # A collapsed representation: every std is sqrt(eps), the hinge is 1 - sqrt(eps).
  z = np.tile(rng.normal(size=(1, d)), (n, 1)).astype(np.float32)
  _, m = vicreg_loss(z, z, eps=1e-4)
  np.testing.assert_allclose(float(m["var_loss"]), 1 - 1e-2, rtol=1e-6)
  assert float(m["cov_loss"]) < 1e-12


# ---------------------------------------------------------------------------------
# Bad hyperparameters (sharding, dtypes and bad views: test_stateless_losses.py).
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(sim_weight=-1.0), dict(var_weight=-0.5),
                                dict(cov_weight=-1), dict(eps=-1e-4),
                                dict(eps=float("nan")), dict(cov_weight=float("inf"))])
def test_negative_or_non_finite_weights_and_eps_are_refused(kw):
  name = next(iter(kw))
  with pytest.raises(ValueError, match=f"{name} = "):
    vicreg_loss(jnp.ones((4, 8)), jnp.ones((4, 8)), **kw)


def test_traced_hyperparameters_are_not_checked():
  z1, z2 = views(np.random.default_rng(7), 8, 4)
  loss = jax.jit(lambda w: vicreg_loss(z1, z2, sim_weight=w, eps=w)[0])(0.5)
  assert np.isfinite(float(loss))
