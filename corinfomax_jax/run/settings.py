"""The configuration, checked once and turned into typed, frozen sections.

A mode calls `resolve(config)` first: every value a run reads is checked here, before
any work, and errors name the key, the value and what would be accepted
(`errors.ConfigError`). Each part of the library then receives only its own section:
the model `Settings.model`, the method its own object (`Settings.method`), the input
`Settings.data` (with the augmentation recipe resolved once), each evaluator its own
section of `Settings.eval`.

A section is a frozen dataclass, as a method is (methods/): its fields are its config
keys, each declared with its check (run/sections.py), and it checks itself when made.
A new key is its default in configs/default.py and one field here; a new monitor is one
`Monitor` class and one field of `Eval` (`EVAL_SECTIONS` follows). The known keys come
from the fields; a key nothing reads gets the one unknown-key message, `unknown_key`,
which the command line gives too.

Keys of earlier versions (flat model keys, top-level CorInfoMax keys, flat `eval.*`
keys) keep working: `MOVED_KEYS` is the one table of their moves, applied to config
dicts and records by `moved_keys_applied` and to flags by `moved_key`
(`command_line.translate_moved_flags`), each move noted once in the log.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import re
import typing
from typing import Any, Iterable

from absl import logging

from corinfomax_jax import methods as methods_lib
from corinfomax_jax import models
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.run.sections import (BETA, BOOL, MOMENTUM, NON_NEGATIVE, POSITIVE,
                                         POSITIVE_INT, SPLIT, SPLIT_LIMIT, STEP_FACTOR,
                                         STEP_LIMIT, Check, Section, all_positive,
                                         as_tuple, checked, fields, is_int, is_name,
                                         is_number, one_of, subsection, walk)

OPTIMIZERS = ("sgd", "lars", "lars_optax", "adamw")
LINEAR_SCHEDULES = ("cosine", "step", "constant")
FINETUNE_SCHEDULES = ("cosine", "step")
FINETUNE_HEAD_INITS = ("zeros", "normal")
CROP_INTERPOLATIONS = ("bicubic", "bilinear")
# Folders of a workdir that other modes write: eval.finetune.subdir may name none of them.
WORKDIR_NAMES = ("checkpoints", "embeddings", "export", "linear_eval")

# Keys of earlier versions -> their place now (dotted paths under config).
MOVED_KEYS = {
    "model": "model.backbone", "cifar_stem": "model.cifar_stem", "width": "model.width",
    "projector": "model.projector", "projector_bn": "model.projector_bn",
    "dtype": "model.dtype",
    **{k: f"corinfomax.{k}" for k in ("alpha", "la_R", "la_mu", "eps", "r_init",
                                      "normalize")},
    "eval.knn_every_epochs": "eval.knn.every_epochs", "eval.knn_k": "eval.knn.k",
    "eval.knn_temperature": "eval.knn.temperature",
    "eval.max_train_examples": "eval.knn.max_train_examples",
    "eval.online_probe": "eval.online_probe.enabled",
    "eval.online_probe_lr": "eval.online_probe.lr",
    **{f"eval.linear_{k}": f"eval.linear.{k}" for k in (
        "epochs", "batch_size", "lr", "min_lr", "schedule", "step_epochs",
        "weight_decay", "momentum", "precomputed", "max_steps")},
    "eval.label_fraction": "eval.finetune.label_fraction",
    "eval.label_file": "eval.finetune.label_file",
    **{f"eval.finetune_{k}": f"eval.finetune.{k}" for k in (
        "epochs", "batch_size", "backbone_lr", "head_lr", "weight_decay", "max_steps")},
}


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Data(Section):
  """What the input reads and how its views are made."""
  dataset: str = checked(Check(is_name,
                               "a TFDS name, 'imagenet100', or 'folder:<root>'"))
  data_dir: str | None
  train_split: str = checked(SPLIT)
  eval_split: str = checked(SPLIT)
  image_size: int = checked(POSITIVE_INT)
  skip_bad_images: bool = checked(BOOL)
  # recipe.resolve(dataset, config.aug): the whole two-view recipe (from_config)
  recipe: dict = checked(key="aug")

  def __post_init__(self):
    super().__post_init__()
    if self.dataset.startswith("folder:") and not self.dataset[len("folder:"):].strip():
      raise ConfigError(
          f"config.dataset = {self.dataset!r} names no image folder: give its path, "
          "--config.dataset=folder:/data/my_images or, with configs/folder.py, "
          "--config=configs/folder.py:/data/my_images (root/<split>/<class>/<image>)")

  @classmethod
  def from_config(cls, raw: dict) -> Data:
    """The data keys, checked; then config.aug resolved for the data set, once."""
    data = super().from_config(raw)  # its recipe config.aug as given, until resolved
    overrides = {k: v for k, v in (data.recipe or {}).items() if v is not None}
    try:
      recipe = recipe_lib.resolve(data.dataset, overrides or None)
    except ValueError as e:
      raise ConfigError(f"config.aug: {e}") from None
    return dataclasses.replace(data, recipe=recipe)

  @property
  def mean(self) -> tuple[float, ...]:
    return tuple(self.recipe["mean"])

  @property
  def std(self) -> tuple[float, ...]:
    return tuple(self.recipe["std"])


# The keys of config.model that create_model reads itself; the others are the backbone's.
_MODEL_KEYS = tuple(name for name, p in inspect.signature(
    models.create_model).parameters.items() if p.kind != p.VAR_KEYWORD)


@dataclasses.dataclass(frozen=True)
class Model(Section):
  """`models.create_model(**kwargs)`: config.model as checked keyword arguments; the
  backbone's own keys (a ResNet's width and cifar_stem) are checked by its entry in
  models.BACKBONES, which also refuses a key that backbone does not accept."""
  PATH = "model"
  kwargs: dict

  def __post_init__(self):
    kwargs = dict(self.kwargs)
    name = kwargs.get("backbone")

    def need(ok, key, accepted):
      if not ok:
        raise ConfigError(f"config.model.{key} = {kwargs.get(key)!r} is invalid: "
                          f"expected {accepted}")

    need(name in models.BACKBONES, "backbone", f"one of {sorted(models.BACKBONES)}")
    for key, value in kwargs.items():
      if key not in _MODEL_KEYS:
        try:
          models.check_backbone_options(name, **{key: value})
        except ValueError as e:
          raise ConfigError(f"config.model.{key} = {value!r} is invalid: {e}") from None
    try:
      kwargs["projector"] = models.parse_projector(kwargs.get("projector"))
    except ValueError:
      need(False, "projector", "positive integers, hidden sizes then the output dim D, "
           "e.g. (2048, 2048, 64)")
    need(kwargs.get("dtype") in models.DTYPES, "dtype", f"one of {sorted(models.DTYPES)}")
    need(kwargs["dtype"] == "float32" or "dtype" in models.BACKBONES[name].options,
         "dtype", f"'float32': backbone {name!r} has no dtype option")
    need(isinstance(kwargs.get("projector_bn"), bool), "projector_bn", "True or False")
    try:  # anything create_model refuses beyond the keys checked above
      models.create_model(**kwargs)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.model: {e}") from None
    object.__setattr__(self, "kwargs", kwargs)

  @classmethod
  def from_config(cls, raw: dict) -> Model:
    return cls(kwargs=dict(raw.get("model") or {}))

  @classmethod
  def config_keys(cls) -> None:
    return None  # the backbone's registry entry checks them

  def create(self):
    return models.create_model(**self.kwargs)

  def backbone(self):
    """The backbone alone (no projector), as `create()` builds it."""
    return models.create_backbone(self.kwargs["backbone"], **{
        k: v for k, v in self.kwargs.items()
        if k not in ("backbone", "projector", "projector_bn")})

  def record(self) -> dict:
    """The model keys as plain JSON values (a checkpoint must be resumed with these)."""
    out = dict(self.kwargs)
    out["projector"] = list(models.parse_projector(out["projector"]))
    return out

  @property
  def output_dim(self) -> int:
    """D, the projector's output size: the dimension of the method's statistics."""
    return models.parse_projector(self.kwargs["projector"])[-1]


@dataclasses.dataclass(frozen=True)
class Optimizer(Section):
  """The pretraining optimizer and its learning-rate schedule."""
  name: str = checked(one_of(OPTIMIZERS), key="optimizer")
  learning_rate: float = checked(POSITIVE)  # for base_batch_size; scaled to batch_size
  base_batch_size: int = checked(POSITIVE_INT)
  batch_size: int = checked(POSITIVE_INT)  # the global batch
  num_epochs: int = checked(POSITIVE_INT)
  min_learning_rate: float = checked(NON_NEGATIVE)
  warmup_epochs: float = checked(NON_NEGATIVE)
  warmup_start_lr: float = checked(NON_NEGATIVE)
  momentum: float = checked(MOMENTUM)
  weight_decay: float = checked(NON_NEGATIVE)
  lars_eta: float = checked(NON_NEGATIVE)
  adam_b1: float = checked(BETA)  # adamw's moment decays
  adam_b2: float = checked(BETA)
  # > 0: gradients clipped to this global norm; 0: not clipped
  grad_clip_norm: float = checked(Check(NON_NEGATIVE.ok,
                                        "a number >= 0 (0: no clipping), e.g. 1.0"))


@dataclasses.dataclass(frozen=True)
class Train(Section):
  """The pretraining loop: how long, and what it writes when."""
  batch_size: int = checked(POSITIVE_INT)
  num_epochs: int = checked(POSITIVE_INT)
  max_steps: int = checked(STEP_LIMIT)
  seed: int = checked(Check(is_int, "an integer"))
  log_every_steps: int = checked(POSITIVE_INT)
  checkpoint_every_steps: int = checked(POSITIVE_INT)
  keep_checkpoints: int = checked(POSITIVE_INT)
  spectrum_every_steps: int = checked(POSITIVE_INT)
  profile_steps: int = checked(Check(lambda v: is_int(v) and v >= 0,
                                     "an integer >= 0 (0: no profile)"))


@dataclasses.dataclass(frozen=True)
class Divergence(Section):
  """The check of the updated state before every pretraining checkpoint (run/health.py):
  non-finite values always stop the run; with `enabled`, so do these thresholds."""
  PATH = "divergence"
  enabled: bool = checked(BOOL)
  # the parameters' global norm over the seeded initialisation's
  max_norm_ratio: float = checked(Check(lambda v: is_number(v) and v > 1,
                                        "a number > 1, e.g. 1e3"))
  # CorInfoMax: every covariance eigenvalue below this times eps
  floor_factor: float = checked(Check(NON_NEGATIVE.ok,
                                      "a number >= 0, e.g. 10 (0: no collapse check)"))


class Monitor(Section):
  """An evaluator's section that pretraining runs every `every_epochs` when
  config.eval.monitors lists it."""

  def check_listed(self) -> None:
    """ConfigError when config.eval.monitors lists this monitor but it cannot run."""


@dataclasses.dataclass(frozen=True)
class Knn(Monitor):
  """kNN on the frozen backbone's features: the monitor and --mode=knn_eval."""
  PATH = "eval.knn"
  every_epochs: float = checked(Check(NON_NEGATIVE.ok,
                                      "a number >= 0 (0: no kNN monitor)"))
  ks: tuple[int, ...] = checked(Check(
      lambda v: all_positive(v, is_int),
      "positive integers, one or a tuple, e.g. (10, 20, 100, 200)"), key="k")
  temperatures: tuple[float, ...] = checked(Check(
      lambda v: all_positive(v, is_number),
      "positive numbers, one or a tuple, e.g. 0.07"), key="temperature")
  max_train_examples: int = checked(SPLIT_LIMIT)  # -1: the whole split
  # The monitor during pretraining: its bank and queries at most (-1: max_train_examples,
  # and the whole eval split).
  monitor_max_train_examples: int = checked(SPLIT_LIMIT)
  monitor_max_test_examples: int = checked(SPLIT_LIMIT)

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "ks", as_tuple(self.ks))
    object.__setattr__(self, "temperatures",
                       tuple(float(t) for t in as_tuple(self.temperatures)))


