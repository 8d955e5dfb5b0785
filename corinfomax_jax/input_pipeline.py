"""Sources (TFDS name, image folder) -> per-process batches -> global jax.Arrays.

The data order is a pure function of (seed, global step), whatever the number of
processes: epoch e = step // steps_per_epoch visits the examples in a stateless
permutation drawn from (seed, e) (remainder dropped); global step s takes rows
[(s % spe) * B, (s % spe + 1) * B) of it, and process p of P the contiguous
slice [p * B / P, (p + 1) * B / P) of those rows. Augmentation draws come from
stateless TF random ops seeded by (seed, step, view) and indexed by the row in
the global batch, so every example looks the same whatever the process count,
and resuming is starting at a global step.

Random access needs an indexable source: an image folder (sorted file list) or a
TFDS data set prepared as ArrayRecord (`tfds.data_source`). A TFDS data set in
another format is streamed instead (`tfds.even_splits` per process, seeded
shuffle, skip to resume); that order depends on the process count.

TensorFlow is imported here and in `augment` only.
"""
import atexit
import collections
import concurrent.futures
import dataclasses
import difflib
import functools
import math
import os
import re
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from corinfomax_jax import augment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET100_CLASSES_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "imagenet100_classes.txt")

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Tags folded into the seed so that data order and augmentation never share
# random numbers.
_ORDER_TAG, _AUG_TAG = 1, 2
# View ids folded into the augmentation seed.
_VIEW_IDS = {"view1": 1, "view2": 2, "probe": 3}
_SHUFFLE_BUFFER = 10_000  # examples; the streaming fallback's shuffle


def normalization_stats(dataset: str) -> tuple[tuple[float, ...],
                                               tuple[float, ...]]:
  """(mean, std) per RGB channel for `dataset` (a `get_source` data set name).

  CIFAR-10 and CIFAR-100 have their own; everything else (ImageNet, ImageNet-100,
  image folders) gets ImageNet's. Override `mean`/`std` in the aug config for a
  folder of another distribution.
  """
  name = "" if dataset.startswith("folder:") else dataset.split(":")[0]
  return {"cifar10": _CIFAR10_STATS,
          "cifar100": _CIFAR100_STATS}.get(name, _IMAGENET_STATS)


def default_aug_config(dataset: str) -> dict[str, Any]:
  """The paper's augmentation numbers with `dataset`'s normalisation."""
  return augment.paper_config(*normalization_stats(dataset))


def check_batch_divides(global_batch_size: int, num_devices: int,
                        process_count: int) -> None:
  """Raises ValueError unless the global batch splits evenly."""
  if global_batch_size <= 0:
    raise ValueError(f"Global batch size must be positive, got "
                     f"{global_batch_size}.")
  for count, what in ((process_count, "processes"), (num_devices, "devices")):
    if global_batch_size % count:
      need = math.lcm(num_devices, process_count)
      raise ValueError(
          f"Global batch size {global_batch_size} does not divide over "
          f"{count} {what} ({num_devices} devices in {process_count} "
          f"processes); use a multiple of {need}.")


# -------------------------------------------------------------------- sources


