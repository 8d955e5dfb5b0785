"""The network's features on data: the evaluators' shared input plumbing.

`open_sources` opens and checks the labelled splits, `labelled_index` chooses a
labelled subset of one (restricted to it by the source's own `subset`; its file list
checked early by `check_label_file`); `feature_batches` and `extract_features` give
the backbone's centre-crop features of a split; `eval_split_sums` sums a jitted
per-batch function over a split's centre crops (the probe's test path). `Context` is
what every evaluator is built from besides its own settings section. TensorFlow is
imported only through the data modules, inside these functions.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from corinfomax_jax import files
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.run import encoder
from corinfomax_jax.run import settings as settings_lib


@dataclasses.dataclass(frozen=True)
class Context:
  """What an evaluator reads besides its own settings section: the data settings, the
  evaluation batch (config.eval.batch_size), the network and mesh, and the two splits."""
  data: settings_lib.Data
  batch_size: int
  model: Any
  mesh: Any
  train_source: Any
  eval_source: Any


def open_sources(data: settings_lib.Data, *, needs_labels: str = "evaluation (kNN, "
                 "linear probe)"):
  """(train source, eval source) of `data`, checked to have labels and share classes."""
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  train_source, eval_source = (
      sources.get_source(data.dataset, data.data_dir, split,
                         skip_bad_images=data.skip_bad_images)
      for split in (data.train_split, data.eval_split))
  for source in (train_source, eval_source):
    if source.unlabelled:
      raise ConfigError(
          f"{data.dataset} split {source.split!r} has no class directories: it serves "
          f"for pretraining, but {needs_labels} needs labels; give it "
          f"{source.split}/<class>/<image>, or switch that evaluation off.")
  if train_source.class_names != eval_source.class_names:
    only_train = sorted(set(train_source.class_names) - set(eval_source.class_names))
    only_eval = sorted(set(eval_source.class_names) - set(train_source.class_names))
    raise ConfigError(
        f"{data.dataset}: splits {data.train_split!r} ({train_source.num_classes} "
        f"classes) and {data.eval_split!r} ({eval_source.num_classes} classes) must "
        f"have the same classes, for labels to agree; only in {data.train_split!r}: "
        f"{only_train[:5]}, only in {data.eval_split!r}: {only_eval[:5]}.")
  return train_source, eval_source


def eval_split_sums(sums_fn, args, mesh: jax.sharding.Mesh, source,
                    data: settings_lib.Data, batch_size: int,
                    interpolation: str = "bicubic") -> np.ndarray:
  """sum over the centre-crop batches of `source` of sums_fn(*args, batch), in float64.

  sums_fn (jitted here: args replicated, the batch sharded over `mesh`) returns a vector
  of per-batch sums that masks the padding rows (batch["mask"]), e.g. top-k hits and
  the count of real rows. Batches of `batch_size`, views as `data.recipe` says, resized
  with `interpolation` (a key of data.crops.INTERPOLATIONS).
  """
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  fn = jax.jit(sums_fn, in_shardings=(replicated,) * len(args) + (sharded,),
               out_shardings=replicated)
  total = None
  for batch in pipeline.global_batches(
      pipeline.eval_batches(source, pipeline.BatchSpec(batch_size, data.image_size),
                            recipe_lib.views(data.recipe),
                            interpolation=interpolation), sharded):
    sums = np.asarray(jax.device_get(fn(*args, batch)), np.float64)
    total = sums if total is None else total + sums
  return total


def _evenly_spaced_subset(source, num: int):
  """`source` restricted to `num` examples spread evenly over its index range.

  Spread, not the first `num`: an image folder is sorted by class, so its first
  examples would all be of the first classes.
  """
  return source.subset((np.arange(num, dtype=np.int64) * source.num_examples) // num)


def feature_batches(model: nn.Module, variables, mesh: jax.sharding.Mesh, source, *,
                    batch_size: int, data: settings_lib.Data):
  """Yields (features [b, dim] float32, labels [b] int32, positions [b] int64) per batch.

  One pass over `source` in index order (pipeline.eval_batches: resize + centre crop),
  global batches sharded over the mesh's "data" axis, the network in inference mode.
  Each batch is gathered to every process (process_allgather), one batch behind the
  computation, so devices hold one batch at a time and hosts one batch's rows.
  Padding rows and images skipped as unreadable are dropped; `positions` are the
  surviving rows' places in the pass, which for a random-access source are their
  example indices in the source (for a streamed source, their order of arrival).
  """
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.global_batches(
      pipeline.eval_batches(source, pipeline.BatchSpec(batch_size, data.image_size),
                            recipe_lib.views(data.recipe)),
      mesh_lib.batch_sharded(mesh))
  features_fn = encoder.features_fn(model, mesh, (data.mean, data.std))

  def fetch(pending, b):
    f, label, mask = multihost_utils.process_allgather(pending, tiled=True)
    keep = mask > 0
    positions = b * batch_size + np.arange(len(mask), dtype=np.int64)
    return (np.asarray(f[keep], np.float32), np.asarray(label[keep], np.int32),
            positions[keep])

  pending = None
  for b, batch in enumerate(batches):
    computed = (features_fn(variables, batch["image"]), batch["label"], batch["mask"])
    if pending is not None:
      yield fetch(pending, b - 1)
    pending = computed
  if pending is not None:
    yield fetch(pending, b)


def extract_features(model: nn.Module, variables, mesh: jax.sharding.Mesh, source, *,
                     batch_size: int, data: settings_lib.Data,
                     max_examples: int = -1) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, dim] float32, labels [n] int32) of `source`, centre crops, on every host.

  The batches of `feature_batches`, concatenated: hosts hold all n rows, n * dim * 4
  bytes, 10.5 GB per host for ImageNet-1K with ResNet-50 (2048-d).
  max_examples (-1: all) keeps that many examples spread evenly over the split.
  """
  limit = source.num_examples if max_examples == -1 else min(max_examples,
                                                             source.num_examples)
  if limit < source.num_examples and source.random_access:
    source = _evenly_spaced_subset(source, limit)
  # A streamed source cannot be subset by index: it stops after its first `limit` rows.
  feats, labels, count = [], [], 0
  for f, label, _ in feature_batches(model, variables, mesh, source,
                                     batch_size=batch_size, data=data):
    feats.append(f)
    labels.append(label)
    count += len(label)
    if count >= limit:  # same count on every process: they all stop here
      break
  if not feats:
    raise ValueError(f"{source.name} split {source.split!r} gave no examples")
  return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]


