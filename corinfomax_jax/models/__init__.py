"""Backbones and heads."""
from corinfomax_jax.models.resnet import *  # noqa: F401,F403  (split below in a later commit)
from corinfomax_jax.models.resnet import BACKBONES, DTYPES, parse_projector, parse_dtype  # noqa: F401
