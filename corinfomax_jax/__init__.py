"""corinfomax-jax: CorInfoMax self-supervised learning in JAX.

The package root exports the objective only, so `import corinfomax_jax` needs nothing but
jax. Models, the input pipeline (TensorFlow), training and evaluation are submodules.
"""

from corinfomax_jax.objective import CorInfoMaxState
from corinfomax_jax.objective import Spectrum
from corinfomax_jax.objective import corinfomax_loss
from corinfomax_jax.objective import covariance_spectrum
from corinfomax_jax.objective import init_state
from corinfomax_jax.objective import l2_normalize
from corinfomax_jax.objective import psd_logdet

__all__ = [
    "CorInfoMaxState",
    "Spectrum",
    "corinfomax_loss",
    "covariance_spectrum",
    "init_state",
    "l2_normalize",
    "psd_logdet",
]

__version__ = "0.1.0"