def _labels_of(source) -> np.ndarray:
  """Labels of every example of a random-access source, read in chunks."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  parts = [source.load_batch(tf.range(s, min(s + 65536, source.num_examples),
                                      dtype=tf.int64))[1].numpy()
           for s in range(0, source.num_examples, 65536)]
  return np.concatenate(parts).astype(np.int64)


def check_label_file(label_file: str | None) -> None:
  """config.eval.finetune.label_file, when one is named, must be a file; ConfigError in
  one line (checked before any model work)."""
  if label_file is not None and not files.as_path(label_file).is_file():
    raise ConfigError(f"config.eval.finetune.label_file = {label_file!r} is not a file: "
                      "expected None or a text file of image file names, one per line")


def labelled_index(source, *, fraction: float, label_file: str | None,
                   seed: int) -> np.ndarray:
  """Sorted example indices of the labelled subset of `source`.

  label_file: the examples whose file names (the last path component, e.g. SimCLR's
  published ImageNet 1%/10% lists) it lists, one per line; image folders and TFDS data
  sets with a `file_name` feature (imagenet2012). Otherwise a class-balanced subset:
  round(fraction * n_c) examples (at least one) of each class c with n_c examples,
  chosen by a permutation seeded with `seed`.
  """
  if label_file:
    if not source.has_file_names:
      raise ConfigError(f"config.eval.finetune.label_file needs file names, which {source.name!r} "
                        "does not have: use an image folder (folder:<root>) or a TFDS "
                        "data set with a file_name feature, such as imagenet2012.")
    text = files.as_path(label_file).read_text()
    wanted = {line.strip() for line in text.splitlines() if line.strip()}
    if not wanted:
      raise ConfigError(
          f"config.eval.finetune.label_file = {label_file!r} is empty (no file names in "
          "it): expected image file names, one per line, or None for a class-balanced "
          "subset of config.eval.finetune.label_fraction.")
    names = source.file_names()
    index = np.array([i for i, name in enumerate(names) if name in wanted], np.int64)
    missing = wanted - set(names)
    if missing:
      raise ConfigError(
          f"config.eval.finetune.label_file {label_file!r}: {len(missing)} of its {len(wanted)} "
          f"names are not in {source.name} {source.split!r} (e.g. "
          f"{sorted(missing)[:3]}).")
    counts = collections.Counter(names[i] for i in index)
    shared = sorted(name for name, count in counts.items() if count > 1)
    if shared:
      logging.warning(
          "config.eval.finetune.label_file %r: %d of its %d names each match several "
          "images of %s %r (e.g. %r: %d images), so %d examples are labelled for %d "
          "names; every match is used. Give each image a unique file name to label one.",
          label_file, len(shared), len(wanted), source.name, source.split, shared[0],
          counts[shared[0]], len(index), len(wanted))
    return index
  labels = _labels_of(source)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(source.num_classes):
    members = np.flatnonzero(labels == c)
    if len(members):
      take = max(1, round(fraction * len(members)))
      chosen.append(rng.permutation(members)[:take])
  return np.sort(np.concatenate(chosen))
