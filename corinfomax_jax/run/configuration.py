"""Configuration checks: every value a run reads is checked here, before any work.

Errors name the key, the value and what would be accepted (`errors.ConfigError`).
Model keys live under `config.model` and are passed as `models.create_model(
**config.model)`; the flat names of earlier versions (`--config.projector=...`) are
translated on the command line by `translate_moved_flags`.
"""
from __future__ import annotations

import difflib
import math
import re

from absl import logging

from corinfomax_jax.data import augment
from corinfomax_jax import models
from corinfomax_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "lars")
LINEAR_SCHEDULES = ("cosine", "step", "constant")
EVALUATORS = ("knn", "online_probe")  # what config.eval.monitors may list
# Flat keys of earlier versions -> their place under config.model.
MOVED_KEYS = {"model": "backbone", "cifar_stem": "cifar_stem", "width": "width",
              "projector": "projector", "projector_bn": "projector_bn", "dtype": "dtype"}
_PROJECTOR_STRING = re.compile(r"[0-9]+(-[0-9]+)*")


def translate_moved_flags(argv: list[str]) -> list[str]:
  """Rewrites `--config.<flat model key>` flags to `--config.model.<key>`.

  `--config.projector=2048-2048-64` becomes `--config.model.projector=(2048,2048,64)`;
  a projector string given to the new key is converted the same way.
  """
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    match = re.fullmatch(r"--config\.([A-Za-z_.]+)(=.*)?", arg)
    if not match or i == 0:
      out.append(arg)
      i += 1
      continue
    key, value = match.group(1), match.group(2)
    if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      value, i = "=" + argv[i + 1], i + 1
    i += 1
    if key in MOVED_KEYS:
      new = f"model.{MOVED_KEYS[key]}"
      logging.info("--config.%s is now --config.%s.", key, new)
      key = new
    if value is None:
      out.append(f"--config.{key}")
      continue
    value = value[1:]
    if key == "model.projector" and _PROJECTOR_STRING.fullmatch(value):
      value = "(" + ",".join(value.split("-")) + ",)"
    out.append(f"--config.{key}={value}")
  return out


def dotted_keys(config, prefix: str = "") -> list[str]:
  """Every key path of a ConfigDict, sections and leaves: ["eval", "eval.knn_k", ...]."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items") and not isinstance(value, dict):  # a nested ConfigDict
      out.extend(dotted_keys(value, prefix + key + "."))
  return out


def unknown_override(config, argv: list[str]) -> str | None:
  """A one-line error for the first `--config.<key>` in argv that config lacks, or None.

  It names the key and the closest existing key paths.
  """
  known = dotted_keys(config)
  for arg in argv[1:]:
    match = re.fullmatch(r"--config\.([^=\[]+)(\[.*)?(=.*)?", arg)
    if not match or match.group(1) in known:
      continue
    key = match.group(1)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # a typo in the section name: compare the last part alone
      last = {k.rsplit(".", 1)[-1]: k for k in known}
      close = [last[k] for k in difflib.get_close_matches(key.rsplit(".", 1)[-1], last,
                                                           n=3, cutoff=0.6)]
    close = close or difflib.get_close_matches(key, known, n=3, cutoff=0.0)
    return (f"unknown config key config.{key} ({arg}); closest existing keys: "
            f"{', '.join('config.' + k for k in close)}.")
  return None


def model_kwargs(config) -> dict:
  """config.model as keyword arguments of `models.create_model`."""
  return config.model.to_dict()


def create_model(config) -> models.CorInfoMaxModel:
  return models.create_model(**model_kwargs(config))


def validate_model_config(config) -> None:
  """Raises ConfigError naming the first config.model value that cannot work."""
  need, is_int, _ = _checker(config.model, "model.")
  need(config.model.backbone in models.BACKBONES, "backbone",
       f"one of {sorted(models.BACKBONES)}")
  need(is_int("width") and config.model.width > 0, "width",
       "a positive integer (64 is torchvision's)")
  try:
    models.parse_projector(config.model.projector)
  except ValueError:
    need(False, "projector", "positive integers, hidden sizes then the output dim D, "
         "e.g. (2048, 2048, 64)")
  need(config.model.dtype in models.DTYPES, "dtype", f"one of {sorted(models.DTYPES)}")
  for key in ("cifar_stem", "projector_bn"):
    need(isinstance(config.model[key], bool), key, "True or False")


def model_record(config) -> dict:
  """The model keys as plain JSON values (a checkpoint must be resumed with these)."""
  kw = model_kwargs(config)
  kw["projector"] = list(models.parse_projector(kw["projector"]))
  return kw


def aug_overrides(config) -> dict | None:
  """config.aug: overrides of the paper's augmentation numbers (None: the paper's).

  The configs hold the whole recipe, so every key overrides; an unset key (mean and
  std by default) leaves the data set's own value.
  """
  return {k: v for k, v in config.aug.to_dict().items() if v is not None} or None


def aug_recipe(config) -> dict:
  """The two-view recipe of config.dataset with config.aug applied, checked."""
  try:
    return augment.resolve(config.dataset, aug_overrides(config))
  except ValueError as e:
    raise ConfigError(f"config.aug: {e}") from None


def normalization(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel that the device applies to every image."""
  recipe = aug_recipe(config)
  return tuple(recipe["mean"]), tuple(recipe["std"])


