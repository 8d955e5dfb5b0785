"""The CorInfoMax objective against an independent float64 computation, and its
behaviour under sharding, collectives, degenerate inputs and in real training loops."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import corinfomax_jax as cim
from corinfomax_jax.methods import corinfomax as objective


# ---------------------------------------------------------------------------------
# An independent float64 reference, written from the paper's equations.
# ---------------------------------------------------------------------------------
def ref_step(z1, z2, state, alpha, la_R, la_mu, eps, normalize):
  """One step in float64 NumPy: returns (loss, cov_loss, sim_loss, new_state)."""
  z = [np.asarray(z1, np.float64), np.asarray(z2, np.float64)]
  if normalize:
    z = [x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in z]
  n, d = z[0].shape
  mus, covs, logdets = [], [], []
  for x, mu, cov in zip(z, (state[0], state[1]), (state[2], state[3])):
    mu_new = la_mu * np.asarray(mu, np.float64) + (1 - la_mu) * x.mean(0)
    xc = x - mu_new
    cov_new = la_R * np.asarray(cov, np.float64) + (1 - la_R) * (xc.T @ xc) / n
    sign, logdet = np.linalg.slogdet(cov_new + eps * np.eye(d))
    assert sign > 0
    mus.append(mu_new)
    covs.append(cov_new)
    logdets.append(logdet)
  cov_loss = -(logdets[0] + logdets[1]) / d
  sim_loss = np.mean((z[0] - z[1])**2)
  return alpha * sim_loss + cov_loss, cov_loss, sim_loss, (mus[0], mus[1], covs[0],
                                                          covs[1])


def ref_init(d, r_init=1.0):
  return (np.zeros(d), np.zeros(d), r_init * np.eye(d), r_init * np.eye(d))


def views(rng, n, d, noise=0.3, dtype=np.float32):
  """Two correlated views with a non-trivial mean and anisotropic spectrum."""
  scales = np.linspace(0.2, 2.0, d)
  base = rng.normal(size=(n, d)) * scales + 0.5
  z1 = base + noise * rng.normal(size=(n, d))
  z2 = base + noise * rng.normal(size=(n, d))
  return z1.astype(dtype), z2.astype(dtype)


def assert_state_close(state, ref_state, rtol):
  for got, want in zip(state, ref_state):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


SETTINGS = [
    # alpha, la_R, la_mu, eps, normalize, N, D
    (250.0, 0.01, 0.01, 1e-8, True, 128, 64),
    (1000.0, 0.01, 0.01, 1e-8, True, 256, 128),
    (500.0, 0.1, 0.1, 1e-8, True, 64, 32),
    (2000.0, 0.1, 0.1, 1e-8, True, 1024, 512),
    (1.0, 0.5, 0.9, 1e-4, False, 96, 48),
    (250.0, 0.01, 0.01, 1e-8, True, 48, 96),  # N < D
    (10.0, 0.0, 0.0, 1e-6, False, 200, 16),  # no memory: plain batch statistics
]


@pytest.mark.parametrize("alpha,la_R,la_mu,eps,normalize,n,d", SETTINGS)
def test_matches_float64_reference_over_steps(alpha, la_R, la_mu, eps, normalize, n, d):
  rng = np.random.default_rng(d * 7 + n)
  loss_fn = jax.jit(
      functools.partial(cim.corinfomax_loss, alpha=alpha, la_R=la_R, la_mu=la_mu, eps=eps,
                        normalize=normalize))
  state, ref_state = cim.init_state(d, r_init=1.0), ref_init(d)
  for _ in range(4):
    z1, z2 = views(rng, n, d)
    loss, state, metrics = loss_fn(z1, z2, state)
    ref_loss, ref_cov, ref_sim, ref_state = ref_step(z1, z2, ref_state, alpha, la_R,
                                                     la_mu, eps, normalize)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["cov_loss"]), ref_cov, rtol=1e-4,
                               atol=1e-4 * abs(ref_loss))
    np.testing.assert_allclose(float(metrics["sim_loss"]), ref_sim, rtol=1e-4)
    assert_state_close(state, ref_state, rtol=1e-4)
    assert all(x.dtype == jnp.float32 for x in state)


def test_r_init_enters_the_first_step():
  rng = np.random.default_rng(1)
  z1, z2 = views(rng, 32, 8)
  for r_init in (0.5, 3.0):
    loss, _, _ = cim.corinfomax_loss(z1, z2, cim.init_state(8, r_init=r_init), la_R=0.3)
    ref_loss = ref_step(z1, z2, ref_init(8, r_init), 250.0, 0.3, 0.01, 1e-8, True)[0]
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


def test_state_contract():
  state = cim.init_state(5, r_init=2.0)
  assert state._fields == ("mu1", "mu2", "cov1", "cov2")
  np.testing.assert_array_equal(state.cov1, 2.0 * np.eye(5))
  np.testing.assert_array_equal(state.mu2, np.zeros(5))
  with pytest.raises(ValueError, match="r_init"):
    cim.init_state(5, r_init=0.0)
  with pytest.raises(ValueError, match="dimension 5"):
    cim.corinfomax_loss(jnp.ones((4, 6)), jnp.ones((4, 6)), state)


# ---------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize,n,d,la", [(True, 64, 16, 0.01), (False, 40, 24, 0.3),
                                              (True, 512, 512, 0.1)])
def test_gradient_matches_finite_differences_of_float64_reference(normalize, n, d, la):
  rng = np.random.default_rng(n + d)
  # A carried, non-trivial state: the gradient must not depend on it through anything
  # but the forgetting factors.
  state, ref_state = cim.init_state(d), ref_init(d)
  for _ in range(2):
    z1, z2 = views(rng, n, d)
    _, state, _ = cim.corinfomax_loss(z1, z2, state, la_R=la, la_mu=la, normalize=normalize)
    ref_state = ref_step(z1, z2, ref_state, 250.0, la, la, 1e-8, normalize)[3]
  z1, z2 = views(rng, n, d)
  kw = dict(alpha=250.0, la_R=la, la_mu=la, eps=1e-8)
  g1, g2 = jax.grad(lambda a, b: cim.corinfomax_loss(a, b, state, normalize=normalize, **kw)[0],
                    argnums=(0, 1))(z1, z2)

  def ref_loss(a, b):
    return ref_step(a, b, ref_state, normalize=normalize, **kw)[0]

  # Central differences of the float64 loss along random directions.
  h = 1e-5
  for _ in range(3):
    v1, v2 = rng.normal(size=(2, n, d))
    fd = (ref_loss(z1 + h * v1, z2 + h * v2) - ref_loss(z1 - h * v1, z2 - h * v2)) / (2 * h)
    ad = np.sum(np.asarray(g1, np.float64) * v1) + np.sum(np.asarray(g2, np.float64) * v2)
    np.testing.assert_allclose(ad, fd, rtol=1e-3)


def test_no_gradient_through_previous_state():
  rng = np.random.default_rng(3)
  z1, z2 = views(rng, 32, 8)
  state = cim.init_state(8)
  g_state = jax.grad(lambda s: cim.corinfomax_loss(z1, z2, s, la_R=0.5, la_mu=0.5)[0])(state)
  for leaf in g_state:
    np.testing.assert_array_equal(leaf, 0.0)


def test_psd_logdet_value_and_gradient():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(20, 20))
  a = (a @ a.T / 20 + 0.1 * np.eye(20)).astype(np.float32)
  val, grad = jax.value_and_grad(cim.psd_logdet)(jnp.asarray(a), 1e-8)
  np.testing.assert_allclose(float(val), np.linalg.slogdet(a.astype(np.float64))[1], rtol=1e-5)
  np.testing.assert_allclose(grad, np.linalg.inv(a.astype(np.float64)), rtol=1e-3, atol=1e-3)


def test_psd_logdet_falls_back_when_float32_cholesky_fails():
  # A rank-2 covariance of scale 1 plus 1e-8 I: exactly positive definite, but float32
  # rounding (~1e-7) swamps the 1e-8 eigenvalues and Cholesky breaks down.
  rng = np.random.default_rng(5)
  u = rng.normal(size=(64, 2))
  cov = (u @ u.T).astype(np.float32)
  a = jnp.asarray(cov) + 1e-8 * jnp.eye(64)
  assert not np.all(np.isfinite(np.asarray(jnp.linalg.cholesky(a))))  # the case exists
  val, grad = jax.value_and_grad(cim.psd_logdet)(a, 1e-8)
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_allclose(grad, np.asarray(grad).T, rtol=1e-6, atol=1e-6)
  # Exactly: two large eigenvalues and 62 at 1e-8. In float32 the 62 small ones are
  # rounding noise of size ~1e-7 * |a|; clipping keeps each at or above the floor, so
  # the value lies between the exact one and the one with every small eigenvalue at the
  # noise level.
  w = np.linalg.eigvalsh(u.T @ u)
  exact = np.sum(np.log(w)) + 62 * np.log(1e-8)
  noise = 1e-6 * np.abs(cov).sum(1).max()
  assert exact - 1e-2 <= float(val) <= np.sum(np.log(w)) + 62 * np.log(noise)


# ---------------------------------------------------------------------------------
# "cholesky_fallbacks": how many branches took psd_logdet's eigenvalue path.
# ---------------------------------------------------------------------------------
def _rank_deficient_views(rng, n=16, d=64):
  """Unnormalised views with N < D: with la_R = 0 each covariance has rank N - 1 and
  scale ~1, so float32 rounding (~1e-7) swamps eps = 1e-8 and Cholesky breaks down."""
  return tuple(rng.normal(size=(n, d)).astype(np.float32) for _ in range(2))


def _cholesky_fails(cov, eps):
  """The independent check: does float32 Cholesky of cov + eps I break down?"""
  a = cov + eps * jnp.eye(cov.shape[0])
  chol = np.asarray(jnp.linalg.cholesky(0.5 * (a + a.T)))
  return not (np.all(np.isfinite(chol)) and np.all(np.diagonal(chol) > 0))


def test_cholesky_fallbacks_is_zero_for_a_well_conditioned_batch():
  rng = np.random.default_rng(12)
  _, state, metrics = jax.jit(cim.corinfomax_loss)(*views(rng, 128, 32), cim.init_state(32))
  assert metrics["cholesky_fallbacks"].dtype == jnp.float32
  assert metrics["cholesky_fallbacks"].shape == ()
  assert float(metrics["cholesky_fallbacks"]) == 0.0
  assert not _cholesky_fails(state.cov1, 1e-8) and not _cholesky_fails(state.cov2, 1e-8)


def _no_memory_step(z1, z2, state, la_R):
  """Loss, state, metrics and gradients of unnormalised views (see above), jitted."""
  loss_fn = functools.partial(cim.corinfomax_loss, la_R=la_R, normalize=False)
  return jax.jit(functools.partial(_loss_and_grads, loss_fn))(z1, z2, state)


@pytest.mark.parametrize("seed", range(3))
def test_cholesky_fallbacks_counts_the_branches_whose_cholesky_fails(seed):
  z1, z2 = _rank_deficient_views(np.random.default_rng(seed))
  loss, state, metrics, grads = _no_memory_step(z1, z2, cim.init_state(64), la_R=0.0)
  assert [_cholesky_fails(c, 1e-8) for c in (state.cov1, state.cov2)] == [True, True]
  assert float(metrics["cholesky_fallbacks"]) == 2.0
  for leaf in (loss, *grads, *state):
    assert np.all(np.isfinite(np.asarray(leaf)))
  # One branch collapsed: its old covariance is 0, the other's is I.
  state = cim.init_state(64)._replace(cov1=jnp.zeros((64, 64)))
  loss, state, metrics, _ = _no_memory_step(z1, z2, state, la_R=0.5)
  assert [_cholesky_fails(c, 1e-8) for c in (state.cov1, state.cov2)] == [True, False]
  assert float(metrics["cholesky_fallbacks"]) == 1.0 and np.isfinite(float(loss))


def test_cholesky_fallbacks_is_the_same_sharded_over_8_devices():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch = NamedSharding(mesh, P("data"))
  state = cim.init_state(64)._replace(cov1=jnp.zeros((64, 64)))
  f = jax.jit(functools.partial(cim.corinfomax_loss, normalize=False, la_R=0.5))
  z1, z2 = _rank_deficient_views(np.random.default_rng(13))
  want = f(z1, z2, state)[2]["cholesky_fallbacks"]
  got = f(jax.device_put(z1, batch), jax.device_put(z2, batch), state)[2]
  assert float(want) == float(got["cholesky_fallbacks"]) == 1.0
  assert np.isfinite(float(got["loss"]))


# ---------------------------------------------------------------------------------
# Sharded and mapped computations equal the global one.
# ---------------------------------------------------------------------------------
def _loss_and_grads(loss_fn, z1, z2, state):
  (loss, (new_state, metrics)), grads = jax.value_and_grad(
      lambda a, b: (lambda out: (out[0], out[1:]))(loss_fn(a, b, state)),
      argnums=(0, 1), has_aux=True)(z1, z2)
  return loss, new_state, metrics, grads


def _carried_state(rng, n, d):
  state = cim.init_state(d)
  for _ in range(2):
    _, state, _ = cim.corinfomax_loss(*views(rng, n, d), state)
  return state


def test_sharded_over_8_devices_equals_unsharded():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  rng = np.random.default_rng(6)
  n, d = 64, 32
  state = _carried_state(rng, n, d)
  z1, z2 = views(rng, n, d)
  f = jax.jit(functools.partial(_loss_and_grads, cim.corinfomax_loss))
  want = f(z1, z2, state)

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  got = f(jax.device_put(z1, batch), jax.device_put(z2, batch),
          jax.device_put(state, replicated))
  assert got[3][0].sharding.is_equivalent_to(batch, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)


@pytest.mark.parametrize("mapping", ["shard_map", "shard_map_unchecked", "pmap", "vmap"])
def test_axis_name_collectives_equal_unsharded(mapping):
  rng = np.random.default_rng(7)
  n, d = 64, 32
  state = _carried_state(rng, n, d)
  z1, z2 = views(rng, n, d)
  want = jax.jit(functools.partial(_loss_and_grads, cim.corinfomax_loss))(z1, z2, state)
  local = functools.partial(_loss_and_grads,
                            functools.partial(cim.corinfomax_loss, axis_name="data"))

  if mapping.startswith("shard_map"):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    f = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                      out_specs=(P(), P(), P(), (P("data"), P("data"))),
                      check_vma=mapping == "shard_map"))
    got = f(jax.device_put(z1, batch), jax.device_put(z2, batch), state)
  else:  # 8 devices (pmap) or a vmapped axis of size 8, each with 8 rows
    split = lambda z: z.reshape(8, n // 8, d)
    mapped = (jax.pmap(local, in_axes=(0, 0, None), axis_name="data") if mapping == "pmap"
              else jax.jit(jax.vmap(local, in_axes=(0, 0, None), axis_name="data")))
    out = mapped(split(z1), split(z2), state)
    loss, new_state, metrics, grads = out
    got = (loss[0], jax.tree.map(lambda x: x[0], new_state),
           jax.tree.map(lambda x: x[0], metrics), tuple(g.reshape(n, d) for g in grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)


# ---------------------------------------------------------------------------------
# Degenerate inputs that happen in training stay finite.
# ---------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("eps", "normalize"))
def _step_with_grads(z1, z2, state, eps=1e-8, normalize=True):
  return _loss_and_grads(functools.partial(cim.corinfomax_loss, eps=eps, normalize=normalize),
                         z1, z2, state)


def _finite_step(z1, z2, state, **kw):
  loss, state, _, grads = _step_with_grads(z1, z2, state, **kw)
  assert np.isfinite(float(loss)), loss
  for leaf in (*grads, *state):
    assert np.all(np.isfinite(np.asarray(leaf)))
  return float(loss), state


@pytest.mark.parametrize("normalize", [True, False])
def test_long_run_of_collapsed_batches_stays_finite(normalize):
  d = 64
  state = cim.init_state(d)
  z = jnp.tile(jnp.linspace(-1.0, 1.0, d)[None], (32, 1))  # every row identical
  losses = []
  for _ in range(60):
    loss, state = _finite_step(z, z, state, eps=1e-8, normalize=normalize)
    losses.append(loss)
  # Collapse is what the covariance term punishes: the loss approaches -2 log(eps)
  # minus what the one surviving direction contributes.
  assert losses[-1] > losses[0]
  assert losses[-1] <= -2 * np.log(1e-8) + 1e-3


def test_collapsed_rows_n_smaller_than_d_and_zero_rows_stay_finite():
  rng = np.random.default_rng(8)
  state = cim.init_state(256)
  for _ in range(5):  # N < D, carried
    z1, z2 = views(rng, 16, 256)
    _, state = _finite_step(z1, z2, state)
  _finite_step(jnp.zeros((16, 256)), jnp.zeros((16, 256)), state)  # all-zero rows
  _finite_step(jnp.ones((2, 256)), jnp.ones((2, 256)), state)  # the smallest batch


@pytest.mark.parametrize("n", [0, 1])
def test_a_global_batch_under_two_is_refused(n):
  with pytest.raises(ValueError, match=f"N={n} rows"):
    cim.corinfomax_loss(jnp.ones((n, 8)), jnp.ones((n, 8)), cim.init_state(8))


def test_a_local_shard_of_one_is_a_legitimate_batch():
  rng = np.random.default_rng(3)
  z1, z2 = views(rng, 8, 4)
  state = cim.init_state(4)
  local = lambda a, b: cim.corinfomax_loss(a[None], b[None], state, axis_name="data")[0]
  mapped = jax.vmap(local, axis_name="data")(z1, z2)
  np.testing.assert_allclose(mapped, cim.corinfomax_loss(z1, z2, state)[0], rtol=1e-5)
  with pytest.raises(ValueError, match="N=1 rows"):  # one device, one row: one in all
    jax.vmap(local, axis_name="data")(z1[:1], z2[:1])


@pytest.mark.parametrize("kw", [dict(la_R=1.5), dict(la_R=-1), dict(la_R=1.0),
                                dict(la_mu=1.5), dict(la_mu=-0.1), dict(eps=-1.0),
                                dict(eps=float("nan")), dict(alpha=float("nan")),
                                dict(alpha=-1.0), dict(alpha=float("inf")),
                                # concrete arrays are checked like numbers
                                dict(la_R=jnp.array(1.5)), dict(la_mu=np.float32(-0.5)),
                                dict(alpha=jnp.array(np.nan)), dict(eps=jnp.array(-1.0))])
def test_forgetting_factors_and_eps_out_of_range_are_refused(kw):
  name = next(iter(kw))
  with pytest.raises(ValueError, match=name):
    cim.corinfomax_loss(jnp.ones((4, 8)), jnp.ones((4, 8)), cim.init_state(8), **kw)


@pytest.mark.parametrize("dim", [True, 2.5, "8"])
def test_init_state_refuses_a_dimension_that_is_not_a_positive_integer(dim):
  with pytest.raises(ValueError, match="dim must be a positive integer"):
    cim.init_state(dim)


def test_traced_hyperparameters_are_not_checked():
  z = jnp.asarray(np.random.default_rng(4).normal(size=(4, 8)), jnp.float32)
  loss = jax.jit(lambda la: cim.corinfomax_loss(z, z, cim.init_state(8), la_R=la)[0])(0.5)
  assert np.isfinite(float(loss))


def test_bfloat16_inputs_use_float32_statistics():
  rng = np.random.default_rng(9)
  z1, z2 = views(rng, 64, 32)
  z1b, z2b = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
  state = cim.init_state(32)
  loss_b, state_b, _ = cim.corinfomax_loss(z1b, z2b, state)
  loss_f, state_f, _ = cim.corinfomax_loss(z1b.astype(jnp.float32), z2b.astype(jnp.float32),
                                           state)
  assert loss_b.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in state_b)
  np.testing.assert_array_equal(loss_b, loss_f)
  jax.tree.map(np.testing.assert_array_equal, state_b, state_f)


# The loss API at its edges: what a user may pass by mistake, or in another form.
_Z = np.random.default_rng(11).normal(size=(6, 4)).astype(np.float32)
AS_GIVEN = {"list": lambda z: z.tolist(), "numpy": lambda z: z,
            "int": lambda z: np.round(3 * z).astype(np.int32).tolist(),
            "bool": lambda z: (z > 0).tolist()}


@pytest.mark.parametrize("kind", AS_GIVEN)
def test_lists_numpy_integer_and_boolean_views_give_the_float32_value(kind):
  z1, z2 = AS_GIVEN[kind](_Z), AS_GIVEN[kind](_Z[::-1])
  want = cim.corinfomax_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                             cim.init_state(4))
  got = cim.corinfomax_loss(z1, z2, cim.init_state(4))
  assert got[0].dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("state", [None, tuple(cim.init_state(4)),
                                   cim.init_state(4)._asdict()])
def test_a_state_that_is_not_from_init_state_is_refused(state):
  with pytest.raises(TypeError, match=r"state .*init_state\(D\) \(here init_state\(4\)\)"):
    cim.corinfomax_loss(_Z, _Z, state)


@pytest.mark.parametrize("name", ["z1", "z2"])
def test_complex_views_are_refused(name):
  z = {"z1": _Z, "z2": _Z, name: _Z + 1j}
  with pytest.raises(TypeError, match=f"corinfomax_loss: {name} has dtype complex"):
    cim.corinfomax_loss(z["z1"], z["z2"], cim.init_state(4))


@pytest.mark.parametrize("axis_name", ["data", ("data", "model")])
def test_an_axis_name_no_map_binds_is_refused_in_one_line(axis_name):
  msg = r"axis_name=.*data.* is only for use inside shard_map / pmap / a named vmap"
  with pytest.raises(ValueError, match=msg):
    cim.corinfomax_loss(_Z, _Z, cim.init_state(4), axis_name=axis_name)
  with pytest.raises(ValueError, match=r"pass None under jax\.jit"):
    jax.jit(lambda a: cim.corinfomax_loss(a, a, cim.init_state(4), axis_name="data"))(_Z)
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):  # another name
    jax.vmap(lambda a: cim.corinfomax_loss(a[None], a[None], cim.init_state(4),
                                           axis_name="data")[0], axis_name="batch")(_Z)


# ---------------------------------------------------------------------------------
# The spectrum helper.
# ---------------------------------------------------------------------------------
def test_covariance_spectrum_of_known_covariances():
  rng = np.random.default_rng(10)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  w = np.array([0.5, 0.2, 0.1, 1e-3, 1e-9, 0.0])
  spec = cim.covariance_spectrum(jnp.asarray(q @ np.diag(w) @ q.T, jnp.float32))
  np.testing.assert_allclose(spec.eigenvalues, w, atol=1e-6)
  assert int(spec.num_above) == 2  # 0.5, 0.2 > 0.1
  # float32 eigh of the rotated matrix is exact to ~6e-8 only: count on the diagonal one.
  diagonal = cim.covariance_spectrum(jnp.asarray(np.diag(w), jnp.float32))
  assert int(diagonal.num_below) == 2  # 1e-9 and 0 < 1e-8
  np.testing.assert_allclose(float(spec.max_eigenvalue), 0.5, rtol=1e-5)
  p = w / w.sum()
  p = p[p > 0]
  np.testing.assert_allclose(float(spec.effective_rank), np.exp(-np.sum(p * np.log(p))),
                             rtol=1e-3)
  np.testing.assert_allclose(float(cim.covariance_spectrum(jnp.eye(7)).effective_rank), 7,
                             rtol=1e-5)
  rank1 = np.outer(np.arange(1.0, 5.0), np.arange(1.0, 5.0))
  np.testing.assert_allclose(float(cim.covariance_spectrum(rank1).effective_rank), 1.0,
                             rtol=1e-3)


# ---------------------------------------------------------------------------------
# stats_dtype: float64 statistics, as the reference keeps R and mu.
# ---------------------------------------------------------------------------------
# x64 mode is process-global unless scoped: jax.enable_x64(True) scopes it to the block.
@pytest.mark.parametrize("alpha,la_R,la_mu,eps,normalize,n,d", [
    (250.0, 0.01, 0.01, 1e-8, True, 128, 64),
    (1.0, 0.5, 0.9, 1e-4, False, 96, 48),
    (250.0, 0.01, 0.01, 1e-8, True, 48, 96),  # N < D
    (2000.0, 0.1, 0.1, 1e-8, True, 512, 256),
])
def test_float64_statistics_match_the_float64_reference(alpha, la_R, la_mu, eps, normalize,
                                                        n, d):
  rng = np.random.default_rng(d * 3 + n)
  with jax.enable_x64(True):
    loss_fn = jax.jit(functools.partial(
        cim.corinfomax_loss, alpha=alpha, la_R=la_R, la_mu=la_mu, eps=eps,
        normalize=normalize, stats_dtype=jnp.float64))
    state, ref_state = cim.init_state(d, dtype=jnp.float64), ref_init(d)
    for _ in range(3):
      z1, z2 = views(rng, n, d)
      loss, state, metrics = loss_fn(z1, z2, state)
      ref_loss, _, _, ref_state = ref_step(z1, z2, ref_state, alpha, la_R, la_mu, eps,
                                           normalize)
      assert all(x.dtype == jnp.float64 for x in state)
      assert_state_close(state, ref_state, rtol=1e-10)
      # The loss is the float64 value rounded to float32: within half a float32 ulp of
      # the reference (the float32 statistics are ~1e-5 off in cov_loss).
      assert loss.dtype == jnp.float32
      assert all(v.dtype == jnp.float32 for v in metrics.values())
      np.testing.assert_allclose(float(loss), ref_loss, rtol=2.0**-24, atol=0)
      # The float64 log-determinant itself, on the returned state: to 1e-10.
      for cov, ref_cov in zip(state[2:], ref_state[2:]):
        logdet = cim.psd_logdet(cov + eps * jnp.eye(d, dtype=jnp.float64), eps)
        assert logdet.dtype == jnp.float64
        np.testing.assert_allclose(float(logdet),
                                   np.linalg.slogdet(ref_cov + eps * np.eye(d))[1],
                                   rtol=1e-10)
    grads = jax.grad(lambda a, b: loss_fn(a, b, state)[0], argnums=(0, 1))(
        jnp.asarray(z1), jnp.asarray(z2, jnp.bfloat16))
    assert grads[0].dtype == jnp.float32 and grads[1].dtype == jnp.bfloat16


def test_float64_eigenvalue_fallback_stays_float64():
  # Rank 2 plus a floor below float64 rounding of its scale: Cholesky breaks down.
  rng = np.random.default_rng(14)
  u = rng.normal(size=(32, 2))
  a = u @ u.T
  floor = 1e-20
  with jax.enable_x64(True):
    logdet, fell_back = objective.psd_logdet_and_fallback(jnp.asarray(a, jnp.float64),
                                                          floor)
    assert logdet.dtype == jnp.float64 and float(fell_back) == 1.0
  w = np.maximum(np.linalg.eigvalsh(a), floor)
  # The two large eigenvalues to 1e-10; the 30 clipped ones are rounding noise >= floor.
  assert np.sum(np.log(w[-2:])) + 30 * np.log(floor) - 1e-10 <= float(logdet)
  assert float(logdet) <= np.sum(np.log(w[-2:])) + 30 * np.log(1e-15 * np.abs(a).max())


def test_float32_statistics_are_unchanged():
  # Loss, state, metrics and gradients of three carried steps, as computed before
  # stats_dtype existed: the loss to the bit, every other leaf to float32 rounding
  # (data/float32_path.npz). A bit-exact digest of all leaves held on one processor and
  # not on another: XLA:CPU emits other kernels for AVX-512 than for AVX2, and the last
  # bits of a reduction follow its order.
  rng = np.random.default_rng(21)
  state = cim.init_state(32)
  f = jax.jit(lambda a, b, s: _loss_and_grads(
      functools.partial(cim.corinfomax_loss, la_R=0.1, la_mu=0.1), a, b, s))
  for _ in range(3):
    loss, state, metrics, grads = f(*views(rng, 64, 32), state)
  assert np.asarray(loss).tobytes().hex() == "8f3f1141"  # 9.078017234802246
  leaves = jax.tree.leaves((loss, state, metrics, grads))
  saved = np.load(pathlib.Path(__file__).parent / "data" / "float32_path.npz")
  assert len(saved.files) == len(leaves) == 13
  for i, leaf in enumerate(leaves):
    want = saved[f"leaf{i}"]
    got = np.asarray(leaf)
    assert got.dtype == want.dtype and got.shape == want.shape, i
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(),
                               err_msg=f"leaf {i}")


def test_float64_without_x64_mode_is_refused_in_one_line():
  assert not jax.config.jax_enable_x64
  msg = r"stats_dtype=float64 needs JAX's x64 mode.*jax_enable_x64.*JAX_ENABLE_X64=1"
  with pytest.raises(ValueError, match=msg) as e:
    cim.corinfomax_loss(_Z, _Z, cim.init_state(4), stats_dtype=jnp.float64)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="init_state: dtype=float64 needs JAX's x64 mode"):
    cim.init_state(4, dtype=jnp.float64)
  with pytest.raises(ValueError, match="stats_dtype = <class 'jax.numpy.bfloat16'> is "
                                       "invalid: expected jnp.float32 or jnp.float64"):
    cim.corinfomax_loss(_Z, _Z, cim.init_state(4), stats_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="stats_dtype = 'bogus' is invalid"):  # not "None"
    cim.corinfomax_loss(_Z, _Z, cim.init_state(4), stats_dtype="bogus")


def test_float64_on_tpu_is_refused(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="stats_dtype=float64 .*TPUs have no float64"):
      cim.corinfomax_loss(_Z, _Z, cim.init_state(4), stats_dtype=jnp.float64)


def test_method_stats_dtype_is_checked_and_passed_on():
  from corinfomax_jax import methods  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="stats_dtype = 'float16' is invalid"):
    methods.create_method("corinfomax", stats_dtype="float16")
  method = methods.create_method("corinfomax", stats_dtype="float64")
  with jax.enable_x64(True):
    state = method.init_state(4)
    _, new_state, _ = method.loss(_Z, _Z[::-1], state)
  assert all(x.dtype == jnp.float64 for x in (*state, *new_state))
