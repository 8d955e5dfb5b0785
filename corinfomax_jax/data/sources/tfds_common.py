"""What the TFDS sources share: the builder, preparation on first use, class subsets.

`open_builder` finds a TFDS data set (or says which names are close), and prepares the
small public ones (cifar10, cifar100) on first use as ArrayRecord, one process per
machine, failing at once in one line when offline. `Classes` maps TFDS labels to a
run's classes (all of them, or ImageNet-100's subset of imagenet2012); which records a
subset keeps comes from the split's labels, read once (`data.labels`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import os
import re
import socket

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from corinfomax_jax import errors
from corinfomax_jax.data.sources.base import listing

IMAGENET100_CLASSES_FILE = os.path.join(  # in data/, beside this package
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "imagenet100_classes.txt")


def imagenet100_classes() -> list[str]:
  """The 100 WordNet ids of ImageNet-100 (CMC), sorted: label i is entry i."""
  with open(IMAGENET100_CLASSES_FILE) as f:
    wnids = [line.strip() for line in f if line.strip()]
  if len(set(wnids)) != 100:
    raise ValueError(f"{IMAGENET100_CLASSES_FILE} must hold 100 distinct "
                     f"wnids, holds {len(set(wnids))}.")
  return sorted(wnids)


@dataclasses.dataclass(frozen=True, eq=False)
class Classes:
  """A run's classes of a TFDS data set: label_map[tfds label] is the run's label.

  Attributes:
    names: the run's class names; label i is names[i].
    label_map: int32 [TFDS classes]; -1 for a class outside a subset.
    is_subset: whether some TFDS classes are left out (ImageNet-100).
  """
  names: tuple[str, ...]
  label_map: np.ndarray
  is_subset: bool


def classes_of(tfds_name: str, label: tfds.features.ClassLabel,
               subset: list[str] | None) -> Classes:
  """Every class of `label`, or the classes `subset` (wnids, in their order)."""
  names = list(label.names)
  if subset is None:
    return Classes(tuple(names), np.arange(len(names), dtype=np.int32), False)
  missing = sorted(set(subset) - set(names))
  if missing:
    raise ValueError(f"{tfds_name!r} lacks the classes {missing[:5]}...")
  label_map = np.full(len(names), -1, np.int32)  # labels of the subset; others -> -1
  for new, wnid in enumerate(subset):
    label_map[names.index(wnid)] = new
  return Classes(tuple(subset), label_map, True)


def open_builder(dataset: str, tfds_name: str, data_dir: str | None):
  """The TFDS builder of `tfds_name`, prepared first where it is prepared on first use."""
  return _prepare_on_first_use(dataset, tfds_name, data_dir,
                               _tfds_builder(dataset, tfds_name, data_dir))


def _tfds_builder(dataset: str, tfds_name: str, data_dir: str | None):
  if data_dir is not None and not tf.io.gfile.isdir(data_dir):
    parent = os.path.dirname(os.path.abspath(data_dir))
    raise ValueError(f"TFDS data_dir {data_dir!r} does not exist"
                     + (f"; {parent} holds: {listing(parent)}."
                        if os.path.isdir(parent) else "."))
  try:
    return tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(tfds_name.split(":")[0],
                                      tfds.list_builders(), n=5)
    raise ValueError(
        f"Unknown data set {dataset!r}. Use 'folder:<root>' for an image "
        f"folder, 'imagenet100', or a TFDS name (tfds.list_builders()); "
        f"closest TFDS names: {close}.") from None


def not_prepared(dataset, builder, split, error=None) -> ValueError:
  """The error for a TFDS data set that cannot be read, saying what exists."""
  root = os.path.dirname(os.path.dirname(str(builder.data_dir)))
  held = ([e.rstrip("/") for e in tf.io.gfile.listdir(root)
           if tf.io.gfile.isdir(os.path.join(root, e))]
          if tf.io.gfile.isdir(root) else None)
  name_dir = os.path.join(root, builder.name)
  versions = (sorted(e.rstrip("/") for e in tf.io.gfile.listdir(name_dir))
              if tf.io.gfile.isdir(name_dir) else [])
  if not builder.is_prepared():
    what = (f"{builder.name} {builder.version} is not prepared in {root}"
            + (f" (versions there: {versions})" if versions else "")
            + f"; data sets there: {sorted(held) if held else '(none)'}."
            " Prepare it first (tfds build, or download_and_prepare).")
  else:
    what = f"{error}"
  splits = list(builder.info.splits) if builder.info.splits else []
  return ValueError(f"Cannot read {dataset!r} split {split!r}: {what}"
                    + (f" Splits: {splits}." if splits else ""))


# The small public TFDS sets prepared on first use, and the host TFDS downloads each from.
DOWNLOADED_ON_FIRST_USE = {"cifar10": "www.cs.toronto.edu",
                           "cifar100": "www.cs.toronto.edu"}
DOWNLOAD_PROBE_TIMEOUT_S = 10.0
# TFDS's own download_and_prepare. tfds.testing.mock_data replaces it with a no-op (and
# mocks the reads): then there is nothing to download and no network to probe. (TFDS
# wraps the method, so each lookup gives a new wrapper: compare with ==, not is.)
_TFDS_DOWNLOAD_AND_PREPARE = tfds.core.DatasetBuilder.download_and_prepare


def _unreachable(host: str) -> str | None:
  """Why `host` cannot be reached on port 443, or None when it can.

  TFDS's own downloader retries a failed connection for minutes before it gives up;
  this answers in seconds.
  """
  try:
    with socket.create_connection((host, 443), timeout=DOWNLOAD_PROBE_TIMEOUT_S):
      return None
  except OSError as e:
    return f"{host} unreachable: {e.strerror or e}"


@contextlib.contextmanager
def _download_lock(builder):
  """One process per machine prepares a data set; the others wait, then read it."""
  root = os.path.dirname(os.path.dirname(str(builder.data_dir)))
  if "://" in root:  # a bucket: no local lock to take (preparing into one is rare)
    yield
    return
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f".{builder.name}.prepare.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_on_first_use(dataset, tfds_name, data_dir, builder):
  """Downloads and prepares a small public set (cifar10, cifar100) as ArrayRecord.

  Returns the builder of the prepared set, or `builder` unchanged for any other data
  set (its not-prepared error says how to build it). Offline, fails at once in one line
  that says how to provide the data.
  """
  host = DOWNLOADED_ON_FIRST_USE.get(builder.name)
  if (host is None or builder.is_prepared()
      or type(builder).download_and_prepare != _TFDS_DOWNLOAD_AND_PREPARE):
    return builder
  root = os.path.dirname(os.path.dirname(str(builder.data_dir)))
  why = _unreachable(host)
  if why is not None:
    raise errors.ConfigError(
        f"{builder.name} is not prepared in {root} and cannot be downloaded ({why}). "
        f"Provide it: run `tfds build {builder.name} --data_dir=DIR "
        f"--file_format=array_record` on a machine with internet and pass "
        f"--config.data_dir=DIR, or give an image folder with "
        f"--config.dataset=folder:<root> (<root>/<split>/<class>/<image>).")
  with _download_lock(builder):
    builder = _tfds_builder(dataset, tfds_name, data_dir)  # another process may be done
    if not builder.is_prepared():
      logging.info("Downloading %s from %s and preparing it as ArrayRecord in %s "
                   "(first use only).", builder.name, host, root)
      try:
        builder.download_and_prepare(file_format="array_record")
      except Exception as e:  # pylint: disable=broad-except
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise errors.ConfigError(
            f"Downloading and preparing {builder.name} into {root} failed: "
            f"{type(e).__name__}: {first_line} Run `tfds build {builder.name} "
            f"--data_dir=DIR --file_format=array_record` and pass --config.data_dir=DIR."
        ) from None
  return _tfds_builder(dataset, tfds_name, data_dir)


def base_split(split: str) -> str:
  return re.split(r"[\[+]", split)[0].strip()
