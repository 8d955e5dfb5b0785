"""corinfomax-jax: CorInfoMax self-supervised learning in JAX.

The package root exports the objective only, so `import corinfomax_jax` needs nothing but
jax. Models, the input pipeline (TensorFlow), training and evaluation are submodules;
`load_encoder` (the trained backbone as a function, no TensorFlow) is imported on first
use.
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
    "load_encoder",
    "Encoder",
]

_LAZY = {"load_encoder": "corinfomax_jax.encoder", "Encoder": "corinfomax_jax.encoder"}


def __getattr__(name):
  # Flax and orbax load only when the encoder is asked for.
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'corinfomax_jax' has no attribute {name!r}")

__version__ = "0.1.0"
