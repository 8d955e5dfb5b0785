"""An image folder as a source: root/<split>/<class>/<image>, or root/<split>/<image>.

Labels come from the sorted class folder names; a split without class folders is one
unlabelled class "" (pretraining only). The root may be a local path or a URL (gs://...,
read through epath). Opening the folder lists it and checks it: a missing root, split or
image fails here with a message that says what does exist.
"""
from __future__ import annotations

import os
import posixpath

from absl import logging
import numpy as np
import tensorflow as tf

from corinfomax_jax import files
from corinfomax_jax.data.sources.base import RandomAccessSource
from corinfomax_jax.data.sources.base import listing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class FolderSource(RandomAccessSource):
  """One split of an image folder: its image paths, sorted by class then path."""
  has_file_names = True
  has_paths = True

  def __init__(self, *, name: str, root: str, split: str, image_paths: list[str],
               labels: list[int], class_names: tuple[str, ...], skip_bad_images: bool,
               unlabelled: bool):
    super().__init__(name=name, split=split, num_examples=len(image_paths),
                     class_names=class_names, skip_bad_images=skip_bad_images,
                     unlabelled=unlabelled)
    self.root = root
    self._image_paths = image_paths
    # Captured by reference, not copied per graph.
    self._paths_t = tf.constant(image_paths)
    self._labels_t = tf.constant(labels, tf.int32)

  def load_batch(self, indices):
    return tf.gather(self._paths_t, indices), tf.gather(self._labels_t, indices)

  def load_example(self, data):
    return _read_url(data) if files.is_url(self.root) else tf.io.read_file(data)

  def describe(self, index):
    return self._image_paths[int(index)]

  def file_names(self):
    return [os.path.basename(p) for p in self._image_paths]

  def paths(self):
    return [_relative(p, self.root) for p in self._image_paths]


def open_folder(dataset: str, root: str, split: str,
                skip_bad_images: bool) -> FolderSource:
  """The `split` of the image folder `root`, listed and checked (`get_source`)."""
  split_dir, splits = _split_dir(root, split)
  classes = _folders_in(split_dir)
  unlabelled = not classes  # images directly in root/<split>/: one class ""
  image_paths, labels, ignored, broken = [], [], 0, 0
  for label, name in enumerate(classes or [""]):
    files_here, ignored_here, broken_here = _images_below(os.path.join(split_dir, name))
    image_paths.extend(os.path.join(split_dir, name, f) for f in files_here)
    labels.extend([label] * len(files_here))
    ignored += ignored_here
    broken += broken_here
  classes = classes or [""]
  if not image_paths:
    raise ValueError(
        f"Split {split_dir!r} has no {'/'.join(IMAGE_EXTENSIONS)} images in "
        f"class directories (expected {split}/<class>/<image>, or "
        f"{split}/<image> without labels); it holds: "
        f"{listing(split_dir)}. Splits found: {splits}.")
  _log_what_was_found(split_dir, classes, labels, unlabelled, ignored, broken)
  return FolderSource(name=dataset, root=root, split=split, image_paths=image_paths,
                      labels=labels, class_names=tuple(classes),
                      skip_bad_images=skip_bad_images, unlabelled=unlabelled)


def _split_dir(root: str, split: str) -> tuple[str, list[str]]:
  """(root/split, the splits found in root), or a ValueError saying what exists."""
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
  return split_dir, splits


def _log_what_was_found(split_dir, classes, labels, unlabelled, ignored, broken):
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
                 split_dir, len(labels))
  else:
    logging.info("%s: %d images in %d classes.", split_dir, len(labels),
                 len(classes))


def _is_tiny_imagenet_archive(root: str) -> bool:
  """Whether `root` is Tiny ImageNet as unpacked (tiny-imagenet-200/): val/images/ and
  val/val_annotations.txt, which as a folder would read as one unlabelled val split."""
  val = os.path.join(root, "val")
  return (_is_dir(os.path.join(val, "images"))
          and files.as_path(os.path.join(val, "val_annotations.txt")).is_file())


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
  return f"; {parent} holds: {listing(parent)}."


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
