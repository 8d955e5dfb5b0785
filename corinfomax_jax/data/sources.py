"""Data sources: one split of a TFDS data set or an image folder, checked when opened.

A `Source` says how many examples a split has, its class names, and how to read
example i (random access: an image folder's sorted file list, or a TFDS data set
prepared as ArrayRecord) or, for TFDS data in another format, how to stream a
process's share. Opening a source checks that the data is there and readable in
outline; a missing directory, split or data set fails here with a message that says
what does exist.

TensorFlow is imported here, in `pipeline` and in `augment` only; importing this
module hides the GPUs and TPUs from it (`tensorflow_setup.hide_accelerators_from_tensorflow`).
"""
import concurrent.futures
import contextlib
import dataclasses
import difflib
import fcntl
import io
import os
import posixpath
import re
import socket
from typing import Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from corinfomax_jax import errors
from corinfomax_jax import files
from corinfomax_jax import tensorflow_setup
from corinfomax_jax.data import labels as labels_lib


tensorflow_setup.hide_accelerators_from_tensorflow()


def as_written(fn: Callable) -> Callable:
  """`fn` for tf.data's map and filter, traced as written, without AutoGraph.

  AutoGraph would read and convert this package's source for every pipeline built
  (about 0.2 s each, more than half of building one), from the files as they are at
  that moment: after an upgrade under a running job, not the code that runs. The data
  functions branch with tf.cond and on Python values only: nothing to convert.
  """
  return tf.autograph.experimental.do_not_convert(fn)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET100_CLASSES_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "imagenet100_classes.txt")


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
    unlabelled: an image folder split without class directories (one class "",
      every label 0): it serves for pretraining, not for evaluation.
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
  # data string -> encoded image (for folders tf.io.read_file, or epath for a URL;
  # else identity).
  load_example: Callable[[tf.Tensor], tf.Tensor]
  # index -> human-readable location, for error messages.
  describe: Callable[[int], str]
  # Streaming: (process_index, process_count, seed, shuffle) -> tf.data of
  # dict(data=encoded image, label=int32), one pass over this process's part.
  stream: Callable[[int, int, int, bool], tf.data.Dataset] | None = None
  # Images without class directories: one class "", every label 0 (pretraining only).
  unlabelled: bool = False
  # () -> the file name of every example in index order (e.g. "n01440764_10026.JPEG"),
  # for lists of names such as SimCLR's ImageNet subsets; None where the source has none.
  file_names: Callable[[], list[str]] | None = None
  # () -> where each example comes from, in index order: an image folder's paths relative
  # to its root ("train/cat/001.jpg"), a TFDS split's file_name feature
  # ("n01440764_10026.JPEG") or else its id feature ("train_16399"); None where the
  # source has neither, and for a streamed TFDS split (whose rows have no fixed index).
  paths: Callable[[], list[str]] | None = None
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