@dataclasses.dataclass(frozen=True)
class OnlineProbe(Monitor):
  """A linear probe trained alongside pretraining, and its test as a monitor."""
  PATH = "eval.online_probe"
  enabled: bool = checked(BOOL)
  lr: float = checked(POSITIVE)
  # test top-1 cadence when listed in eval.monitors; 0: off
  every_epochs: float = checked(Check(NON_NEGATIVE.ok, "a number >= 0 (0: no test of "
                                      "the online probe during pretraining)"))

  def check_listed(self) -> None:
    if not self.enabled:
      raise ConfigError("config.eval.monitors lists 'online_probe', but "
                        "config.eval.online_probe.enabled is False: the monitor tests "
                        "the probe that pretraining trains; enable it or drop the "
                        "monitor")


@dataclasses.dataclass(frozen=True)
class Linear(Section):
  """--mode=linear_eval: a linear probe on the frozen backbone."""
  PATH = "eval.linear"
  epochs: int = checked(POSITIVE_INT)
  batch_size: int = checked(POSITIVE_INT)
  lr: float = checked(POSITIVE)
  min_lr: float = checked(NON_NEGATIVE)
  schedule: str = checked(one_of(LINEAR_SCHEDULES))
  step_epochs: int = checked(POSITIVE_INT)
  weight_decay: float = checked(NON_NEGATIVE)
  momentum: float = checked(MOMENTUM)
  precomputed: bool = checked(BOOL)
  max_steps: int = checked(STEP_LIMIT)