@dataclasses.dataclass(eq=False)
class Source:
  """One split of a data set, as the pipelines read it.

  Attributes:
    name: the data set string given to `get_source`.
    split: the split name.
    num_examples: examples in the split.
    class_names: label i is class_names[i].
    random_access: whether the data order is process-count invariant
      (indexable source); False for the streaming TFDS fallback.
    skip_bad_images: replace unreadable images instead of raising.
    skipped: descriptions of the files skipped so far (each also logged).
  """
  name: str
  split: str
  num_examples: int
  class_names: tuple[str, ...]
  random_access: bool
  skip_bad_images: bool
  # Random access: int64 indices [n] -> (data string [n], label int32 [n]).
  load_batch: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None
  # data string -> encoded image (tf.io.read_file for folders, else identity).
  load_example: Callable[[tf.Tensor], tf.Tensor]
  # index -> human-readable location, for error messages.
  describe: Callable[[int], str]
  # Streaming: (process_index, process_count, seed, shuffle) -> tf.data of
  # dict(data=encoded image, label=int32), one pass over this process's part.
  stream: Callable[[int, int, int, bool], tf.data.Dataset] | None = None
  skipped: list[str] = dataclasses.field(default_factory=list)
  _bad: set[int] = dataclasses.field(default_factory=set)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def unreadable_reason(self, index: int) -> str | None:
    """Why example `index` cannot be decoded, or None if it can."""
    try:
      data, _ = self.load_batch(tf.constant([index], tf.int64))
      decode_image(self.load_example(data[0]))
    except (tf.errors.OpError, ValueError) as e:
      return f"{type(e).__name__}: {getattr(e, 'message', str(e))}"
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


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP of any mode -> uint8 RGB [h, w, 3]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False,
                             dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


def _listing(path: str, limit: int = 20) -> str:
  try:
    entries = sorted(tf.io.gfile.listdir(path))
  except tf.errors.OpError:
    return "(cannot list it)"
  entries = [e.rstrip("/") for e in entries]
  more = f" ... ({len(entries)} in all)" if len(entries) > limit else ""
  return (", ".join(entries[:limit]) + more) if entries else "(empty)"


def get_source(dataset: str, data_dir: str | None, split: str,
               skip_bad_images: bool = False,
               random_access: bool | None = None) -> Source:
  """The `split` of `dataset`, checked at once (missing data fails here).

  Args:
    dataset: "folder:<root>" for root/<split>/<class>/<image> (.jpg, .jpeg,
      .png; labels from sorted class names); "imagenet100" for the 100 CMC
      classes of TFDS imagenet2012 (labels in sorted-wnid order); or any TFDS
      name ("cifar10", "imagenet2012", "name:version", ...).
    data_dir: TFDS data_dir (None: TFDS's default); unused for folders.
    split: split name ("train", "test", "validation"; TFDS slicing allowed).
    skip_bad_images: an unreadable image is logged, counted in
      `Source.skipped` and replaced by the next readable example (masked out
      of eval batches) instead of raising an error naming the file.
    random_access: TFDS only. None: use `tfds.data_source` when the data is
      ArrayRecord, else stream with a warning; False: always stream.
  """
  if dataset.startswith("folder:"):
    return _folder_source(dataset, dataset[len("folder:"):], split,
                          skip_bad_images)
  if dataset == "imagenet100":
    return _tfds_source(dataset, "imagenet2012", data_dir, split,
                        skip_bad_images, random_access,
                        subset=imagenet100_classes())
  return _tfds_source(dataset, dataset, data_dir, split, skip_bad_images,
                      random_access)


def imagenet100_classes() -> list[str]:
  """The 100 WordNet ids of ImageNet-100 (CMC), sorted: label i is entry i."""
  with open(IMAGENET100_CLASSES_FILE) as f:
    wnids = [line.strip() for line in f if line.strip()]
  if len(set(wnids)) != 100:
    raise ValueError(f"{IMAGENET100_CLASSES_FILE} must hold 100 distinct "
                     f"wnids, holds {len(set(wnids))}.")
  return sorted(wnids)


