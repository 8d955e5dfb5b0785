"""run/health.py: what a state must be for pretraining to save it, and a reader to use it."""
import jax.numpy as jnp
import numpy as np
import pytest

from corinfomax_jax import methods
from corinfomax_jax.methods import corinfomax
from corinfomax_jax.run import health
from corinfomax_jax.run import settings as settings_lib

ON = settings_lib.Divergence(enabled=True, max_norm_ratio=1e3, floor_factor=10.0)
OFF = settings_lib.Divergence(enabled=False, max_norm_ratio=1e3, floor_factor=10.0)
INITIAL = {"w": jnp.full((4, 4), 0.5), "b": jnp.zeros(4)}  # global norm 2


def _state(scale=1.0, cov=1e-2, nan_in=None):
  state = {"step": jnp.int32(3), "params": {"w": INITIAL["w"] * scale, "b": jnp.ones(4)},
           "batch_stats": {"mean": jnp.zeros(4)}, "opt_state": (jnp.zeros(4),),
           "loss_state": corinfomax.init_state(4, r_init=cov)}
  if nan_in:
    state[nan_in] = {"x": jnp.array([1.0, jnp.nan])}
  return state


def test_the_global_norm_of_huge_parameters_does_not_overflow():
  tree = {"a": jnp.full((1000,), 1e28, jnp.float32), "b": jnp.ones(3)}
  np.testing.assert_allclose(float(health.global_norm(tree)),
                             np.sqrt(1000) * 1e28, rtol=1e-5)
  np.testing.assert_allclose(float(health.global_norm({"a": jnp.array([3.0, 4.0])})), 5.0)
  assert float(health.global_norm({"a": jnp.zeros(3)})) == 0.0


@pytest.mark.parametrize("part", ["params", "opt_state", "batch_stats"])
def test_non_finite_values_anywhere_are_named_even_when_the_check_is_off(part):
  detector = health.Detector(OFF, methods.create_method("corinfomax"), INITIAL)
  assert detector.why(_state(nan_in=part)) == f"NaN or infinite values in {part}"
  assert health.nonfinite_parts(_state(nan_in=part)) == [part]
  assert detector.why(_state()) is None


def test_readers_look_at_the_network_only():
  assert health.nonfinite_weights(_state(nan_in="opt_state")) is None
  assert health.nonfinite_weights(_state(nan_in="params")) == "NaN or infinite values in params"


def test_a_norm_above_the_ratio_times_the_initial_one_is_diverged():
  detector = health.Detector(ON, methods.create_method("corinfomax"), INITIAL)
  assert detector.initial_norm == pytest.approx(2.0)
  # 0.5 * 3000 * 4 = 6000 (and the biases' 2): 3000x the initial norm of 2.
  why = detector.why(_state(scale=3000.0))
  assert why is not None and "global norm is 6e+03" in why and "above" in why, why
  assert detector.why(_state(scale=900.0)) is None  # 900x: under the limit
  assert health.Detector(OFF, methods.create_method("corinfomax"), INITIAL).why(
      _state(scale=3000.0)) is None


def test_a_covariance_at_the_log_determinant_floor_is_collapsed():
  method = methods.create_method("corinfomax", eps=1e-8)
  detector = health.Detector(ON, method, INITIAL)
  why = detector.why(_state(cov=5e-8))  # every eigenvalue under 10 * eps = 1e-7
  assert why is not None and "collapsed" in why and "-73.7" in why, why  # 4 ln(1e-8)
  assert detector.why(_state(cov=2e-7)) is None
  # VICReg's state is the last batch's covariance, on no fixed scale: no floor check.
  assert health.Detector(ON, methods.create_method("vicreg"), INITIAL).why(
      _state(cov=5e-8)) is None
