"""What every data source is: the `Source` protocol, its two kinds, decoding, subsets.

A source is one split of a data set. It says how many examples it has and their class
names, and either reads example i (`RandomAccessSource`: an image folder, a TFDS split
prepared as ArrayRecord, or an index subset of one of them) or streams a process's share
(`StreamedSource`: a TFDS split in another format). The pipelines read nothing else.

TensorFlow is imported here, in the other source modules, in `pipeline` and in `crops`
only; importing this module hides the GPUs and TPUs from it
(`tensorflow_setup.hide_accelerators_from_tensorflow`).
"""
from __future__ import annotations

import abc
import io
import re
from typing import Callable

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from corinfomax_jax import files
from corinfomax_jax import tensorflow_setup


tensorflow_setup.hide_accelerators_from_tensorflow()


def as_written(fn: Callable) -> Callable:
  """`fn` for tf.data's map and filter, traced as written, without AutoGraph.

  AutoGraph would read and convert this package's source for every pipeline built
  (about 0.2 s each, more than half of building one), from the files as they are at
  that moment: after an upgrade under a running job, not the code that runs. The data
  functions branch with tf.cond and on Python values only: nothing to convert.
  """
  return tf.autograph.experimental.do_not_convert(fn)


class Source(abc.ABC):
  """One split of a data set, as the pipelines read it.

  Attributes:
    name: the data set string given to `get_source`.
    split: the split name.
    num_examples: examples in the split.
    class_names: label i is class_names[i].
    skip_bad_images: replace unreadable images instead of raising.
    unlabelled: an image folder split without class directories (one class "",
      every label 0): it serves for pretraining, not for evaluation.
    random_access: whether the data order is process-count invariant (a
      `RandomAccessSource`); False for a `StreamedSource`.
    has_file_names, has_paths: whether `file_names()` and `paths()` can answer.
  """
  random_access: bool
  has_file_names = False
  has_paths = False

  def __init__(self, *, name: str, split: str, num_examples: int,
               class_names: tuple[str, ...], skip_bad_images: bool,
               unlabelled: bool = False):
    self.name = name
    self.split = split
    self.num_examples = num_examples
    self.class_names = tuple(class_names)
    self.skip_bad_images = skip_bad_images
    self.unlabelled = unlabelled

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def load_example(self, data: tf.Tensor) -> tf.Tensor:
    """A data string -> the encoded image (a folder reads its file; TFDS holds it)."""
    return data

  @abc.abstractmethod
  def describe(self, index: int) -> str:
    """Example `index` in words, for error messages."""

  @abc.abstractmethod
  def subset(self, index: np.ndarray) -> Source:
    """This source restricted to the examples `index` (int64 indices), in that order."""

  def file_names(self) -> list[str]:
    """The file name of every example in index order (e.g. "n01440764_10026.JPEG"),
    for lists of names such as SimCLR's ImageNet subsets (`has_file_names`)."""
    raise ValueError(f"{self.name} {self.split!r} has no file names.")

  def paths(self) -> list[str]:
    """Where each example comes from, in index order (`has_paths`): an image folder's
    paths relative to its root ("train/cat/001.jpg"), a TFDS split's file_name feature
    ("n01440764_10026.JPEG") or else its id feature ("train_16399")."""
    raise ValueError(f"{self.name} {self.split!r} has no paths.")


