"""The configuration, checked once and turned into typed, frozen sections.

A mode calls `resolve(config)` first: every value a run reads is checked here, before
any work, and errors name the key, the value and what would be accepted
(`errors.ConfigError`). Each part of the library then receives only its own section:
the model `Settings.model`, the method its own object (`Settings.method`), the input
`Settings.data` (with the augmentation recipe resolved once), each evaluator its own
section of `Settings.eval`.

Keys of earlier versions (flat model keys, top-level CorInfoMax keys, flat `eval.*`
keys) are moved to their sections by `MOVED_KEYS`, on the command line
(`command_line.translate_moved_flags`) and in config files alike.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
from typing import Any

from absl import logging

from corinfomax_jax import methods as methods_lib
from corinfomax_jax import models
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "lars", "lars_optax", "adamw")
LINEAR_SCHEDULES = ("cosine", "step", "constant")
FINETUNE_SCHEDULES = ("cosine", "step")
FINETUNE_HEAD_INITS = ("zeros", "normal")
CROP_INTERPOLATIONS = ("bicubic", "bilinear")
EVALUATORS = ("knn", "online_probe")  # what config.eval.monitors may list
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
class Data:
  """What the input reads and how its views are made."""
  dataset: str  # a TFDS name, "imagenet100", or "folder:<root>"
  data_dir: str | None
  train_split: str
  eval_split: str
  image_size: int
  skip_bad_images: bool
  recipe: dict  # recipe.resolve(dataset, config.aug): the whole two-view recipe

  @property
  def mean(self) -> tuple[float, ...]:
    return tuple(self.recipe["mean"])

  @property
  def std(self) -> tuple[float, ...]:
    return tuple(self.recipe["std"])


@dataclasses.dataclass(frozen=True)
class Model:
  """`models.create_model(**kwargs)`: config.model as checked keyword arguments."""
  kwargs: dict

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
class Optimizer:
  """The pretraining optimizer and its learning-rate schedule."""
  name: str  # sgd | lars | lars_optax | adamw
  learning_rate: float  # the peak for `base_batch_size`, scaled linearly to batch_size
  base_batch_size: int
  batch_size: int  # the global batch
  num_epochs: int
  min_learning_rate: float
  warmup_epochs: float
  warmup_start_lr: float
  momentum: float
  weight_decay: float
  lars_eta: float
  adam_b1: float  # adamw's moment decays
  adam_b2: float
  grad_clip_norm: float  # > 0: gradients clipped to this global norm; 0: not clipped


@dataclasses.dataclass(frozen=True)
class Train:
  """The pretraining loop: how long, and what it writes when."""
  batch_size: int
  num_epochs: int
  max_steps: int
  seed: int
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  spectrum_every_steps: int
  profile_steps: int


@dataclasses.dataclass(frozen=True)
class Divergence:
  """The check of the updated state before every pretraining checkpoint (run/health.py):
  non-finite values always stop the run; with `enabled`, so do these thresholds."""
  enabled: bool
  max_norm_ratio: float  # the parameters' global norm over the seeded initialisation's
  floor_factor: float  # CorInfoMax: every covariance eigenvalue below this times eps


@dataclasses.dataclass(frozen=True)
class Knn:
  every_epochs: float  # monitor cadence during pretraining; 0: off
  ks: tuple[int, ...]
  temperatures: tuple[float, ...]
  max_train_examples: int  # -1: the whole split
  # The monitor during pretraining: its bank and queries at most (-1: max_train_examples,
  # and the whole eval split).
  monitor_max_train_examples: int
  monitor_max_test_examples: int


@dataclasses.dataclass(frozen=True)
class OnlineProbe:
  enabled: bool
  lr: float
  every_epochs: float  # test top-1 cadence when listed in eval.monitors; 0: off


@dataclasses.dataclass(frozen=True)
class Linear:
  epochs: int
  batch_size: int
  lr: float
  min_lr: float
  schedule: str
  step_epochs: int
  weight_decay: float
  momentum: float
  precomputed: bool
  max_steps: int


@dataclasses.dataclass(frozen=True)
class Finetune:
  label_fraction: float
  label_file: str | None
  epochs: int
  batch_size: int
  backbone_lr: float
  head_lr: float
  weight_decay: float
  max_steps: int
  schedule: str  # FINETUNE_SCHEDULES
  step_epochs: int
  backbone_step_factor: float
  head_step_factor: float
  head_init: str  # FINETUNE_HEAD_INITS
  crop_interpolation: str  # CROP_INTERPOLATIONS
  momentum: float
  evaluate_every_epoch: bool
  subdir: str  # <workdir>/<subdir>/: checkpoints and events; <workdir>/<subdir>.json


@dataclasses.dataclass(frozen=True)
class Eval:
  batch_size: int
  monitors: tuple[str, ...]
  random_init: bool
  embed_split: str | None
  knn: Knn
  online_probe: OnlineProbe
  linear: Linear
  finetune: Finetune


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


# --------------------------------------------------------------------------- resolve


def moved_keys_applied(raw: dict) -> dict:
  """A copy of the config dict `raw` with keys of earlier versions in their new place.

  An old key that holds a value moves it (and says so once in the log); a value given
  both ways keeps the old key's, as the command line's translation does.
  """
  raw = copy.deepcopy(raw)
  for old, new in MOVED_KEYS.items():
    *old_parents, old_leaf = old.split(".")
    parent = _walk(raw, old_parents)
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


def _walk(tree: dict, keys: list[str]):
  for key in keys:
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree if isinstance(tree, dict) else None


# Every key resolve reads, by section ("" the top level); config.aug and config.model
# are checked by the augmentation recipe and the backbone registry, the methods'
# sections by the methods.
_KEYS = {
    "": ("dataset", "data_dir", "train_split", "eval_split", "image_size",
         "skip_bad_images", "aug", "model", "method", *methods_lib.METHODS, "batch_size",
         "num_epochs", "max_steps", "optimizer", "momentum", "weight_decay",
         "learning_rate", "base_batch_size", "min_learning_rate", "warmup_epochs",
         "warmup_start_lr", "lars_eta", "adam_b1", "adam_b2", "grad_clip_norm", "seed",
         "log_every_steps",
         "checkpoint_every_steps", "keep_checkpoints", "spectrum_every_steps",
         "profile_steps", "divergence", "eval"),
    "divergence": tuple(f.name for f in dataclasses.fields(Divergence)),
    "eval": ("batch_size", "monitors", "random_init", "embed_split", "knn",
             "online_probe", "linear", "finetune"),
    "eval.knn": ("every_epochs", "k", "temperature", "max_train_examples",
                 "monitor_max_train_examples", "monitor_max_test_examples"),
    "eval.online_probe": ("enabled", "lr", "every_epochs"),
    "eval.linear": tuple(f.name for f in dataclasses.fields(Linear)),
    "eval.finetune": tuple(f.name for f in dataclasses.fields(Finetune)),
}


def _check_known_keys(raw: dict) -> None:
  """ConfigError naming a key that no part of the library reads (a typo, or a key set
  in a config file that nothing would have used), with the closest known keys."""
  for section, known in _KEYS.items():
    tree = raw if not section else _walk(raw, section.split("."))
    for key in sorted(tree or {}):
      if key not in known:
        path = f"{section}.{key}" if section else key
        # Candidates: this section's keys, and keys of earlier versions (by new name).
        prefix = f"{section}." if section else ""
        candidates = {k: prefix + k for k in known}
        candidates.update({old[len(prefix):]: new for old, new in MOVED_KEYS.items()
                           if old.startswith(prefix) and "." not in old[len(prefix):]})
        close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.5)
        raise ConfigError(
            f"config.{path} is not a configuration key: no part of the library reads "
            f"it. Closest keys: {', '.join('config.' + candidates[k] for k in close)}."
            if close else
            f"config.{path} is not a configuration key: no part of the library reads "
            f"it. config{'.' + section if section else ''} has "
            f"{', '.join(sorted(known))}.")


def resolve(config) -> Settings:
  """The checked, typed settings of `config` (an ml_collections ConfigDict or a dict).

  Raises ConfigError naming the first value that cannot work, or a key nothing reads.
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  raw = moved_keys_applied(raw)
  _check_known_keys(raw)
  model = _model(raw)
  method = _method(raw)
  data = _data(raw)
  _check_image_size(model, data)
  optimizer, train = _optimization(raw)
  divergence = _divergence(raw.get("divergence", {}))
  evaluation = _eval(raw)
  record = json.loads(json.dumps(raw, default=_json_value))
  return Settings(data=data, model=model, method=method, optimizer=optimizer,
                  train=train, divergence=divergence, eval=evaluation, seed=train.seed, record=record)