def _is_subdir(v) -> bool:
  return (isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", v) is not None
          and v not in (".", "..") and v not in WORKDIR_NAMES)


@dataclasses.dataclass(frozen=True)
class Finetune(Section):
  """--mode=finetune: the whole network on a labelled subset."""
  PATH = "eval.finetune"
  label_fraction: float = checked(Check(lambda v: is_number(v) and 0 < v <= 1,
                                        "a number in (0, 1], e.g. 0.01 or 0.1"))
  label_file: str | None = checked(Check(
      lambda v: v is None or is_name(v),
      "None or the path of a text file of image file names, one per line"))
  epochs: int = checked(POSITIVE_INT)
  batch_size: int = checked(POSITIVE_INT)
  backbone_lr: float = checked(POSITIVE)
  head_lr: float = checked(POSITIVE)
  weight_decay: float = checked(NON_NEGATIVE)
  max_steps: int = checked(STEP_LIMIT)
  schedule: str = checked(one_of(FINETUNE_SCHEDULES))
  step_epochs: int = checked(POSITIVE_INT)
  backbone_step_factor: float = checked(STEP_FACTOR)
  head_step_factor: float = checked(STEP_FACTOR)
  head_init: str = checked(one_of(FINETUNE_HEAD_INITS))
  crop_interpolation: str = checked(one_of(CROP_INTERPOLATIONS))
  momentum: float = checked(MOMENTUM)
  evaluate_every_epoch: bool = checked(BOOL)
  # <workdir>/<subdir>/: checkpoints and events; <workdir>/<subdir>.json
  subdir: str = checked(Check(
      _is_subdir, "a folder name of letters, digits, '_', '-' or '.', not one the "
      f"workdir holds already ({', '.join(WORKDIR_NAMES)}), e.g. 'finetune' or "
      "'finetune_semi1'"))


