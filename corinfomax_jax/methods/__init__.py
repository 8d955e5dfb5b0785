"""Self-supervised objectives behind one small protocol, and their registry.

Each method module holds a pure loss (`corinfomax_loss`, `vicreg_loss`,
`barlow_twins_loss`) and the method object the trainer uses: a frozen dataclass whose
fields are the keys of its config section (`config.<name>`), with

  init_state(dim) -> state                 the loss state before the first step
  loss(z1, z2, state) -> (loss, state, metrics)
  covariances(state) -> (cov1, cov2)       whose spectra the trainer logs

A new method is one module and one line in METHODS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from corinfomax_jax.methods.barlow_twins import BarlowTwins
from corinfomax_jax.methods.corinfomax import CorInfoMax
from corinfomax_jax.methods.vicreg import VICReg


class Method(Protocol):
  name: str

  def init_state(self, dim: int) -> Any: ...

  def loss(self, z1, z2, state) -> tuple[Any, Any, dict]: ...

  def covariances(self, state) -> tuple[Any, Any]: ...


METHODS = {cls.name: cls for cls in (CorInfoMax, VICReg, BarlowTwins)}


def hyperparameters(name: str) -> dict[str, Any]:
  """The hyperparameters of method `name` with their defaults (its config section)."""
  return {f.name: f.default for f in dataclasses.fields(_method_class(name))}


def create_method(name: str, **hyperparameters_) -> Method:
  """The method `name` with these hyperparameters (the others at their defaults).

  Raises ValueError for an unknown method or key, or a value out of range, naming it.
  """
  cls = _method_class(name)
  unknown = sorted(set(hyperparameters_) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"{name}: unknown hyperparameters {unknown}; it has "
                     f"{sorted(f.name for f in dataclasses.fields(cls))}")
  return cls(**hyperparameters_)


def _method_class(name: str):
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; the methods are {sorted(METHODS)}")
  return METHODS[name]
