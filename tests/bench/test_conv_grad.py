"""bench/conv_grad.py: the weight gradient written as dots is the convolution's."""
import importlib.util
import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("bench_conv_grad",
                                               os.path.join(ROOT, "bench", "conv_grad.py"))
conv_grad = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv_grad)


@pytest.mark.parametrize("formulation", ["weight_grad_by_taps", "weight_grad_im2col"])
def test_dot_formulations_equal_the_convolutions_weight_gradient(formulation):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 3))
  dy = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 4))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 4))

  def conv(w_):
    return jax.lax.conv_general_dilated(x, w_, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  expected = jax.vjp(conv, w)[1](dy)[0]
  got = getattr(conv_grad, formulation)(x, dy)
  # An off-by-one tap or a swapped kernel axis moves elements by their own scale.
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
