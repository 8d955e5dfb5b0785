"""A TFDS split in a format without random access (TFRecord), streamed.

Each process reads its part (`tfds.even_splits`), shuffled by seed; the data order
therefore depends on the process count, and resuming skips through the stream. An
unreadable image raises (skipping one needs random access).
"""
from __future__ import annotations

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from corinfomax_jax.data import labels as labels_lib
from corinfomax_jax.data.sources import tfds_common
from corinfomax_jax.data.sources.base import StreamedSource
from corinfomax_jax.data.sources.base import as_written


class TfdsStreamedSource(StreamedSource):
  """A TFDS split read with `builder.as_dataset`, counted once when opened.

  Attributes:
    builder: the TFDS builder.
    decoders: the TFDS decoders (image bytes left encoded).
    image_key: the Image feature read.
    classes: the run's classes and the map from TFDS labels to them.
  """

  def __init__(self, *, name: str, split: str, builder, decoders, image_key: str,
               classes: tfds_common.Classes, skip_bad_images: bool):
    self.builder = builder
    self.decoders = decoders
    self.image_key = image_key
    self.classes = classes
    self._label_map = tf.constant(classes.label_map)
    try:
      probe = self._read(split, 0, False)
    except Exception as e:  # pylint: disable=broad-except
      raise tfds_common.not_prepared(name, builder, split, e) from None
    num_examples = (self._count_in_subset(split) if classes.is_subset
                    else _count(probe))
    if num_examples == 0:
      raise ValueError(f"{name!r} split {split!r} is empty.")
    if skip_bad_images:
      logging.warning("skip_bad_images needs random access; streamed %s raises "
                      "on an unreadable image instead.", name)
    super().__init__(name=name, split=split, num_examples=num_examples,
                     class_names=classes.names, skip_bad_images=skip_bad_images)

  def stream(self, process_index, process_count, seed, shuffle):
    part = tfds.even_splits(self.split, process_count)[process_index]
    return self._read(part, seed, shuffle)

  def _records(self, split_arg, seed, shuffle) -> tf.data.Dataset:
    """dict(data=encoded image, label=TFDS label) of every record of `split_arg`."""
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = self.builder.as_dataset(split=split_arg, decoders=self.decoders,
                                 shuffle_files=shuffle, read_config=read_config)
    image_key = self.image_key
    return ds.map(as_written(lambda ex: dict(data=ex[image_key], label=ex["label"])))

  def _read(self, split_arg, seed, shuffle) -> tf.data.Dataset:
    """The run's examples of `split_arg`: labels mapped, other classes left out."""
    label_map = self._label_map
    ds = self._records(split_arg, seed, shuffle).map(as_written(
        lambda ex: dict(data=ex["data"], label=tf.gather(label_map, ex["label"]))))
    if self.classes.is_subset:
      ds = ds.filter(as_written(lambda ex: ex["label"] >= 0))
    return ds

  def _count_in_subset(self, split: str) -> int:
    def read_labels():
      ds = self._records(split, 0, False).map(as_written(lambda ex: ex["label"]))
      return np.concatenate(list(ds.batch(8192).as_numpy_iterator()))
    labels = labels_lib.all_labels(self.builder, split, read_labels)
    return int(np.sum(self.classes.label_map[labels] >= 0))


def _count(ds: tf.data.Dataset) -> int:
  """Examples in `ds`: its cardinality, or one pass when unknown."""
  num_examples = int(ds.cardinality())
  if num_examples < 0:
    num_examples = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  return num_examples