@dataclasses.dataclass(frozen=True)
class Eval(Section):
  """config.eval: the keys evaluators share, then one section per evaluator: a field
  typed `Monitor` is a monitor's (EVAL_SECTIONS)."""
  PATH = "eval"
  batch_size: int = checked(POSITIVE_INT)
  monitors: tuple[str, ...]  # names from EVAL_SECTIONS, checked below
  random_init: bool = checked(BOOL)
  embed_split: str | None = checked(Check(lambda v: v is None or is_name(v),
                                          "None (config.eval_split) or a split name"))
  knn: Knn
  online_probe: OnlineProbe
  linear: Linear
  finetune: Finetune

  def __post_init__(self):
    super().__post_init__()
    if not (isinstance(self.monitors, (tuple, list))
            and set(self.monitors) <= set(EVAL_SECTIONS)):
      self.refuse("monitors", f"a tuple of evaluator names from {list(EVALUATORS)}")
    object.__setattr__(self, "monitors", tuple(self.monitors))
    for name in self.monitors:
      getattr(self, name).check_listed()


# The monitors' sections by name, as config.eval.monitors names them.
EVAL_SECTIONS = {name: cls for name, cls in typing.get_type_hints(Eval).items()
                 if isinstance(cls, type) and issubclass(cls, Monitor)}