def _json_value(value):
  return list(value) if isinstance(value, tuple) else str(value)


def _checker(section: dict, prefix: str):
  def need(ok, key, accepted):
    if not ok:
      raise ConfigError(
          f"config.{prefix}{key} = {section.get(key)!r} is invalid: expected {accepted}")

  def is_int(key):
    v = section.get(key)
    return isinstance(v, int) and not isinstance(v, bool)

  def is_number(key):
    v = section.get(key)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

  return need, is_int, is_number


# The keys of config.model that create_model reads itself; the others are the backbone's.
_MODEL_KEYS = ("backbone", "projector", "projector_bn", "dtype")


def _model(raw: dict) -> Model:
  """config.model, checked: the backbone's own keys (a ResNet's width and cifar_stem) by
  its entry in models.BACKBONES, which also refuses a key that backbone does not accept."""
  section = dict(raw.get("model", {}))
  need, _, _ = _checker(section, "model.")
  name = section.get("backbone")
  need(name in models.BACKBONES, "backbone", f"one of {sorted(models.BACKBONES)}")
  for key, value in section.items():
    if key not in _MODEL_KEYS:
      try:
        models.check_backbone_options(name, **{key: value})
      except ValueError as e:
        raise ConfigError(f"config.model.{key} = {value!r} is invalid: {e}") from None
  try:
    section["projector"] = models.parse_projector(section.get("projector"))
  except ValueError:
    need(False, "projector", "positive integers, hidden sizes then the output dim D, "
         "e.g. (2048, 2048, 64)")
  need(section.get("dtype") in models.DTYPES, "dtype", f"one of {sorted(models.DTYPES)}")
  need(section["dtype"] == "float32" or "dtype" in models.BACKBONES[name].options,
       "dtype", f"'float32': backbone {name!r} has no dtype option")
  need(isinstance(section.get("projector_bn"), bool), "projector_bn", "True or False")
  try:  # anything create_model refuses beyond the keys checked above
    models.create_model(**section)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None
  return Model(kwargs=section)