def _folder_source(dataset: str, root: str, split: str,
                   skip_bad_images: bool) -> Source:
  if not root or not os.path.isdir(root):
    parent = os.path.dirname(os.path.abspath(root or "."))
    raise ValueError(f"Image folder root {root!r} does not exist"
                     + (f"; {parent} holds: {_listing(parent)}."
                        if os.path.isdir(parent) else "."))
  split_dir = os.path.join(root, split)
  splits = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not os.path.isdir(split_dir):
    raise ValueError(f"Image folder {root!r} has no split {split!r}; splits "
                     f"found: {splits or '(none)'}.")
  classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
  paths, labels, ignored = [], [], 0
  for label, name in enumerate(classes):
    files = sorted(e.name for e in os.scandir(os.path.join(split_dir, name))
                   if e.is_file())
    for f in files:
      if f.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(split_dir, name, f))
        labels.append(label)
      else:
        ignored += 1
  if not paths:
    raise ValueError(
        f"Split {split_dir!r} has no {'/'.join(IMAGE_EXTENSIONS)} images in "
        f"class directories (expected {split}/<class>/<image>); it holds: "
        f"{_listing(split_dir)}. Splits found: {splits}.")
  if ignored:
    logging.info("%s: ignored %d files without an image extension %s.",
                 split_dir, ignored, IMAGE_EXTENSIONS)
  empty = [c for c, n in zip(classes, np.bincount(labels, minlength=len(
      classes))) if n == 0]
  if empty:
    logging.warning("%s: classes without images (labels kept): %s", split_dir,
                    empty)
  logging.info("%s: %d images in %d classes.", split_dir, len(paths),
               len(classes))
  paths_t = tf.constant(paths)  # captured by reference, not copied per graph
  labels_t = tf.constant(labels, tf.int32)

  def load_batch(indices):
    return tf.gather(paths_t, indices), tf.gather(labels_t, indices)

  return Source(name=dataset, split=split, num_examples=len(paths),
                class_names=tuple(classes), random_access=True,
                skip_bad_images=skip_bad_images, load_batch=load_batch,
                load_example=tf.io.read_file,
                describe=lambda i: paths[int(i)])


def _tfds_builder(dataset: str, tfds_name: str, data_dir: str | None):
  if data_dir is not None and not tf.io.gfile.isdir(data_dir):
    parent = os.path.dirname(os.path.abspath(data_dir))
    raise ValueError(f"TFDS data_dir {data_dir!r} does not exist"
                     + (f"; {parent} holds: {_listing(parent)}."
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


def _not_prepared(dataset, builder, split, error=None) -> ValueError:
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


def _tfds_source(dataset, tfds_name, data_dir, split, skip_bad_images,
                 random_access, subset=None) -> Source:
  builder = _tfds_builder(dataset, tfds_name, data_dir)
  features = builder.info.features
  image_keys = [k for k, f in features.items()
                if isinstance(f, tfds.features.Image)]
  image_key = "image" if "image" in image_keys else (image_keys or [None])[0]
  label = features["label"] if "label" in features.keys() else None
  if image_key is None or not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"TFDS {tfds_name!r} needs an Image feature and a "
                     f"ClassLabel 'label'; it has {dict(features.items())}.")
  if builder.info.splits and _base_split(split) not in builder.info.splits:
    raise ValueError(f"TFDS {tfds_name!r} has no split {split!r}; splits: "
                     f"{list(builder.info.splits)}.")
  decoders = {image_key: tfds.decode.SkipDecoding()}
  names = list(label.names)
  if subset is None:
    class_names, label_map = tuple(names), np.arange(len(names), dtype=np.int32)
  else:  # labels of the subset, in sorted-wnid order; other classes -> -1
    missing = sorted(set(subset) - set(names))
    if missing:
      raise ValueError(f"{tfds_name!r} lacks the classes {missing[:5]}...")
    class_names = tuple(subset)
    label_map = np.full(len(names), -1, np.int32)
    for new, wnid in enumerate(subset):
      label_map[names.index(wnid)] = new

  data_source = None
  if random_access is not False:
    try:
      data_source = builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:
      if not builder.is_prepared():
        raise _not_prepared(dataset, builder, split, e) from None
      logging.warning(
          "%s is not prepared as ArrayRecord (%s); streaming it instead. The "
          "streamed data order depends on the process count and resuming "
          "skips through the stream.", tfds_name, builder.info.file_format)
    except Exception as e:  # pylint: disable=broad-except
      raise _not_prepared(dataset, builder, split, e) from None

  if data_source is not None:
    return _random_access_tfds(dataset, split, data_source, image_key,
                               class_names, label_map, subset is not None,
                               skip_bad_images, builder)
  return _streaming_tfds(dataset, split, builder, decoders, image_key,
                         class_names, label_map, subset is not None,
                         skip_bad_images, data_dir)


def _base_split(split: str) -> str:
  return re.split(r"[\[+]", split)[0].strip()


def _subset_cache_path(builder, split: str) -> str | None:
  data_dir = str(builder.data_dir)
  if not builder.is_prepared() or not tf.io.gfile.isdir(data_dir):
    return None
  tag = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
  return os.path.join(data_dir, f"corinfomax_labels_{tag}.npy")


def _all_labels(builder, split, compute: Callable[[], np.ndarray],
                expected: int | None = None):
  """Labels of every example of the split, cached next to the TFDS data."""
  path = _subset_cache_path(builder, split)
  if path and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, "rb") as f:
      labels = np.load(f)
    if expected is None or len(labels) == expected:
      return labels
  logging.info("Reading all labels of %s %s once to select ImageNet-100.",
               builder.name, split)
  labels = compute()
  if path:
    try:
      with tf.io.gfile.GFile(path, "wb") as f:
        np.save(f, labels)
    except (tf.errors.OpError, OSError) as e:
      logging.info("Could not cache labels at %s: %s", path, e)
  return labels