def _listing(path: str, limit: int = 20) -> str:
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
  remote = files.is_url(root)
  try:
    found = bool(root) and _is_dir(root)
  except Exception as e:  # pylint: disable=broad-except
    # A store's client raises its own kinds (no credentials, no such bucket, no network).
    raise ValueError(f"Image folder root {root!r} cannot be read: "
                     f"{type(e).__name__}: {_first_line(e)}") from None
  if not found:
    raise ValueError(f"Image folder root {root!r} does not exist{_parent_holds(root)}")
  if _is_tiny_imagenet_archive(root):
    raise ValueError(
        f"Image folder {root!r} is the unpacked Tiny ImageNet archive, whose val/ holds "
        "its images without class folders (labels in val/val_annotations.txt): prepare "
        f"it first, python tools/prepare_tiny_imagenet.py {root} data/tiny-imagenet, "
        "and read folder:data/tiny-imagenet.")
  split_dir = os.path.join(root, split)
  splits = _folders_in(root)
  if not _is_dir(split_dir):
    raise ValueError(f"Image folder {root!r} has no split {split!r}; splits "
                     f"found: {splits or '(none)'}.")
  classes = _folders_in(split_dir)
  unlabelled = not classes  # images directly in root/<split>/: one class ""
  paths, labels, ignored, broken = [], [], 0, 0
  for label, name in enumerate(classes or [""]):
    files_here, ignored_here, broken_here = _images_below(os.path.join(split_dir, name))
    paths.extend(os.path.join(split_dir, name, f) for f in files_here)
    labels.extend([label] * len(files_here))
    ignored += ignored_here
    broken += broken_here
  classes = classes or [""]
  if not paths:
    raise ValueError(
        f"Split {split_dir!r} has no {'/'.join(IMAGE_EXTENSIONS)} images in "
        f"class directories (expected {split}/<class>/<image>, or "
        f"{split}/<image> without labels); it holds: "
        f"{_listing(split_dir)}. Splits found: {splits}.")
  if ignored or broken:
    # A broken link is a lost image, not a stray README: worth a warning.
    logging.log(logging.WARNING if broken else logging.INFO,
        "%s: ignored %d files: %d without an image extension %s, %d broken "
        "links (symlinks to missing files).", split_dir, ignored + broken,
        ignored, IMAGE_EXTENSIONS, broken)
  empty = [c for c, n in zip(classes, np.bincount(labels, minlength=len(
      classes))) if n == 0]
  if empty:
    logging.warning("%s: classes without images (labels kept): %s", split_dir,
                    empty)
  if unlabelled:
    logging.info("%s: %d images without class directories (unlabelled).",
                 split_dir, len(paths))
  else:
    logging.info("%s: %d images in %d classes.", split_dir, len(paths),
                 len(classes))
  paths_t = tf.constant(paths)  # captured by reference, not copied per graph
  labels_t = tf.constant(labels, tf.int32)

  def load_batch(indices):
    return tf.gather(paths_t, indices), tf.gather(labels_t, indices)

  return Source(name=dataset, split=split, num_examples=len(paths),
                class_names=tuple(classes), random_access=True,
                skip_bad_images=skip_bad_images, load_batch=load_batch,
                load_example=_read_url if remote else tf.io.read_file,
                describe=lambda i: paths[int(i)], unlabelled=unlabelled,
                file_names=lambda: [os.path.basename(p) for p in paths],
                paths=lambda: [_relative(p, root) for p in paths])


def _is_tiny_imagenet_archive(root: str) -> bool:
  """Whether `root` is Tiny ImageNet as unpacked (tiny-imagenet-200/): val/images/ and
  val/val_annotations.txt, which as a folder would read as one unlabelled val split."""
  val = os.path.join(root, "val")
  return (_is_dir(os.path.join(val, "images"))
          and files.as_path(os.path.join(val, "val_annotations.txt")).is_file())


def op_message(text: str) -> str:
  """A TensorFlow op error's own words, without the graph's names around them:
  "{{function_node ...}} Unknown image file format. [Op:DecodeImage] name: " ->
  "Unknown image file format"."""
  text = re.sub(r"\{\{[^{}]*\}\}", " ", text)
  text = re.sub(r"\[\[.*?\]\]", " ", text, flags=re.S)
  text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
  return " ".join(text.split()).rstrip(".")


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [""])[0]


def _is_dir(path: str) -> bool:
  """Whether `path` is a folder: os for a local path, epath for a URL (gs://...)."""
  if files.is_url(path):
    return files.as_path(path).is_dir()
  return os.path.isdir(path)


def _parent_holds(path: str) -> str:
  """"; <parent> holds: <entries>." for the folder holding `path`, or "." if none."""
  if not files.is_url(path):
    parent = os.path.dirname(os.path.abspath(path or "."))
  else:
    scheme, rest = path.split("://", 1)
    rest = rest.rstrip("/")
    if "/" not in rest:  # a bucket: nothing above it to list
      return "."
    parent = f"{scheme}://{rest.rsplit('/', 1)[0]}"
  try:
    if not _is_dir(parent):
      return "."
  except Exception:  # pylint: disable=broad-except
    return "."  # the message is about `path`; an unreadable parent adds nothing
  return f"; {parent} holds: {_listing(parent)}."


def _folders_in(path: str) -> list[str]:
  """Names of the folders (or links to folders) directly in `path`, sorted."""
  if not files.is_url(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir())
  _, dirs, _ = next(iter(_walk(path)))
  return sorted(dirs)


def _walk(top: str):
  """(folder, its folder names, its file names) below `top`, as os.walk.

  A local path is walked by os, following directory links; a URL by epath (an
  object store has no links).
  """
  if not files.is_url(top):
    yield from os.walk(top, followlinks=True)
    return
  for parent, dirs, names in files.as_path(top).walk():
    # TensorFlow's GCS listing may end a folder's name with "/".
    yield os.fspath(parent), [d.rstrip("/") for d in dirs], names