class RandomAccessSource(Source):
  """A source that reads example i; it keeps the unreadable ones it was told of.

  Attributes:
    skipped: descriptions of the files skipped so far (each also logged).
  """
  random_access = True

  def __init__(self, **fields):
    super().__init__(**fields)
    self.skipped: list[str] = []
    self._bad: set[int] = set()

  @abc.abstractmethod
  def load_batch(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """int64 indices [n] -> (data string [n], label int32 [n]); traceable."""

  def subset(self, index: np.ndarray) -> Subset:
    return Subset(self, index)

  def unreadable_reason(self, index: int) -> str | None:
    """Why example `index` cannot be decoded, or None if it can."""
    try:
      data, _ = self.load_batch(tf.constant([index], tf.int64))
      decode_image(self.load_example(data[0]))
    except (tf.errors.OpError, ValueError, OSError) as e:  # OSError: epath's, eagerly
      return f"{type(e).__name__}: {op_message(getattr(e, 'message', str(e)))}"
    return None

  def mark_bad(self, index: int, reason: str) -> None:
    self._bad.add(index)
    self.skipped.append(self.describe(index))
    logging.warning("Skipping unreadable image %s (%s); %d skipped so far.",
                    self.describe(index), reason, len(self.skipped))

  def substitute(self, indices: tf.Tensor, mask: tf.Tensor):
    """Replaces known-bad indices by the next readable index; their mask -> 0.

    Returns (indices, mask). The replacement depends only on the index and the
    set of bad files, so it is the same on every process.
    """
    if not self._bad:
      return indices, mask
    bad = np.array(sorted(self._bad), np.int64)
    good = np.setdiff1d(np.arange(self.num_examples), bad)
    if good.size == 0:
      raise ValueError(f"Every image of {self.name} {self.split} is "
                       "unreadable.")
    repl = good[np.searchsorted(good, bad) % good.size]  # next, cyclically
    pos = tf.searchsorted(bad, indices)
    pos_c = tf.minimum(pos, len(bad) - 1)
    is_bad = tf.gather(bad, pos_c) == indices
    indices = tf.where(is_bad, tf.gather(repl, pos_c), indices)
    mask = tf.where(is_bad, tf.zeros_like(mask), mask)
    return indices, mask


class Subset(RandomAccessSource):
  """The examples `index` of a random-access source, in that order; it finds its own
  unreadable images (the parent's skipped list is not carried over)."""

  def __init__(self, parent: RandomAccessSource, index: np.ndarray):
    index = np.asarray(index, np.int64)
    super().__init__(name=parent.name, split=parent.split, num_examples=len(index),
                     class_names=parent.class_names,
                     skip_bad_images=parent.skip_bad_images, unlabelled=parent.unlabelled)
    self.has_file_names, self.has_paths = parent.has_file_names, parent.has_paths
    self._parent = parent
    self._index = index
    self._index_t = tf.constant(index)

  def load_batch(self, indices):
    return self._parent.load_batch(tf.gather(self._index_t, indices))

  def load_example(self, data):
    return self._parent.load_example(data)

  def describe(self, index):
    return self._parent.describe(int(self._index[int(index)]))

  def file_names(self):
    return np.asarray(self._parent.file_names(), object)[self._index].tolist()

  def paths(self):
    return np.asarray(self._parent.paths(), object)[self._index].tolist()


class StreamedSource(Source):
  """A source read as a stream of this process's share: no example has a fixed index."""
  random_access = False

  @abc.abstractmethod
  def stream(self, process_index: int, process_count: int, seed: int,
             shuffle: bool) -> tf.data.Dataset:
    """One pass over this process's part: dict(data=encoded image, label=int32)."""

  def describe(self, index):
    return f"an example of {self.name} {self.split!r}"

  def subset(self, index):
    raise ValueError(f"{self.name} {self.split!r} is streamed: its examples have no "
                     "fixed index to take a subset of.")


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP of any mode -> uint8 RGB [h, w, 3], PIL's pixels for JPEG.

  The reference loads `Image.open(f).convert("RGB")`; a JPEG here gives exactly those
  pixels, in every mode:
    * RGB (YCbCr) and grayscale JPEGs: `tf.io.decode_jpeg` with libjpeg's accurate
      integer IDCT, as PIL decodes (`tf.io.decode_image` uses the fast one, up to ~5
      levels off);
    * CMYK and YCCK JPEGs (4 components; rare, e.g. a few dozen in ImageNet's train
      split): TensorFlow's CMYK -> RGB truncates where PIL rounds (1 level) and reads a
      CMYK file without an Adobe marker as inverted (up to 255 levels), and it cannot
      return the CMYK planes, so these go through PIL itself (`tf.numpy_function`).
  Other formats: `tf.io.decode_image`, which matches PIL's convert("RGB") for 8-bit
  PNGs of every mode (L, LA, P, RGB, RGBA) but not for 16-bit ones.

  Args:
    encoded: a scalar string tensor, the file's bytes.

  Returns:
    uint8 [h, w, 3]. Unreadable bytes raise a `tf.errors.OpError`, as TensorFlow's
    decoders do.
  """
  def decode_jpeg():
    image = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
    with tf.control_dependencies([image]):  # a bad file fails in the decoder, as before
      components = tf.image.extract_jpeg_shape(encoded)[2]
    return tf.cond(components == 4,
                   lambda: tf.numpy_function(_pil_rgb, [encoded], tf.uint8,
                                             stateful=False),
                   lambda: image)

  image = tf.cond(tf.io.is_jpeg(encoded), decode_jpeg,
                  lambda: tf.io.decode_image(encoded, channels=3,
                                             expand_animations=False, dtype=tf.uint8))
  image.set_shape([None, None, 3])
  return image


def _pil_rgb(encoded) -> np.ndarray:
  """PIL's Image.open(...).convert("RGB") of the bytes, uint8 [h, w, 3]."""
  with Image.open(io.BytesIO(np.asarray(encoded).item())) as image:
    return np.asarray(image.convert("RGB"))


def op_message(text: str) -> str:
  """A TensorFlow op error's own words, without the graph's names around them:
  "{{function_node ...}} Unknown image file format. [Op:DecodeImage] name: " ->
  "Unknown image file format"."""
  text = re.sub(r"\{\{[^{}]*\}\}", " ", text)
  text = re.sub(r"\[\[.*?\]\]", " ", text, flags=re.S)
  text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
  return " ".join(text.split()).rstrip(".")


def listing(path: str, limit: int = 20) -> str:
  """The entries of the folder `path` for an error message: sorted, the first `limit`."""
  try:
    if files.is_url(path):
      entries = sorted(p.name for p in files.as_path(path).iterdir())
    else:
      entries = sorted(tf.io.gfile.listdir(path))
  except (tf.errors.OpError, OSError):
    return "(cannot list it)"
  entries = [e.rstrip("/") for e in entries]
  more = f" ... ({len(entries)} in all)" if len(entries) > limit else ""
  return (", ".join(entries[:limit]) + more) if entries else "(empty)"