def _random_access_tfds(dataset, split, data_source, image_key, class_names,
                        label_map, is_subset, skip_bad_images, builder):
  if is_subset:
    def read_labels():
      def chunk(start):
        keys = list(range(start, min(start + 1024, len(data_source))))
        try:
          records = data_source.__getitems__(keys)  # batched ArrayRecord read
        except Exception:  # pylint: disable=broad-except
          records = [data_source[i] for i in keys]
        return [int(r["label"]) for r in records]
      with concurrent.futures.ThreadPoolExecutor(16) as pool:
        parts = pool.map(chunk, range(0, len(data_source), 1024))
        return np.array([x for part in parts for x in part], np.int64)
    all_labels = _all_labels(builder, split, read_labels, len(data_source))
    base_index = np.flatnonzero(label_map[all_labels] >= 0).astype(np.int64)
  else:
    base_index = None
  num_examples = len(base_index) if is_subset else len(data_source)
  if num_examples == 0:
    raise ValueError(f"{dataset!r} split {split!r} is empty.")

  def read(indices):
    if base_index is not None:
      indices = base_index[indices]
    records = [data_source[int(i)] for i in indices]
    images = np.array([r[image_key] for r in records], dtype=object)
    labels = label_map[np.array([r["label"] for r in records], np.int64)]
    return images, labels.astype(np.int32)

  def load_batch(indices):
    images, labels = tf.numpy_function(read, [indices], (tf.string, tf.int32),
                                       stateful=False)
    images.set_shape(indices.shape)
    labels.set_shape(indices.shape)
    return images, labels

  def describe(i):
    base = int(base_index[i]) if base_index is not None else int(i)
    return f"record {base} of TFDS {builder.name} split {split!r}"

  return Source(name=dataset, split=split, num_examples=num_examples,
                class_names=class_names, random_access=True,
                skip_bad_images=skip_bad_images, load_batch=load_batch,
                load_example=lambda x: x, describe=describe)


