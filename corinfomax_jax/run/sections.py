"""What a settings section is: a frozen dataclass whose fields are its config keys, each
checking itself, as a method's hyperparameters do (methods/).

A field is declared `checked(check, key=...)`: `check` is a `Check`, a test and the
words for what it accepts; `key` the config key where it differs from the field's.
`Section.__post_init__` runs every check, so a section is checked however it is made
(`from_config`, by hand, `dataclasses.replace`), and a refused value is one line:
"config.eval.linear.lr = 0 is invalid: expected a positive number". The checks below
are the ones sections share. run/settings.py declares the sections themselves.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Callable, NamedTuple

from corinfomax_jax.errors import ConfigError


class Check(NamedTuple):
  """What a key's value must satisfy, and what would be accepted (said in the error)."""
  ok: Callable[[Any], bool]
  accepted: str


def checked(check: Check | None = None, *, key: str | None = None):
  """A section field checked by `check` when the section is made, read from the config
  key `key` (default: the field's name)."""
  return dataclasses.field(metadata={"check": check, "key": key})


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_name(v) -> bool:
  return isinstance(v, str) and bool(v)


def one_of(choices) -> Check:
  return Check(lambda v: v in choices, f"one of {list(choices)}")


def as_tuple(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def all_positive(value, is_a) -> bool:
  """Whether `value` is one positive `is_a` value or a non-empty tuple of them."""
  values = as_tuple(value)
  return bool(values) and all(is_a(v) and v > 0 for v in values)


POSITIVE_INT = Check(lambda v: is_int(v) and v > 0, "a positive integer")
STEP_LIMIT = Check(lambda v: is_int(v) and (v == -1 or v > 0),
                   "a positive integer, or -1 for no limit")
SPLIT_LIMIT = Check(STEP_LIMIT.ok, "a positive integer, or -1 for the whole split")
POSITIVE = Check(lambda v: is_number(v) and v > 0, "a positive number")
NON_NEGATIVE = Check(lambda v: is_number(v) and v >= 0, "a number >= 0")
MOMENTUM = Check(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
BETA = Check(MOMENTUM.ok, "a number in [0, 1), e.g. 0.9")  # Adam's moment decays
STEP_FACTOR = Check(lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1], e.g. 0.1")
BOOL = Check(lambda v: isinstance(v, bool), "True or False")
SPLIT = Check(is_name, "a split name")


class Section:
  """A config section: a frozen dataclass whose `checked` fields are checked when it is
  made; `from_config` reads it from the config at `PATH`, and a field typed as another
  Section from that section's own place."""
  PATH = ""  # where its keys are: "" the top level, "eval.knn", ...

  def __post_init__(self):
    for f in dataclasses.fields(self):
      check = f.metadata.get("check")
      if check is not None and not check.ok(getattr(self, f.name)):
        self.refuse(f.name, check.accepted)

  def refuse(self, field_name: str, accepted: str):
    """Raises the one-line ConfigError for the field's value: what would be accepted."""
    where = f"{self.PATH}." if self.PATH else ""
    raise ConfigError(f"config.{where}{self.config_key(field_name)} = "
                      f"{getattr(self, field_name)!r} is invalid: expected {accepted}")

  @classmethod
  def config_key(cls, field_name: str) -> str:
    return fields(cls)[field_name].metadata.get("key") or field_name

  @classmethod
  def config_keys(cls) -> tuple[str, ...] | None:
    """The keys of this section in the config (None: any, checked by another registry)."""
    return tuple(cls.config_key(name) for name in fields(cls))

  @classmethod
  def from_config(cls, raw: dict):
    """This section of the config dict `raw`, with its subsections, checked."""
    section = walk(raw, cls.PATH.split(".") if cls.PATH else []) or {}
    values = {}
    for name in fields(cls):
      sub = subsection(cls, name)
      values[name] = sub.from_config(raw) if sub else section.get(cls.config_key(name))
    return cls(**values)


@functools.cache
def fields(cls) -> dict[str, dataclasses.Field]:
  """The dataclass fields of `cls` by name."""
  return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache
def subsection(cls, field_name: str):
  """The Section class of `cls`'s field `field_name`, or None for a plain value."""
  hint = typing.get_type_hints(cls).get(field_name)
  return hint if isinstance(hint, type) and issubclass(hint, Section) else None


def walk(tree: dict, keys: list[str]) -> dict | None:
  """The dict at `keys` under `tree`, or None where there is none."""
  for k in keys:
    tree = tree.get(k) if isinstance(tree, dict) else None
  return tree if isinstance(tree, dict) else None
