"""The method seam: the registry, each method object against its pure loss, the state
every method carries for the covariance spectrum, and the trainer's step through it."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import corinfomax_jax as cim
from corinfomax_jax import methods


def _views(n=32, d=8, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, d)) * np.linspace(0.5, 2.0, d) + 0.3
  return (jnp.asarray(base + 0.2 * rng.normal(size=(n, d)), jnp.float32),
          jnp.asarray(base + 0.2 * rng.normal(size=(n, d)), jnp.float32))


def test_the_registry_names_each_method_by_its_config_section():
  assert sorted(methods.METHODS) == ["barlow_twins", "corinfomax", "vicreg"]
  assert methods.hyperparameters("corinfomax") == dict(
      alpha=250.0, la_R=0.01, la_mu=0.01, eps=1e-8, r_init=1.0, normalize=True,
      stats_dtype="float32")
  assert methods.hyperparameters("vicreg") == dict(
      sim_weight=25.0, var_weight=25.0, cov_weight=1.0, eps=1e-4)
  assert methods.hyperparameters("barlow_twins") == dict(lambd=0.0051, scale=1.0)


def test_bad_names_keys_and_values_are_refused_naming_them():
  with pytest.raises(ValueError, match=r"unknown method 'simclr'; the methods are "
                                       r"\['barlow_twins', 'corinfomax', 'vicreg'\]"):
    methods.create_method("simclr")
  with pytest.raises(ValueError, match=r"vicreg: unknown hyperparameters \['alpha'\]"):
    methods.create_method("vicreg", alpha=1.0)
  with pytest.raises(ValueError, match="corinfomax: la_R = 1.5 is invalid"):
    methods.create_method("corinfomax", la_R=1.5)
  with pytest.raises(ValueError, match="barlow_twins: lambd = -0.1 is invalid"):
    methods.create_method("barlow_twins", lambd=-0.1)
  with pytest.raises(ValueError, match="corinfomax: normalize = 'yes' is invalid"):
    methods.create_method("corinfomax", normalize="yes")


def test_each_method_object_computes_its_pure_loss():
  z1, z2 = _views()
  corinfomax = methods.create_method("corinfomax", alpha=10.0, la_R=0.1)
  state = corinfomax.init_state(8)
  loss, new_state, _ = corinfomax.loss(z1, z2, state)
  want, want_state, _ = cim.corinfomax_loss(z1, z2, cim.init_state(8), alpha=10.0,
                                            la_R=0.1)
  assert float(loss) == float(want)
  for a, b in zip(new_state, want_state):
    np.testing.assert_array_equal(a, b)

  vicreg = methods.create_method("vicreg", sim_weight=5.0)
  loss, _, metrics = vicreg.loss(z1, z2, vicreg.init_state(8))
  assert float(loss) == float(cim.vicreg_loss(z1, z2, sim_weight=5.0)[0])
  assert set(metrics) == {"loss", "sim_loss", "var_loss", "cov_loss"}

  barlow = methods.create_method("barlow_twins", scale=0.1)
  loss, _, metrics = barlow.loss(z1, z2, barlow.init_state(8))
  assert float(loss) == float(cim.barlow_twins_loss(z1, z2, scale=0.1)[0])
  assert set(metrics) == {"loss", "on_diag", "off_diag"}


@pytest.mark.parametrize("name", ["vicreg", "barlow_twins"])
def test_a_stateless_method_carries_the_batch_covariances_for_the_spectrum(name):
  z1, z2 = _views()
  method = methods.create_method(name)
  state = method.init_state(8)
  assert all(np.all(np.asarray(c) == 0) for c in method.covariances(state))
  _, new_state, _ = method.loss(z1, z2, state)
  for z, cov in zip((z1, z2), method.covariances(new_state)):
    zc = np.asarray(z, np.float64) - np.asarray(z, np.float64).mean(0)
    np.testing.assert_allclose(cov, zc.T @ zc / len(zc), rtol=1e-5, atol=1e-6)
  # The state takes no part in the gradient: the loss of a zero state and of the new
  # state is the same.
  assert float(method.loss(z1, z2, new_state)[0]) == float(method.loss(z1, z2, state)[0])


def test_corinfomax_offers_its_moving_covariances():
  z1, z2 = _views()
  method = methods.create_method("corinfomax")
  _, state, _ = method.loss(z1, z2, method.init_state(8))
  cov1, cov2 = method.covariances(state)
  assert cov1 is state.cov1 and cov2 is state.cov2


def test_method_objects_are_frozen_and_hashable():
  method = methods.create_method("vicreg")
  with pytest.raises(dataclasses.FrozenInstanceError):
    method.sim_weight = 1.0
  assert hash(method) == hash(methods.create_method("vicreg"))


@pytest.mark.parametrize("name", ["vicreg", "barlow_twins"])
def test_a_jitted_step_on_a_sharded_batch_equals_one_device(name):
  """The trainer jits the method's loss on a batch sharded over 8 devices."""
  z1, z2 = _views(n=64)
  method = methods.create_method(name)
  state = method.init_state(8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def loss_and_grad(a, b):
    return jax.value_and_grad(lambda a: method.loss(a, b, state)[0])(a)

  want = loss_and_grad(z1, z2)
  got = jax.jit(loss_and_grad)(jax.device_put(z1, sharded), jax.device_put(z2, sharded))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-7)