def _streaming_tfds(dataset, split, builder, decoders, image_key, class_names,
                    label_map, is_subset, skip_bad_images, data_dir):
  label_map_t = tf.constant(label_map)

  def read(split_arg, seed, shuffle, keep_all=False):
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = builder.as_dataset(split=split_arg, decoders=decoders,
                            shuffle_files=shuffle, read_config=read_config)
    ds = ds.map(lambda ex: dict(data=ex[image_key], label=ex["label"]))
    if keep_all:
      return ds
    ds = ds.map(lambda ex: dict(data=ex["data"], label=tf.gather(
        label_map_t, ex["label"])))
    if is_subset:
      ds = ds.filter(lambda ex: ex["label"] >= 0)
    return ds

  try:
    probe = read(split, 0, False)
  except Exception as e:  # pylint: disable=broad-except
    raise _not_prepared(dataset, builder, split, e) from None
  if is_subset:
    def read_labels():
      ds = read(split, 0, False, keep_all=True).map(lambda ex: ex["label"])
      return np.concatenate(list(ds.batch(8192).as_numpy_iterator()))
    all_labels = _all_labels(builder, split, read_labels)
    num_examples = int(np.sum(label_map[all_labels] >= 0))
  else:
    num_examples = int(probe.cardinality())
    if num_examples < 0:  # unknown: count once
      num_examples = int(probe.reduce(np.int64(0), lambda n, _: n + 1))
  if num_examples == 0:
    raise ValueError(f"{dataset!r} split {split!r} is empty.")
  if skip_bad_images:
    logging.warning("skip_bad_images needs random access; streamed %s raises "
                    "on an unreadable image instead.", dataset)

  def stream(process_index, process_count, seed, shuffle):
    part = tfds.even_splits(split, process_count)[process_index]
    return read(part, seed, shuffle)

  return Source(name=dataset, split=split, num_examples=num_examples,
                class_names=class_names, random_access=False,
                skip_bad_images=skip_bad_images, load_batch=None,
                load_example=lambda x: x,
                describe=lambda i: f"an example of {dataset} {split!r}",
                stream=stream)


# ----------------------------------------------------------------- data order


