"""What VICReg's and Barlow Twins' losses share: global-batch statistics under sharding,
collectives and a local shard of one; float32 statistics for bfloat16 views; and the
views a user may pass by mistake or in another form. Each test runs for both losses;
their values against float64 references are in test_vicreg.py and test_barlow_twins.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import loss_testing
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corinfomax_jax.methods.barlow_twins import barlow_twins_loss
from corinfomax_jax.methods.vicreg import vicreg_loss


@pytest.fixture(params=[vicreg_loss, barlow_twins_loss], ids=lambda f: f.__name__)
def loss_fn(request):
  return request.param


views = loss_testing.views
_loss_and_grads = loss_testing.loss_and_grads



# ---------------------------------------------------------------------------------
# Sharded and mapped computations equal the global one.
# ---------------------------------------------------------------------------------
def test_sharded_over_8_devices_equals_unsharded(loss_fn):
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  rng = np.random.default_rng(3)
  n, d = 64, 32
  z1, z2 = views(rng, n, d)
  f = jax.jit(functools.partial(_loss_and_grads, loss_fn))
  want = f(z1, z2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch = NamedSharding(mesh, P("data"))
  got = f(jax.device_put(z1, batch), jax.device_put(z2, batch))
  assert got[1][0].sharding.is_equivalent_to(batch, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)


@pytest.mark.parametrize("mapping", ["shard_map", "shard_map_unchecked", "pmap", "vmap"])
def test_axis_name_collectives_equal_unsharded(loss_fn, mapping):
  rng = np.random.default_rng(4)
  n, d = 64, 32
  z1, z2 = views(rng, n, d)
  want = jax.jit(functools.partial(_loss_and_grads, loss_fn))(z1, z2)
  local = functools.partial(_loss_and_grads, functools.partial(loss_fn, axis_name="data"))

  if mapping.startswith("shard_map"):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    f = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                      out_specs=((P(), P()), (P("data"), P("data"))),
                      check_vma=mapping == "shard_map"))
    got = f(jax.device_put(z1, batch), jax.device_put(z2, batch))
  else:  # 8 devices (pmap) or a vmapped axis of size 8, each with 8 rows
    split = lambda z: z.reshape(8, n // 8, d)
    mapped = (jax.pmap(local, axis_name="data") if mapping == "pmap"
              else jax.jit(jax.vmap(local, axis_name="data")))
    (loss, metrics), grads = mapped(split(z1), split(z2))
    got = ((loss[0], jax.tree.map(lambda x: x[0], metrics)),
           tuple(g.reshape(n, d) for g in grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)


def test_a_local_shard_of_one_is_a_legitimate_batch(loss_fn):
  rng = np.random.default_rng(5)
  z1, z2 = views(rng, 8, 4)
  local = lambda a, b: loss_fn(a[None], b[None], axis_name="data")[0]
  mapped = jax.vmap(local, axis_name="data")(z1, z2)
  np.testing.assert_allclose(mapped, loss_fn(z1, z2)[0], rtol=1e-5)
  with pytest.raises(ValueError, match="N=1 rows"):  # one device, one row: one in all
    jax.vmap(local, axis_name="data")(z1[:1], z2[:1])


# ---------------------------------------------------------------------------------
# Input dtypes and bad input.
# ---------------------------------------------------------------------------------
def test_bfloat16_inputs_use_float32_statistics(loss_fn):
  rng = np.random.default_rng(6)
  z1, z2 = views(rng, 64, 32)
  z1b, z2b = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
  loss_b, metrics_b = loss_fn(z1b, z2b)
  assert loss_b.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in metrics_b.values())
  # Exactly the float32 computation on the rounded inputs, and close to the unrounded.
  loss_f, _ = loss_fn(z1b.astype(jnp.float32), z2b.astype(jnp.float32))
  np.testing.assert_array_equal(loss_b, loss_f)
  np.testing.assert_allclose(float(loss_b), float(loss_fn(z1, z2)[0]), rtol=1e-2)
  g = jax.grad(lambda a, b: loss_fn(a, b)[0])(z1b, z2b)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("shapes,name", [(((8,), (8,)), "z1"), (((4, 8), (4, 8, 1)), "z2"),
                                         (((4, 8), (4, 6)), "z1 and z2"),
                                         (((4, 8), (5, 8)), "z1 and z2")])
def test_inputs_that_are_not_matching_matrices_are_refused(loss_fn, shapes, name):
  with pytest.raises(ValueError, match=f"{loss_fn.__name__}: {name}"):
    loss_fn(jnp.ones(shapes[0]), jnp.ones(shapes[1]))


@pytest.mark.parametrize("n", [0, 1])
def test_a_global_batch_under_two_is_refused(loss_fn, n):
  with pytest.raises(ValueError, match=f"N={n} rows"):
    loss_fn(jnp.ones((n, 8)), jnp.ones((n, 8)))




# The loss API at its edges: what a user may pass by mistake, or in another form.
_Z = np.random.default_rng(11).normal(size=(6, 4)).astype(np.float32)
AS_GIVEN = {"list": lambda z: z.tolist(), "numpy": lambda z: z,
            "int": lambda z: np.round(3 * z).astype(np.int32).tolist(),
            "bool": lambda z: (z > 0).tolist()}


@pytest.mark.parametrize("kind", AS_GIVEN)
def test_lists_numpy_integer_and_boolean_views_give_the_float32_value(loss_fn, kind):
  z1, z2 = AS_GIVEN[kind](_Z), AS_GIVEN[kind](_Z[::-1])
  want = loss_fn(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
  got = loss_fn(z1, z2)
  assert got[0].dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("name", ["z1", "z2"])
def test_complex_views_are_refused(loss_fn, name):
  z = {"z1": _Z, "z2": _Z, name: _Z + 1j}
  with pytest.raises(TypeError, match=f"{loss_fn.__name__}: {name} has dtype complex"):
    loss_fn(z["z1"], z["z2"])


@pytest.mark.parametrize("axis_name", ["data", ("data", "model")])
def test_an_axis_name_no_map_binds_is_refused_in_one_line(loss_fn, axis_name):
  msg = r"axis_name=.*data.* is only for use inside shard_map / pmap / a named vmap"
  with pytest.raises(ValueError, match=msg):
    loss_fn(_Z, _Z, axis_name=axis_name)
  with pytest.raises(ValueError, match=r"pass None under jax\.jit"):
    jax.jit(lambda a: loss_fn(a, a, axis_name="data"))(_Z)