def _checker(section, prefix):
  def need(ok, key, accepted):
    if not ok:
      raise ConfigError(
          f"config.{prefix}{key} = {section[key]!r} is invalid: expected {accepted}")

  def is_int(key):
    return isinstance(section[key], int) and not isinstance(section[key], bool)

  def is_number(key):
    v = section[key]
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

  return need, is_int, is_number


def validate_config(config) -> None:
  """Raises ConfigError naming the first value of `config` that cannot work."""
  validate_model_config(config)
  need, is_int, is_number = _checker(config, "")
  need(config.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
  for key in ("batch_size", "base_batch_size", "num_epochs", "image_size",
              "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
              "spectrum_every_steps"):
    need(is_int(key) and config[key] > 0, key, "a positive integer")
  need(is_int("max_steps") and (config.max_steps == -1 or config.max_steps > 0),
       "max_steps", "a positive integer, or -1 for no limit")
  need(is_int("profile_steps") and config.profile_steps >= 0, "profile_steps",
       "an integer >= 0 (0: no profile)")
  need(is_number("learning_rate") and config.learning_rate > 0, "learning_rate",
       "a positive number")
  for key in ("min_learning_rate", "warmup_start_lr", "weight_decay", "alpha", "eps",
              "warmup_epochs", "lars_eta"):
    need(is_number(key) and config[key] >= 0, key, "a number >= 0")
  for key in ("momentum", "la_R", "la_mu"):
    need(is_number(key) and 0 <= config[key] < 1, key, "a number in [0, 1)")
  need(is_number("r_init") and config.r_init > 0, "r_init", "a positive number")
  need(isinstance(config.dataset, str) and config.dataset, "dataset",
       "a TFDS name, 'imagenet100', or 'folder:<root>'")
  aug_recipe(config)
  validate_eval_config(config)


def validate_eval_config(config) -> None:
  """Raises ConfigError naming the first config.eval value that cannot work."""
  ev = config.eval
  need, is_int, is_number = _checker(ev, "eval.")
  for key in ("batch_size", "linear_epochs", "linear_batch_size", "finetune_epochs",
              "finetune_batch_size",
              "linear_step_epochs"):
    need(is_int(key) and ev[key] > 0, key, "a positive integer")
  need(is_int("knn_every_epochs") and ev.knn_every_epochs >= 0, "knn_every_epochs",
       "an integer >= 0 (0: no kNN monitor)")
  for key in ("max_train_examples", "linear_max_steps", "finetune_max_steps"):
    need(is_int(key) and (ev[key] == -1 or ev[key] > 0), key,
         "a positive integer, or -1 for no limit")
  positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  positive = lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) and v > 0)
  for key, ok, what in (("knn_k", positive_int, "positive integers"),
                        ("knn_temperature", positive, "positive numbers")):
    values = ev[key] if isinstance(ev[key], (tuple, list)) else (ev[key],)
    need(len(values) > 0 and all(ok(v) for v in values), key,
         f"{what}, one or a tuple, e.g. {(10, 20, 100, 200) if key == 'knn_k' else 0.07}")
  for key in ("linear_lr", "online_probe_lr", "finetune_backbone_lr", "finetune_head_lr"):
    need(is_number(key) and ev[key] > 0, key, "a positive number")
  for key in ("linear_min_lr", "linear_weight_decay", "finetune_weight_decay"):
    need(is_number(key) and ev[key] >= 0, key, "a number >= 0")
  need(is_number("linear_momentum") and 0 <= ev.linear_momentum < 1, "linear_momentum",
       "a number in [0, 1)")
  need(ev.linear_schedule in LINEAR_SCHEDULES, "linear_schedule",
       f"one of {list(LINEAR_SCHEDULES)}")
  need(isinstance(ev.random_init, bool), "random_init", "True or False")
  need(isinstance(ev.linear_precomputed, bool), "linear_precomputed", "True or False")
  need(isinstance(ev.online_probe, bool), "online_probe", "True or False")
  need(ev.embed_split is None or (isinstance(ev.embed_split, str) and ev.embed_split),
       "embed_split", "None (config.eval_split) or a split name")
  need(isinstance(ev.monitors, (tuple, list)) and set(ev.monitors) <= set(EVALUATORS),
       "monitors", f"a tuple of evaluator names from {list(EVALUATORS)}")
  need(ev.online_probe or "online_probe" not in ev.monitors, "monitors",
       "no 'online_probe' unless config.eval.online_probe=True (the probe it tests)")