def _fold(seed: int, *data) -> tf.Tensor:
  """A stateless seed (shape [2]) from an integer seed and integer data."""
  key = tf.constant([seed, 0], tf.int64)
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(f"Global batch size {global_batch_size} exceeds the "
                     f"{num_examples} examples of the split.")
  return steps


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global batches of one padded pass (`eval_batches`)."""
  return -(-num_examples // global_batch_size)


def _shuffled(positions, num_examples: int, seed: int, epoch):
  return tf.random.experimental.index_shuffle(
      positions, _fold(seed, _ORDER_TAG, epoch),
      tf.constant(num_examples - 1, tf.int64))


def _train_order(num_examples: int, global_batch_size: int, seed: int):
  spe = steps_per_epoch(num_examples, global_batch_size)

  def order(step, rows):
    positions = (step % spe) * global_batch_size + rows
    indices = _shuffled(positions, num_examples, seed, step // spe)
    return indices, tf.ones(tf.shape(rows), tf.float32)
  return order


def _eval_order(num_examples: int, global_batch_size: int, seed: int | None,
                epoch: int):
  first_step = epoch * eval_steps(num_examples, global_batch_size)

  def order(step, rows):
    positions = (step - first_step) * global_batch_size + rows
    mask = tf.cast(positions < num_examples, tf.float32)
    positions = tf.minimum(positions, num_examples - 1)  # padding rows
    if seed is not None:
      positions = _shuffled(positions, num_examples, seed, epoch)
    return positions, mask
  return order


def batch_indices(num_examples: int, global_batch_size: int, seed: int,
                  step: int) -> np.ndarray:
  """Example indices [global_batch_size] of global step `step` (pretraining
  and probe training order)."""
  order = _train_order(num_examples, global_batch_size, seed)
  indices, _ = order(tf.constant(step, tf.int64),
                     tf.range(global_batch_size, dtype=tf.int64))
  return indices.numpy()


# ------------------------------------------------------------------ pipelines


@dataclasses.dataclass(frozen=True)
class _View:
  """One output image of a pipeline, as hashable numbers."""
  key: str  # output key
  view_id: int | None  # folded into the augmentation seed; None: no draws
  crop: tuple  # ("random", scale, ratio, size) | ("center", ratio, size)
  finish: tuple  # ("augment", view_config items) | ("flip", p) | ("none",)


def _frozen(view: Mapping[str, Any]) -> tuple:
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in view.items()))


def _crop(image, u, spec):
  if spec[0] == "random":
    _, scale, ratio, size = spec
    return augment.random_resized_crop(image, augment.crop_draws(u), size,
                                       scale, ratio)
  _, ratio, size = spec
  return augment.resize_center_crop(image, size, ratio)


def _finish(x, u, spec):
  if spec[0] == "augment":
    return augment.augment_batch(x, u, dict(spec[1]))
  if spec[0] == "flip":
    return augment.flip(x, augment.flip_draws(u), spec[1])
  return x


@functools.lru_cache(maxsize=64)
def _finish_fn(views: tuple[_View, ...], mean, std):
  """The after-crop augmentation of one example, compiled once per setting.

  One XLA computation per example (4x faster than TF's op-by-op execution on
  CPU, and ops whose draw says no are skipped), the same executable whatever
  the batch size: the output is bitwise the same for any process count.
  """
  @tf.function(jit_compile=True)
  def finish(crops, draws):
    out = {}
    for v in views:
      u = None if v.view_id is None else draws[v.key][None]
      x = _finish(crops[v.key][None], u, v.finish)
      out[v.key] = augment.normalize(x, mean, std)[0]
    return out
  return finish


def _process_slice(global_batch_size, process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} does not divide "
                     f"over {process_count} processes.")
  return process_index, process_count, global_batch_size // process_count


def _options(num_threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _add_draws(element, views, seed, global_batch_size, rows):
  for v in views:
    if v.view_id is not None:
      element["u_" + v.key] = augment.view_draws(
          _fold(seed, _AUG_TAG, element["step"], v.view_id), rows,
          global_batch_size)
  return element


def _examples_to_batches(ds, source, views, local_batch, mean, std):
  """Unbatched step elements -> decoded, cropped, augmented, batched views."""
  finish = _finish_fn(tuple(views), tuple(mean), tuple(std))

  def per_example(ex):
    image = decode_image(source.load_example(ex["data"]))
    draws = {v.key: ex["u_" + v.key] for v in views if v.view_id is not None}
    crops = {v.key: _crop(image, draws.get(v.key), v.crop) for v in views}
    return dict(finish(crops, draws), label=ex["label"], mask=ex["mask"])

  ds = ds.unbatch().map(per_example, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local_batch, drop_remainder=True)


_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  # A tf.data iterator still running Python (tf.numpy_function) at interpreter
  # exit deadlocks the exit; close them first.
  for batches in list(_LIVE_ITERATORS):
    batches.close()


class _Batches:
  """Iterator of per-process numpy batches that names unreadable images.

  On a decode error it finds the bad file among the current step's examples;
  then it raises naming it, or (skip_bad_images) logs and counts it and
  rebuilds the pipeline from the same step with the file replaced.
  """

  def __init__(self, build, source, start_step, indices_for_step, keys):
    self._build = build
    self._source = source
    self._step = start_step
    self._indices_for_step = indices_for_step
    self._keys = keys
    self._it = None
    _LIVE_ITERATORS.add(self)

  def close(self) -> None:
    """Stops the background pipeline; a later next() restarts at .step."""
    self._it = None

  @property
  def step(self) -> int:
    """The global step of the next batch."""
    return self._step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._it is None:
        self._it = self._build(self._step).as_numpy_iterator()
      try:
        batch = next(self._it)
      except tf.errors.OpError as e:
        self._it = None
        self._recover(e)
        continue
      self._step += 1
      return {k: batch[k] for k in self._keys}

  def _recover(self, error):
    source = self._source
    if self._indices_for_step is None:
      raise ValueError(f"Reading {source.name} {source.split!r} (streamed) "
                       f"failed near step {self._step}: {error}") from error
    bad = []
    for i in sorted(set(self._indices_for_step(self._step).tolist())):
      reason = source.unreadable_reason(i)
      if reason is not None:
        bad.append((i, reason))
    if not bad:
      raise error
    if not source.skip_bad_images:
      i, reason = bad[0]
      raise ValueError(
          f"Cannot read image {source.describe(i)}: {reason}. Fix or remove "
          "it, or set skip_bad_images to skip unreadable images (each is "
          "logged and counted).") from None
    for i, reason in bad:
      source.mark_bad(i, reason)


def _batches(source: Source, views: list[_View], *, global_batch_size,
             process_index, process_count, seed, start_step, order,
             aug_config, num_threads, keys, first_step=0, stop_step=None):
  """Shared body of the pipelines: global steps [first_step, stop_step).

  stop_step None: endless. A finite range is one padded pass (eval).
  """
  p, num_p, b = _process_slice(global_batch_size, process_index,
                               process_count)
  rows = tf.range(p * b, (p + 1) * b, dtype=tf.int64)
  mean, std = aug_config["mean"], aug_config["std"]

  if source.random_access:
    def step_element(step):
      indices, mask = order(step, rows)
      indices, mask = source.substitute(indices, mask)
      data, label = source.load_batch(indices)
      element = dict(step=step, data=data, label=label, mask=mask)
      return _add_draws(element, views, seed, global_batch_size, rows)

    def build(start):
      end = np.iinfo(np.int64).max if stop_step is None else stop_step
      ds = tf.data.Dataset.range(start, end)
      ds = ds.map(step_element, num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.map(lambda e: {k: v for k, v in e.items() if k != "step"})
      ds = _examples_to_batches(ds, source, views, b, mean, std)
      return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads))

    def indices_for_step(step):
      indices, mask = order(tf.constant(step, tf.int64), rows)
      return source.substitute(indices, mask)[0].numpy()
  else:
    def build(start):
      if stop_step is not None:  # one pass, padded to the same step count
        local = source.stream(p, num_p, 0, False).map(
            lambda ex: dict(ex, mask=tf.constant(1.0)))
        pad = local.take(1).map(lambda ex: dict(ex, mask=tf.constant(0.0)))
        ds = local.concatenate(pad.repeat()).take((stop_step - first_step) * b)
      else:
        ds = source.stream(p, num_p, seed, True).repeat()
        ds = ds.shuffle(min(_SHUFFLE_BUFFER, source.num_examples), seed=seed)
        ds = ds.map(lambda ex: dict(ex, mask=tf.constant(1.0)))
      ds = ds.batch(b, drop_remainder=True).skip(start - first_step)
      ds = ds.enumerate(start).map(
          lambda step, e: _add_draws(dict(e, step=step), views, seed,
                                     global_batch_size, rows))
      ds = ds.map(lambda e: {k: v for k, v in e.items() if k != "step"})
      ds = _examples_to_batches(ds, source, views, b, mean, std)
      return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads))
    indices_for_step = None

  return _Batches(build, source, start_step, indices_for_step, keys)


def _checked_config(source, aug_config):
  config = augment.with_overrides(default_aug_config(source.name), aug_config)
  augment.check_config(config)
  return config


def _random_crop(view, image_size):
  return ("random", tuple(view["crop_scale"]), tuple(view["crop_ratio"]),
          image_size)


def pretrain_batches(source: Source, *, global_batch_size: int,
                     image_size: int, seed: int, start_step: int = 0,
                     process_index: int | None = None,
                     process_count: int | None = None,
                     aug_config: Mapping[str, Any] | None = None,
                     num_threads: int | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
  """Endless two-view batches of this process, from global step `start_step`.

  Yields dict(view1=float32 [b, S, S, 3], view2=float32 [b, S, S, 3],
  label=int32 [b]) with b = global_batch_size / process_count, normalised
  NHWC. `aug_config`: keys of `augment.paper_config` overriding the paper's
  numbers with this data set's mean/std (`default_aug_config`); None: none.
  `num_threads` caps tf.data's threads. The iterator's `.step` is the global
  step of the next batch.
  """
  config = _checked_config(source, aug_config)
  views = []
  for key in ("view1", "view2"):
    view = augment.view_config(config, key)
    views.append(_View(key, _VIEW_IDS[key], _random_crop(view, image_size),
                       ("augment", _frozen(view))))
  return _batches(
      source, views, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, seed=seed,
      start_step=start_step,
      order=_train_order(source.num_examples, global_batch_size, seed),
      aug_config=config, num_threads=num_threads,
      keys=("view1", "view2", "label"))


def _probe_view(config, image_size):
  probe = augment.view_config(config, "probe")
  return _View("image", _VIEW_IDS["probe"], _random_crop(probe, image_size),
               ("flip", probe["flip_p"]))


def probe_train_batches(source: Source, *, global_batch_size: int,
                        image_size: int, seed: int, start_step: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        aug_config: Mapping[str, Any] | None = None,
                        num_threads: int | None = None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Endless linear-probe training batches (random resized crop + flip).

  Same order and resumption as `pretrain_batches`. Yields dict(image=float32
  [b, S, S, 3], label=int32 [b]).
  """
  config = _checked_config(source, aug_config)
  return _batches(
      source, [_probe_view(config, image_size)],
      global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, seed=seed, start_step=start_step,
      order=_train_order(source.num_examples, global_batch_size, seed),
      aug_config=config, num_threads=num_threads, keys=("image", "label"))