def _check_image_size(model: Model, data: Data) -> None:
  """ConfigError when the backbone cannot take config.image_size (a ViT's patch size
  must divide it)."""
  kwargs = {k: v for k, v in model.kwargs.items() if k != "backbone"}
  try:
    models.check_image_size(model.kwargs["backbone"], data.image_size, **kwargs)
  except ValueError as e:
    raise ConfigError(f"config.image_size = {data.image_size} is invalid: {e}; set "
                      "config.image_size or config.model.patch_size so that it is") from None


def _method(raw: dict):
  name = raw.get("method", "corinfomax")
  if name not in methods_lib.METHODS:
    raise ConfigError(f"config.method = {name!r} is invalid: expected one of "
                      f"{sorted(methods_lib.METHODS)}")
  for other in sorted(methods_lib.METHODS):
    if other == name or other not in raw:
      continue
    defaults = methods_lib.hyperparameters(other)
    changed = sorted(k for k, v in raw[other].items() if defaults.get(k, v) != v
                     or k not in defaults)
    if changed:
      raise ConfigError(
          f"config.{other}.{changed[0]} is set, but config.method = {name!r}: a method "
          f"reads only its own section (config.{name}: "
          f"{', '.join(sorted(methods_lib.hyperparameters(name)))}). Set "
          f"config.method={other!r}, or drop the {other} keys.")
  section = raw.get(name, {})
  unknown = sorted(set(section) - set(methods_lib.hyperparameters(name)))
  if unknown:
    raise ConfigError(f"config.{name}.{unknown[0]} is not a key of method {name!r}; its "
                      f"keys are {', '.join(sorted(methods_lib.hyperparameters(name)))}")
  try:
    return methods_lib.create_method(name, **section)
  except ValueError as e:
    raise ConfigError(f"config.{e}".replace(f"config.{name}: ", f"config.{name}.")) from None


