"""A TFDS split prepared as ArrayRecord, read by index (`tfds.data_source`).

Example i is record i of the split, or for a class subset (ImageNet-100) the i-th record
of one of its classes: the data order is then a function of the index alone, the same
for any number of processes.
"""
from __future__ import annotations

import concurrent.futures
from typing import Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from corinfomax_jax.data import labels as labels_lib
from corinfomax_jax.data.sources import tfds_common
from corinfomax_jax.data.sources.base import RandomAccessSource


class TfdsRandomAccessSource(RandomAccessSource):
  """Records of a TFDS data source, by index.

  Attributes:
    builder: the TFDS builder.
    data_source: `builder.as_data_source(split)`, image bytes left encoded.
    image_key: the Image feature read.
    classes: the run's classes and the map from TFDS labels to them.
  """

  def __init__(self, *, name: str, split: str, builder, data_source, image_key: str,
               classes: tfds_common.Classes, skip_bad_images: bool):
    self.builder = builder
    self.data_source = data_source
    self.image_key = image_key
    self.classes = classes
    # Record numbers of the examples of a class subset; None: every record, in order.
    self._records = (_records_of(classes, builder, split, data_source)
                     if classes.is_subset else None)
    num_examples = len(data_source) if self._records is None else len(self._records)
    if num_examples == 0:
      raise ValueError(f"{name!r} split {split!r} is empty.")
    super().__init__(name=name, split=split, num_examples=num_examples,
                     class_names=classes.names, skip_bad_images=skip_bad_images)
    features = builder.info.features
    self._name_keys = [k for k in ("file_name", "id") if k in features.keys()
                       and isinstance(features[k], tfds.features.Text)]
    self.has_file_names = "file_name" in self._name_keys
    self.has_paths = bool(self._name_keys)

  def _record(self, index) -> int:
    return int(index) if self._records is None else int(self._records[index])

  def _read(self, indices):
    records = [self.data_source[self._record(i)] for i in indices]
    images = np.array([r[self.image_key] for r in records], dtype=object)
    labels = self.classes.label_map[np.array([r["label"] for r in records], np.int64)]
    return images, labels.astype(np.int32)

  def load_batch(self, indices):
    images, labels = tf.numpy_function(self._read, [indices], (tf.string, tf.int32),
                                       stateful=False)
    images.set_shape(indices.shape)
    labels.set_shape(indices.shape)
    return images, labels

  def describe(self, index):
    return (f"record {self._record(index)} of TFDS {self.builder.name} "
            f"split {self.split!r}")

  def file_names(self):
    if not self.has_file_names:
      return super().file_names()
    return self._text_field("file_name")

  def paths(self):
    if not self.has_paths:
      return super().paths()
    return self._text_field(self._name_keys[0])

  def _text_field(self, key: str) -> list[str]:
    # One pass over the split's records (ImageNet: its 1.28M records, image bytes
    # included, since each record is read whole).
    logging.info("Reading the %s of every record of %s %s once.", key, self.builder.name,
                 self.split)
    keys = self._records if self._records is not None else range(len(self.data_source))
    values = _read_field(self.data_source, key, [int(k) for k in keys])
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _records_of(classes: tfds_common.Classes, builder, split: str,
                data_source) -> np.ndarray:
  """Record numbers of the examples of the subset's classes, in record order."""
  labels = labels_lib.all_labels(
      builder, split, lambda: labels_lib.scan_labels(data_source), len(data_source))
  return np.flatnonzero(classes.label_map[labels] >= 0).astype(np.int64)


def _read_field(data_source, key: str, keys: Sequence[int]) -> list:
  """Field `key` of the records `keys` of a TFDS data source, in 1024-record chunks."""
  def chunk(start):
    part = list(keys[start:start + 1024])
    try:
      records = data_source.__getitems__(part)  # batched ArrayRecord read
    except Exception:  # pylint: disable=broad-except
      records = [data_source[i] for i in part]
    return [r[key] for r in records]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return [x for part in pool.map(chunk, range(0, len(keys), 1024)) for x in part]