def eval_batches(source: Source, *, global_batch_size: int, image_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None, train_augment: bool = False,
                 seed: int = 0, epoch: int = 0,
                 aug_config: Mapping[str, Any] | None = None,
                 num_threads: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the whole split: `eval_steps(...)` batches.

  Yields dict(image=float32 [b, S, S, 3], label=int32 [b], mask=float32 [b]);
  the last global batch is padded and mask is 1 on real rows, 0 on padding
  (and on images skipped as unreadable), so each example counts exactly once.
  train_augment=False: index order, resize to int(S * test_resize_ratio)
  (bicubic) and centre crop. True: the probe training view (random resized
  crop + flip) in an order shuffled by (seed, epoch), augmented by (seed, step).
  """
  config = _checked_config(source, aug_config)
  if train_augment:
    view = _probe_view(config, image_size)
  else:
    view = _View("image", None,
                 ("center", config["test_resize_ratio"], image_size), ("none",))
  num_steps = eval_steps(source.num_examples, global_batch_size)
  epoch = epoch if train_augment else 0
  order = _eval_order(source.num_examples, global_batch_size,
                      seed if train_augment else None, epoch)
  # Epoch e is steps [e * num_steps, (e + 1) * num_steps) of its own stream,
  # so the augmentation differs between epochs.
  return _batches(
      source, [view], global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, seed=seed,
      start_step=epoch * num_steps, first_step=epoch * num_steps,
      stop_step=(epoch + 1) * num_steps, order=order, aug_config=config,
      num_threads=num_threads, keys=("image", "label", "mask"))


# ------------------------------------------------------------------- devices


def global_batches(local_batches: Iterable[Mapping[str, np.ndarray]],
                   sharding, prefetch: int = 2) -> Iterator[dict[str, Any]]:
  """Per-process numpy batches -> global jax.Arrays, `prefetch` batches ahead.

  `sharding` (e.g. NamedSharding(mesh, P("data"))) splits the leading axis;
  each process's rows become its slice of the global batch.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in batch.items()}

  queue = collections.deque()
  checked = False
  for batch in local_batches:
    if not checked:
      rows = len(next(iter(batch.values())))
      check_batch_divides(rows * jax.process_count(), _batch_shards(sharding),
                          jax.process_count())
      checked = True
    queue.append(to_global(batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _batch_shards(sharding) -> int:
  """How many pieces `sharding` cuts the leading (batch) axis into."""
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if spec is None or mesh is None:
    return len(sharding.device_set)
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)
