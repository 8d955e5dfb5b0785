"""run/sections.py: a section's fields are its config keys and check themselves, however
the section is made."""
import dataclasses
import re

import pytest

from corinfomax_jax import errors
from corinfomax_jax.run import sections


@dataclasses.dataclass(frozen=True)
class Probe(sections.Section):
  PATH = "eval.probe"
  lr: float = sections.checked(sections.POSITIVE)
  ks: tuple = sections.checked(sections.Check(lambda v: sections.all_positive(
      v, sections.is_int), "positive integers"), key="k")
  note: str | None  # not checked


@dataclasses.dataclass(frozen=True)
class Outer(sections.Section):
  PATH = "eval"
  batch_size: int = sections.checked(sections.POSITIVE_INT)
  probe: Probe


def test_a_section_reads_its_keys_and_its_subsections_from_their_places():
  raw = {"eval": {"batch_size": 8, "probe": {"lr": 0.5, "k": (1, 2), "note": "x"}}}
  outer = Outer.from_config(raw)
  assert outer == Outer(batch_size=8, probe=Probe(lr=0.5, ks=(1, 2), note="x"))
  assert Probe.config_keys() == ("lr", "k", "note")
  assert Outer.config_keys() == ("batch_size", "probe")
  # A key the config lacks arrives as None, and its check names it.
  with pytest.raises(errors.ConfigError,
                     match=re.escape("config.eval.batch_size = None is invalid: expected "
                                     "a positive integer")):
    Outer.from_config({"eval": {"probe": raw["eval"]["probe"]}})


@pytest.mark.parametrize("change, said", [
    (dict(lr=0), "config.eval.probe.lr = 0 is invalid: expected a positive number"),
    (dict(lr=float("nan")), "config.eval.probe.lr = nan is invalid"),
    (dict(lr=True), "config.eval.probe.lr = True is invalid"),  # a bool is no number
    # The message names the config key, not the field.
    (dict(ks=(1, 0)), "config.eval.probe.k = (1, 0) is invalid: expected positive "
                      "integers"),
    (dict(ks=()), "config.eval.probe.k = () is invalid")])
def test_every_way_of_making_a_section_checks_it(change, said):
  probe = Probe(lr=0.5, ks=(1,), note=None)
  with pytest.raises(errors.ConfigError, match=re.escape(said)):
    dataclasses.replace(probe, **change)
  with pytest.raises(errors.ConfigError, match=re.escape(said)):
    Probe(**{**dataclasses.asdict(probe), **change})


def test_the_shared_checks_say_what_they_accept():
  assert [sections.STEP_LIMIT.ok(v) for v in (-1, 0, 3, -2, 2.0)] == [
      True, False, True, False, False]
  assert [sections.MOMENTUM.ok(v) for v in (0, 0.9, 1, -0.1)] == [True, True, False, False]
  assert [sections.STEP_FACTOR.ok(v) for v in (0, 0.1, 1)] == [False, True, True]
  assert sections.one_of(("a", "b")).accepted == "one of ['a', 'b']"
  assert sections.walk({"a": {"b": {"c": 1}}}, ["a", "b"]) == {"c": 1}
  assert sections.walk({"a": {"b": 3}}, ["a", "b"]) is None