def _data(raw: dict) -> Data:
  need, is_int, _ = _checker(raw, "")
  need(isinstance(raw.get("dataset"), str) and raw["dataset"], "dataset",
       "a TFDS name, 'imagenet100', or 'folder:<root>'")
  if raw["dataset"].startswith("folder:") and not raw["dataset"][len("folder:"):].strip():
    raise ConfigError(
        f"config.dataset = {raw['dataset']!r} names no image folder: give its path, "
        "--config.dataset=folder:/data/my_images or, with configs/folder.py, "
        "--config=configs/folder.py:/data/my_images (root/<split>/<class>/<image>)")
  need(is_int("image_size") and raw["image_size"] > 0, "image_size", "a positive integer")
  for key in ("train_split", "eval_split"):
    need(isinstance(raw.get(key), str) and raw[key], key, "a split name")
  need(isinstance(raw.get("skip_bad_images"), bool), "skip_bad_images", "True or False")
  overrides = {k: v for k, v in raw.get("aug", {}).items() if v is not None} or None
  try:
    recipe = recipe_lib.resolve(raw["dataset"], overrides)
  except ValueError as e:
    raise ConfigError(f"config.aug: {e}") from None
  return Data(dataset=raw["dataset"], data_dir=raw.get("data_dir"),
              train_split=raw["train_split"], eval_split=raw["eval_split"],
              image_size=raw["image_size"], skip_bad_images=raw["skip_bad_images"],
              recipe=recipe)


