"""The run record: the whole resolved configuration in workdir/config.json.

Written by process 0 when pretraining starts, and as TensorBoard hparams. A resume
whose configuration differs from the record in a key that changes results says so in
one warning line, naming each changed key with its old and new value.
"""
from __future__ import annotations

import json

from absl import logging
import jax

from corinfomax_jax import files
from corinfomax_jax import methods
from corinfomax_jax.run import settings
from corinfomax_jax.run import writers as metrics

RECORD = "config.json"
# Keys whose change makes a resumed run differ from an uninterrupted one.
RESULT_KEYS = frozenset((
    "method", "learning_rate",
    "base_batch_size", "batch_size", "optimizer", "momentum", "weight_decay",
    "warmup_epochs", "min_learning_rate", "num_epochs", "seed", "dataset", "image_size",
    "adam_b1", "adam_b2", "grad_clip_norm"))
# Result keys added after the first records, with the value earlier runs had in effect.
LATER_KEYS = {"adam_b1": 0.9, "adam_b2": 0.999, "grad_clip_norm": 0.0}
# The model and the augmentation; and the section of the run's method (config.method).
RESULT_PREFIXES = ("model.", "aug.")


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"model": {"width": 8}} -> {"model.width": 8}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _changes_results(key: str, method: str) -> bool:
  return key in RESULT_KEYS or key.startswith(RESULT_PREFIXES + (f"{method}.",))


def changed_result_keys(old: dict, new: dict) -> list[str]:
  """'key old -> new' for each key that changes results and differs (flat dicts): the
  RESULT_KEYS, the model and augmentation keys, and those of the new run's method."""
  method = new.get("method", "corinfomax")
  keys = sorted(k for k in old.keys() | new.keys() if _changes_results(k, method))
  return [f"{k} {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in keys
          if old.get(k, "(absent)") != new.get(k, "(absent)")]


def _with_method_defaults(flat: dict) -> dict:
  """`flat` (result values) with its method's hyperparameters and the LATER_KEYS that it
  lacks at their defaults: a key a later version added (stats_dtype, grad_clip_norm,
  say) is absent from earlier records, and its default is what those runs did."""
  method = flat.get("method", "corinfomax")
  if method not in methods.METHODS:
    return flat
  defaults = {f"{method}.{k}": v for k, v in methods.hyperparameters(method).items()}
  return {**LATER_KEYS, **defaults, **flat}


def result_values(record: dict) -> dict:
  """The flat values of `record` (a resolved configuration) that change results: what a
  checkpoint keeps of the run that wrote it, so that a resume is checked against the
  checkpoint itself, whatever became of config.json."""
  method = record.get("method", "corinfomax")
  return {k: v for k, v in flatten(record).items() if _changes_results(k, method)}


def warn_if_results_change(saved: dict | None, record: dict, where: str) -> bool:
  """Warns once, naming each key, when `record` changes values that `saved` (a
  checkpoint's result_values) was trained with; returns whether it compared at all."""
  if saved is None:
    return False
  changed = changed_result_keys(_with_method_defaults(saved), result_values(record))
  if changed:
    logging.warning("%s was trained with other values of keys that change results; this "
                    "run continues it with: %s.", where, "; ".join(changed))
  return True


def write_run_config(record: dict, workdir: str,
                     writer: metrics.MetricWriter | None = None, *,
                     compare: bool = True) -> dict:
  """Writes the resolved configuration `record` (settings.Settings.record) to
  workdir/config.json, and as hparams to `writer`; returns the record.

  An existing record that differs is kept, every generation: as config.json.1 the
  first, config.json.2 the next, and so on (the steps already in the checkpoint were
  trained under them, and overwriting would lose that). With `compare` (when the
  checkpoint itself holds no result values to compare with, as in earlier versions), a
  change of keys that change results is named in one warning; a record of an earlier
  version is compared with its keys in their new places. A record that is not JSON (a
  damaged file) is kept the same way and replaced, with one warning: the record is
  optional, the checkpoint holds the values.
  """
  if jax.process_index() != 0:
    return record
  path = files.as_path(workdir) / RECORD
  if path.exists():
    text = files.within_read_timeout(f"the run record {path}", path.read_bytes)
    try:
      previous = json.loads(text)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      kept = _keep_generation(path, text)
      logging.warning("%s is not a readable record (%s: %s); kept as %s and replaced "
                      "(the checkpoint holds the values that change results).", path,
                      type(e).__name__, str(e).splitlines()[0][:120], kept.name)
      previous = record
    if previous != record:
      # A record of an earlier version: its keys in their new places, and its method the
      # only one there was.
      comparable = {"method": "corinfomax", **settings.moved_keys_applied(previous)}
      kept = _keep_generation(path, text)
      changed = (changed_result_keys(_with_method_defaults(flatten(comparable)),
                                     flatten(record)) if compare else [])
      if changed:
        logging.warning("%s: this run changes keys that change results: %s (previous "
                        "record kept as %s).", path, "; ".join(changed), kept.name)
  metrics.write_json(path, record)
  if writer is not None:
    writer.hparams({k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                    for k, v in flatten(record).items() if v is not None})
  return record


def record_generations(workdir: str) -> list:
  """The paths of the earlier records of `workdir`, oldest first (config.json.1, ...)."""
  directory = files.as_path(workdir)
  numbered = [(int(p.name.rsplit(".", 1)[1]), p) for p in directory.glob(f"{RECORD}.*")
              if p.name.rsplit(".", 1)[1].isdigit()]
  return [p for _, p in sorted(numbered)]


def _keep_generation(path, text: bytes):
  """Writes `text` (the record being replaced) as the next config.json.<n>; its path."""
  generations = record_generations(str(path.parent))
  number = int(generations[-1].name.rsplit(".", 1)[1]) + 1 if generations else 1
  kept = path.parent / f"{RECORD}.{number}"
  files.write_bytes(kept, text)
  return kept