EVALUATORS = tuple(EVAL_SECTIONS)  # what config.eval.monitors may list


@dataclasses.dataclass(frozen=True)
class Settings:
  """The whole run, resolved: each field is the section one part of the library reads."""
  data: Data
  model: Model
  method: Any  # a methods.Method, e.g. methods.CorInfoMax(alpha=..., ...)
  optimizer: Optimizer
  train: Train
  divergence: Divergence
  eval: Eval
  seed: int
  record: dict  # the resolved configuration as JSON values (config.json)

  def __post_init__(self):
    """What no one section can check: the backbone takes config.image_size (a ViT's
    patch size must divide it)."""
    kwargs = dict(self.model.kwargs)
    size = self.data.image_size
    try:
      models.check_image_size(kwargs.pop("backbone"), size, **kwargs)
    except ValueError as e:
      raise ConfigError(f"config.image_size = {size} is invalid: {e}; set "
                        "config.image_size or config.model.patch_size so that it is"
                        ) from None


# --------------------------------------------------------------------------- keys


def moved_key(path: str) -> str:
  """Where the config key `path` (dotted) is now: MOVED_KEYS' entry, or `path`."""
  return MOVED_KEYS.get(path, path)


def moved_keys_applied(raw: dict) -> dict:
  """A copy of the config dict `raw` with keys of earlier versions in their new place.

  An old key that holds a value moves it (and says so once in the log); a value given
  both ways keeps the old key's, as the command line's translation does.
  """
  raw = copy.deepcopy(raw)
  for old, new in MOVED_KEYS.items():
    *old_parents, old_leaf = old.split(".")
    parent = walk(raw, old_parents)
    if parent is None or old_leaf not in parent or isinstance(parent[old_leaf], dict):
      continue
    value = parent.pop(old_leaf)
    *new_parents, new_leaf = new.split(".")
    target = raw
    for key in new_parents:
      target = target.setdefault(key, {})
    target[new_leaf] = value
    logging.info("config.%s is now config.%s.", old, new)
  return raw


def known_keys() -> dict[str, set[str]]:
  """Every key resolve reads, by section ("" the top level): the sections' fields and
  the methods' sections; config.model's keys are the backbone registry's to check,
  config.aug's the recipe's."""
  known = {"": {"method", *methods_lib.METHODS}}
  for cls in _sections(Settings):
    parent, _, name = cls.PATH.rpartition(".")
    known.setdefault(parent, set()).update([name] if name else [])
    if cls.config_keys() is not None:
      known.setdefault(cls.PATH, set()).update(cls.config_keys())
  known.update({name: set(methods_lib.hyperparameters(name))
                for name in methods_lib.METHODS})
  return known


def _sections(cls):
  """Every Section class under the dataclass `cls`, depth first."""
  for name in fields(cls):
    sub = subsection(cls, name)
    if sub:
      yield sub
      yield from _sections(sub)