def _optimization(raw: dict) -> tuple[Optimizer, Train]:
  need, is_int, is_number = _checker(raw, "")
  need(raw.get("optimizer") in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
  for key in ("batch_size", "base_batch_size", "num_epochs", "checkpoint_every_steps",
              "keep_checkpoints", "log_every_steps", "spectrum_every_steps"):
    need(is_int(key) and raw[key] > 0, key, "a positive integer")
  need(is_int("max_steps") and (raw["max_steps"] == -1 or raw["max_steps"] > 0),
       "max_steps", "a positive integer, or -1 for no limit")
  need(is_int("profile_steps") and raw["profile_steps"] >= 0, "profile_steps",
       "an integer >= 0 (0: no profile)")
  need(is_int("seed"), "seed", "an integer")
  need(is_number("learning_rate") and raw["learning_rate"] > 0, "learning_rate",
       "a positive number")
  for key in ("min_learning_rate", "warmup_start_lr", "weight_decay", "warmup_epochs",
              "lars_eta"):
    need(is_number(key) and raw[key] >= 0, key, "a number >= 0")
  for key in ("adam_b1", "adam_b2"):
    need(is_number(key) and 0 <= raw[key] < 1, key, "a number in [0, 1), e.g. 0.9")
  need(is_number("grad_clip_norm") and raw["grad_clip_norm"] >= 0, "grad_clip_norm",
       "a number >= 0 (0: no clipping), e.g. 1.0")
  need(is_number("momentum") and 0 <= raw["momentum"] < 1, "momentum",
       "a number in [0, 1)")
  optimizer = Optimizer(
      name=raw["optimizer"], learning_rate=raw["learning_rate"],
      base_batch_size=raw["base_batch_size"], batch_size=raw["batch_size"],
      num_epochs=raw["num_epochs"], min_learning_rate=raw["min_learning_rate"],
      warmup_epochs=raw["warmup_epochs"], warmup_start_lr=raw["warmup_start_lr"],
      momentum=raw["momentum"], weight_decay=raw["weight_decay"],
      lars_eta=raw["lars_eta"], adam_b1=raw["adam_b1"], adam_b2=raw["adam_b2"],
      grad_clip_norm=raw["grad_clip_norm"])
  train = Train(**{f.name: raw[f.name] for f in dataclasses.fields(Train)})
  return optimizer, train


def _divergence(section: dict) -> Divergence:
  need, _, is_number = _checker(section, "divergence.")
  need(isinstance(section.get("enabled"), bool), "enabled", "True or False")
  need(is_number("max_norm_ratio") and section["max_norm_ratio"] > 1, "max_norm_ratio",
       "a number > 1, e.g. 1e3")
  need(is_number("floor_factor") and section["floor_factor"] >= 0, "floor_factor",
       "a number >= 0, e.g. 10 (0: no collapse check)")
  return Divergence(**{f.name: section[f.name] for f in dataclasses.fields(Divergence)})


def _as_tuple(value):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _eval(raw: dict) -> Eval:
  ev = raw.get("eval", {})
  need, is_int, is_number = _checker(ev, "eval.")
  need(is_int("batch_size") and ev["batch_size"] > 0, "batch_size", "a positive integer")
  need(isinstance(ev.get("monitors"), (tuple, list)) and set(ev["monitors"]) <= set(EVALUATORS),
       "monitors", f"a tuple of evaluator names from {list(EVALUATORS)}")
  need(isinstance(ev.get("random_init"), bool), "random_init", "True or False")
  embed_split = ev.get("embed_split")
  need(embed_split is None or (isinstance(embed_split, str) and embed_split),
       "embed_split", "None (config.eval_split) or a split name")
  return Eval(batch_size=ev["batch_size"], monitors=tuple(ev["monitors"]),
              random_init=ev["random_init"], embed_split=embed_split,
              knn=_knn(ev.get("knn", {})), online_probe=_online_probe(
                  ev.get("online_probe", {}), ev["monitors"]),
              linear=_linear(ev.get("linear", {})),
              finetune=_finetune(ev.get("finetune", {})))


def _knn(section: dict) -> Knn:
  need, is_int, is_number = _checker(section, "eval.knn.")
  need(is_number("every_epochs") and section["every_epochs"] >= 0, "every_epochs",
       "a number >= 0 (0: no kNN monitor)")
  for key in ("max_train_examples", "monitor_max_train_examples",
              "monitor_max_test_examples"):
    need(is_int(key) and (section[key] == -1 or section[key] > 0), key,
         "a positive integer, or -1 for the whole split")
  positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  positive = lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) and v > 0)
  ks, temperatures = _as_tuple(section.get("k")), _as_tuple(section.get("temperature"))
  need(ks and all(positive_int(v) for v in ks), "k",
       "positive integers, one or a tuple, e.g. (10, 20, 100, 200)")
  need(temperatures and all(positive(v) for v in temperatures), "temperature",
       "positive numbers, one or a tuple, e.g. 0.07")
  return Knn(every_epochs=section["every_epochs"], ks=ks,
             temperatures=tuple(float(t) for t in temperatures),
             max_train_examples=section["max_train_examples"],
             monitor_max_train_examples=section["monitor_max_train_examples"],
             monitor_max_test_examples=section["monitor_max_test_examples"])