def _read_url(path: tf.Tensor) -> tf.Tensor:
  """tf.io.read_file for a URL (gs://...), reading the bytes through epath.

  TensorFlow's own file system for the scheme may be missing or not the one that
  serves the rest of the run's files.

  Args:
    path: a scalar string tensor, the file's URL.

  Returns:
    A scalar string tensor, the file's bytes.
  """
  def read(url):
    data = files.as_path(np.asarray(url).item().decode()).read_bytes()
    return np.array(data, dtype=object)  # a bytes ("S") array would drop trailing NULs
  data = tf.numpy_function(read, [path], tf.string, stateful=False)
  data.set_shape([])
  return data


def _images_below(class_dir: str) -> tuple[list[str], int, int]:
  """(image paths relative to `class_dir`, sorted; other files; broken links) below it.

  Recursive, following directory links, as torchvision's ImageFolder: the official
  Tiny ImageNet layout train/<wnid>/images/<image> reads as is. A symlink to a missing
  file is counted apart: it is a lost image, not a stray file. `class_dir` may be a
  URL (gs://...), listed through epath; an object store has no links to break.
  """
  local = not files.is_url(class_dir)
  images, ignored, broken = [], 0, 0
  for parent, dirs, names in _walk(class_dir):
    dirs.sort()
    for f in names:
      path = os.path.join(parent, f)
      if local and os.path.islink(path) and not os.path.exists(path):
        broken += 1
      elif f.lower().endswith(IMAGE_EXTENSIONS):
        images.append(_relative(path, class_dir))
      else:
        ignored += 1
  return sorted(images), ignored, broken


def _relative(path: str, top: str) -> str:
  """`path` relative to the folder `top` that holds it; a URL is never made absolute."""
  if not files.is_url(path):
    return os.path.relpath(path, top)
  # Lexically, on the part after the scheme, so no local call sees the URL.
  return posixpath.relpath("/" + path.split("://", 1)[1], "/" + top.split("://", 1)[1])


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


def _tfds_source(dataset, tfds_name, data_dir, split, skip_bad_images,
                 random_access, subset=None) -> Source:
  builder = _prepare_on_first_use(dataset, tfds_name, data_dir,
                                  _tfds_builder(dataset, tfds_name, data_dir))
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


def _random_access_tfds(dataset, split, data_source, image_key, class_names,
                        label_map, is_subset, skip_bad_images, builder):
  if is_subset:
    all_labels = labels_lib.all_labels(
        builder, split, lambda: labels_lib.scan_labels(data_source), len(data_source))
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

  def field(key):
    def read():
      # One pass over the split's records (ImageNet: its 1.28M records, image bytes
      # included, since each record is read whole).
      logging.info("Reading the %s of every record of %s %s once.", key, builder.name,
                   split)
      keys = base_index if base_index is not None else range(len(data_source))
      values = _read_field(data_source, key, [int(k) for k in keys])
      return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return read

  features = builder.info.features
  names = [k for k in ("file_name", "id") if k in features.keys()
           and isinstance(features[k], tfds.features.Text)]
  return Source(name=dataset, split=split, num_examples=num_examples,
                class_names=class_names, random_access=True,
                skip_bad_images=skip_bad_images, load_batch=load_batch,
                load_example=lambda x: x, describe=describe,
                file_names=field("file_name") if "file_name" in names else None,
                paths=field(names[0]) if names else None)


def _streaming_tfds(dataset, split, builder, decoders, image_key, class_names,
                    label_map, is_subset, skip_bad_images, data_dir):
  label_map_t = tf.constant(label_map)

  def read(split_arg, seed, shuffle, keep_all=False):
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = builder.as_dataset(split=split_arg, decoders=decoders,
                            shuffle_files=shuffle, read_config=read_config)
    ds = ds.map(as_written(lambda ex: dict(data=ex[image_key], label=ex["label"])))
    if keep_all:
      return ds
    ds = ds.map(as_written(lambda ex: dict(data=ex["data"], label=tf.gather(
        label_map_t, ex["label"]))))
    if is_subset:
      ds = ds.filter(as_written(lambda ex: ex["label"] >= 0))
    return ds

  try:
    probe = read(split, 0, False)
  except Exception as e:  # pylint: disable=broad-except
    raise _not_prepared(dataset, builder, split, e) from None
  if is_subset:
    def read_labels():
      ds = read(split, 0, False, keep_all=True).map(as_written(lambda ex: ex["label"]))
      return np.concatenate(list(ds.batch(8192).as_numpy_iterator()))
    all_labels = labels_lib.all_labels(builder, split, read_labels)
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


