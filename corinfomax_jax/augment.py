"""`corinfomax_jax.augment`, the public name of `corinfomax_jax.data.augment`.

Importing this module gives that one (the same module object), so code written for
the flat layout of earlier versions keeps working.
"""
import sys

from corinfomax_jax.data import augment as _augment

sys.modules[__name__] = _augment