def unknown_key(path: str, known: Iterable[str], given: str | None = None) -> str:
  """The one message for a config key `path` ("eval.knn.kk") that no part of the
  library reads, naming the closest of the `known` dotted keys (keys of earlier versions
  by their place now) and the flag that `given` it, if any."""
  names = {**MOVED_KEYS, **{k: k for k in known}}  # as matched -> as named
  names = {k: v for k, v in names.items() if not path.startswith(k + ".")}
  shown = dict.fromkeys("config." + names[k] for k in _closest(path, list(names)))
  return (f"unknown config key config.{path}{f' ({given})' if given else ''}: no part "
          f"of the library reads it; closest existing keys: {', '.join(shown)}.")


def _closest(path: str, names: list[str]) -> list[str]:
  """Up to 3 of the dotted `names` closest to `path`: the keys of its section by their
  last part; else any key whole; else any by its last part (a typo in a section's
  name); else the nearest of its section's keys, or of all."""
  def last(k):
    return k.rpartition(".")[2]

  section = path.rpartition(".")[0]
  siblings = {last(k): k for k in names if k.rpartition(".")[0] == section}
  lasts = {}
  for k in names:
    lasts.setdefault(last(k), k)
  match = difflib.get_close_matches
  close = [siblings[k] for k in match(last(path), siblings, 3, 0.5)]
  close = close or match(path, names, 3, 0.6)
  close = close or [lasts[k] for k in match(last(path), lasts, 3, 0.6)]
  return close or match(path, list(siblings.values()) or names, 3, 0.0)


def _check_known_keys(raw: dict) -> None:
  """ConfigError naming a key that no part of the library reads (a typo, or a key set
  in a config file that nothing would have used), with the closest known keys."""
  known = known_keys()
  paths = [f"{s}.{k}" if s else k for s, keys in known.items() for k in keys]
  for section, keys in known.items():
    tree = walk(raw, section.split(".") if section else [])
    for key in sorted(set(tree or {}) - keys):
      raise ConfigError(unknown_key(f"{section}.{key}" if section else key, paths))


# --------------------------------------------------------------------------- resolve


def resolve(config) -> Settings:
  """The checked, typed settings of `config` (an ml_collections ConfigDict or a dict).

  Raises ConfigError naming the first value that cannot work, or a key nothing reads.
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  raw = moved_keys_applied(raw)
  _check_known_keys(raw)
  model = Model.from_config(raw)
  method = _method(raw)
  data = Data.from_config(raw)
  train = Train.from_config(raw)
  record = json.loads(json.dumps(raw, default=_json_value))
  return Settings(data=data, model=model, method=method,
                  optimizer=Optimizer.from_config(raw), train=train,
                  divergence=Divergence.from_config(raw), eval=Eval.from_config(raw),
                  seed=train.seed, record=record)


def _json_value(value):
  return list(value) if isinstance(value, tuple) else str(value)


def _method(raw: dict):
  """config.method's object, from its section; another method's section must keep its
  defaults (a run never silently ignores a key)."""
  name = raw.get("method", "corinfomax")
  if name not in methods_lib.METHODS:
    raise ConfigError(f"config.method = {name!r} is invalid: expected one of "
                      f"{sorted(methods_lib.METHODS)}")
  for other in sorted(methods_lib.METHODS):
    if other == name or other not in raw:
      continue
    defaults = methods_lib.hyperparameters(other)
    changed = sorted(k for k, v in raw[other].items() if defaults.get(k, v) != v)
    if changed:
      raise ConfigError(
          f"config.{other}.{changed[0]} is set, but config.method = {name!r}: a method "
          f"reads only its own section (config.{name}: "
          f"{', '.join(sorted(methods_lib.hyperparameters(name)))}). Set "
          f"config.method={other!r}, or drop the {other} keys.")
  try:
    return methods_lib.create_method(name, **raw.get(name, {}))
  except ValueError as e:
    raise ConfigError(
        f"config.{e}".replace(f"config.{name}: ", f"config.{name}.")) from None