def _online_probe(section: dict, monitors) -> OnlineProbe:
  need, _, is_number = _checker(section, "eval.online_probe.")
  need(isinstance(section.get("enabled"), bool), "enabled", "True or False")
  need(is_number("lr") and section["lr"] > 0, "lr", "a positive number")
  need(is_number("every_epochs") and section["every_epochs"] >= 0, "every_epochs",
       "a number >= 0 (0: no test of the online probe during pretraining)")
  if "online_probe" in monitors and not section["enabled"]:
    raise ConfigError("config.eval.monitors lists 'online_probe', but "
                      "config.eval.online_probe.enabled is False: the monitor tests the "
                      "probe that pretraining trains; enable it or drop the monitor")
  return OnlineProbe(**{f.name: section[f.name] for f in dataclasses.fields(OnlineProbe)})


def _linear(section: dict) -> Linear:
  need, is_int, is_number = _checker(section, "eval.linear.")
  for key in ("epochs", "batch_size", "step_epochs"):
    need(is_int(key) and section[key] > 0, key, "a positive integer")
  need(is_int("max_steps") and (section["max_steps"] == -1 or section["max_steps"] > 0),
       "max_steps", "a positive integer, or -1 for no limit")
  need(is_number("lr") and section["lr"] > 0, "lr", "a positive number")
  for key in ("min_lr", "weight_decay"):
    need(is_number(key) and section[key] >= 0, key, "a number >= 0")
  need(is_number("momentum") and 0 <= section["momentum"] < 1, "momentum",
       "a number in [0, 1)")
  need(section.get("schedule") in LINEAR_SCHEDULES, "schedule",
       f"one of {list(LINEAR_SCHEDULES)}")
  need(isinstance(section.get("precomputed"), bool), "precomputed", "True or False")
  return Linear(**{f.name: section[f.name] for f in dataclasses.fields(Linear)})


def _finetune(section: dict) -> Finetune:
  need, is_int, is_number = _checker(section, "eval.finetune.")
  for key in ("epochs", "batch_size"):
    need(is_int(key) and section[key] > 0, key, "a positive integer")
  need(is_int("max_steps") and (section["max_steps"] == -1 or section["max_steps"] > 0),
       "max_steps", "a positive integer, or -1 for no limit")
  for key in ("backbone_lr", "head_lr"):
    need(is_number(key) and section[key] > 0, key, "a positive number")
  need(is_number("weight_decay") and section["weight_decay"] >= 0, "weight_decay",
       "a number >= 0")
  need(section.get("schedule") in FINETUNE_SCHEDULES, "schedule",
       f"one of {list(FINETUNE_SCHEDULES)}")
  need(is_int("step_epochs") and section["step_epochs"] > 0, "step_epochs",
       "a positive integer")
  for key in ("backbone_step_factor", "head_step_factor"):
    need(is_number(key) and 0 < section[key] <= 1, key, "a number in (0, 1], e.g. 0.1")
  need(section.get("head_init") in FINETUNE_HEAD_INITS, "head_init",
       f"one of {list(FINETUNE_HEAD_INITS)}")
  need(section.get("crop_interpolation") in CROP_INTERPOLATIONS, "crop_interpolation",
       f"one of {list(CROP_INTERPOLATIONS)}")
  need(is_number("momentum") and 0 <= section["momentum"] < 1, "momentum",
       "a number in [0, 1)")
  need(isinstance(section.get("evaluate_every_epoch"), bool), "evaluate_every_epoch",
       "True or False")
  need(is_number("label_fraction") and 0 < section["label_fraction"] <= 1,
       "label_fraction", "a number in (0, 1], e.g. 0.01 or 0.1")
  label_file = section.get("label_file")
  need(label_file is None or (isinstance(label_file, str) and label_file), "label_file",
       "None or the path of a text file of image file names, one per line")
  subdir = section.get("subdir")
  need(isinstance(subdir, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", subdir)
       and subdir not in (".", "..") and subdir not in WORKDIR_NAMES, "subdir",
       "a folder name of letters, digits, '_', '-' or '.', not one the workdir holds "
       f"already ({', '.join(WORKDIR_NAMES)}), e.g. 'finetune' or 'finetune_semi1'")
  return Finetune(**{f.name: section[f.name] for f in dataclasses.fields(Finetune)})
