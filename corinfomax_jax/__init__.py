"""corinfomax-jax: CorInfoMax self-supervised learning in JAX.

The package root exports the objectives only, so `import corinfomax_jax` needs nothing but
jax. Models, the input pipeline (TensorFlow), training and evaluation are submodules;
`load_encoder` (the trained backbone as a function, no TensorFlow) and `augment` (the
augmentation recipe and its device ops, no TensorFlow) are imported on first use.
"""

from corinfomax_jax.methods.corinfomax import CorInfoMaxState
from corinfomax_jax.methods.corinfomax import Spectrum
from corinfomax_jax.methods.corinfomax import corinfomax_loss
from corinfomax_jax.methods.corinfomax import covariance_spectrum
from corinfomax_jax.methods.corinfomax import init_state
from corinfomax_jax.methods.corinfomax import l2_normalize
from corinfomax_jax.methods.corinfomax import psd_logdet
from corinfomax_jax.methods.barlow_twins import barlow_twins_loss
from corinfomax_jax.methods.vicreg import vicreg_loss

__all__ = [
    "CorInfoMaxState",
    "Spectrum",
    "corinfomax_loss",
    "covariance_spectrum",
    "init_state",
    "l2_normalize",
    "psd_logdet",
    "vicreg_loss",
    "barlow_twins_loss",
    "load_encoder",
    "Encoder",
    "augment",
]

_LAZY = {"load_encoder": "corinfomax_jax.run.encoder", "Encoder": "corinfomax_jax.run.encoder"}
_LAZY_MODULES = {"augment": "corinfomax_jax.augment"}


def __getattr__(name):
  # Flax and orbax load only when the encoder is asked for.
  import importlib  # pylint: disable=g-import-not-at-top
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name in _LAZY_MODULES:
    return importlib.import_module(_LAZY_MODULES[name])
  raise AttributeError(f"module 'corinfomax_jax' has no attribute {name!r}")

__version__ = "0.2.0"
