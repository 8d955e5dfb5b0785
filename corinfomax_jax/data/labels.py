"""The label of every example of a TFDS split, read once per workdir.

A class subset of a TFDS data set (`imagenet100`: 100 classes of `imagenet2012`) needs
every label of the split before its first batch: which records belong to the subset.
Reading them is a pass over the whole split (ImageNet's train split: 1.28M records,
about 140 GB, since a record holds its image), so the labels are kept where the next
start finds them, looked up in this order:

  1. beside the TFDS data (<data_dir>/<name>/<version>/corinfomax_labels_<split>.npy),
     where that folder is writable;
  2. the workdir's label index, <workdir>/labels/<name>-<version>-<split>.npy with a
     JSON sidecar naming the builder, version, split and example count, checked on
     read (a mismatch is logged in one line and recomputed);
  3. a scan of the split (`scan_labels`), which takes the label from each raw record's
     tf.Example without TFDS's conversion of its other features (the image bytes are
     still read: the label is inside the record).

The workdir reaches this module once per start: `use_workdir`, which
`modes.startup.begin` calls. In a run of several processes sharing the workdir, process
0 scans and writes the index while the others wait for it and read it, so a pod's 64
hosts read the split once between them, and once per workdir rather than per start.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import re
from typing import Callable

from absl import logging
import jax
import numpy as np

from corinfomax_jax import files

LABELS_FOLDER = "labels"  # inside the workdir
_CHUNK = 1024  # records per batched read
_THREADS = 16  # concurrent batched reads (ArrayRecord reads release the GIL)

_labels_dir: str | None = None  # set once per start by use_workdir


def use_workdir(workdir: str | None) -> None:
  """Keeps label indexes in <workdir>/labels from now on (None: in no workdir)."""
  global _labels_dir
  _labels_dir = None if workdir is None else str(files.as_path(workdir) / LABELS_FOLDER)


def labels_dir() -> str | None:
  """The folder of this start's label indexes, or None when no workdir was given."""
  return _labels_dir


def all_labels(builder, split: str, compute: Callable[[], np.ndarray],
               expected: int | None = None) -> np.ndarray:
  """int64 label of every example of `split` of the TFDS `builder`, in index order.

  Args:
    builder: the prepared TFDS builder (its name, version and data_dir name the index).
    split: the split as given to TFDS ("train", "train[:10%]", ...).
    compute: () -> the labels, by a pass over the split; called only when neither the
      cache beside the data nor the workdir's index holds them.
    expected: the split's example count when known (an index of another length is
      recomputed); else the count TFDS records for the split, where it has one.
  """
  expected = _num_examples(builder, split) if expected is None else expected
  found = _read_beside_data(builder, split, expected)
  if found is None:
    found = read_index(builder, split, expected)
  if _labels_dir is None or _process_count() == 1:
    if found is not None:
      return found
    labels = _scan(builder, split, compute)
    _write_beside_data(builder, split, labels)
    if _labels_dir is not None:
      write_index(builder, split, labels)
    return labels
  # Several processes sharing the workdir: process 0 scans, the others read its index.
  # Every process takes the same two decisions from process 0, so each collective is
  # reached by all of them.
  if not _broadcast_from_0(found is None):
    return found if found is not None else _scan(builder, split, compute)
  if _process_index() == 0:
    try:
      labels = _scan(builder, split, compute)
      written = write_index(builder, split, labels)
    except Exception:
      _broadcast_from_0(False)  # the others scan for themselves instead of waiting
      raise
    _broadcast_from_0(written)
    _write_beside_data(builder, split, labels)
    return labels
  if _broadcast_from_0(False):
    labels = read_index(builder, split, expected)
    if labels is not None:
      return labels
  return found if found is not None else _scan(builder, split, compute)


def scan_labels(data_source, label_only: bool = True) -> np.ndarray:
  """int64 label of every record of a TFDS ArrayRecord data source, in index order.

  label_only: read the raw records and take the label from each record's tf.Example
  proto, without TFDS's conversion of every feature; False, or a source whose raw
  records are not reachable or not tf.Examples with an int64 "label": deserialize each
  record as TFDS does. Both give the same labels; the bytes are read from disk either
  way (bench/startup_labels.py measures both).
  """
  raw = getattr(data_source, "data_source", None)
  n = len(data_source)
  if label_only and raw is not None:
    try:
      return _in_chunks(n, lambda keys: _parse_labels(raw.__getitems__(keys)))
    except Exception as e:  # pylint: disable=broad-except
      logging.info("Label-only parse unavailable (%s: %s); deserializing records whole.",
                   type(e).__name__, str(e).splitlines()[0] if str(e) else "")

  def whole(keys):
    try:
      records = data_source.__getitems__(keys)  # batched ArrayRecord read
    except Exception:  # pylint: disable=broad-except
      records = [data_source[i] for i in keys]  # e.g. tfds.testing.mock_data's source
    return np.array([r["label"] for r in records], np.int64)
  return _in_chunks(n, whole)


def index_path(builder, split: str) -> str | None:
  """<workdir>/labels/<name>-<version>-<split>.npy, or None when no workdir is set."""
  if _labels_dir is None:
    return None
  return str(files.as_path(_labels_dir) / f"{builder.name}-{builder.version}-"
             f"{_tag(split)}.npy")


def read_index(builder, split: str, expected: int | None) -> np.ndarray | None:
  """The workdir's labels of `split`, or None when absent, unreadable or of another
  builder, version, split or example count (logged in one line)."""
  path = index_path(builder, split)
  if path is None:
    return None
  npy, sidecar = files.as_path(path), files.as_path(path[:-len(".npy")] + ".json")
  if not sidecar.exists():
    return None
  try:
    meta = json.loads(sidecar.read_text())
    labels = np.load(io.BytesIO(npy.read_bytes()), allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    # OSError, ValueError, or a store's own kind (TensorFlow's gfile raises OpErrors).
    logging.warning("Label index %s unreadable (%s); reading the labels again.", path, e)
    return None
  want = _index_meta(builder, split, len(labels) if expected is None else expected)
  have = {k: meta.get(k) for k in want}
  if have != want or len(labels) != want["num_examples"]:
    logging.warning("Label index %s is of %s, not %s; reading the labels again.", path,
                    have, want)
    return None
  logging.info("Labels of %s %s read from %s.", builder.name, split, path)
  return labels.astype(np.int64, copy=False)


def write_index(builder, split: str, labels: np.ndarray) -> bool:
  """Writes the workdir's label index of `split`; whether it was written.

  The sidecar is written last: an index without one is not read.
  """
  path = index_path(builder, split)
  if path is None:
    return False
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(labels, np.int64))
  meta = _index_meta(builder, split, len(labels))
  meta["data_dir"] = str(builder.data_dir)
  try:
    files.write_bytes(path, buffer.getvalue())
    files.write_text(path[:-len(".npy")] + ".json", json.dumps(meta, indent=1) + "\n")
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not write the label index %s: %s", path, e)
    return False
  logging.info("Labels of %s %s written to %s.", builder.name, split, path)
  return True


def beside_data_path(builder, split: str) -> str | None:
  """<data_dir>/corinfomax_labels_<split>.npy of a prepared builder, else None."""
  data_dir = files.as_path(str(builder.data_dir))
  if not builder.is_prepared() or not data_dir.is_dir():
    return None
  return str(data_dir / f"corinfomax_labels_{_tag(split)}.npy")


def _read_beside_data(builder, split, expected) -> np.ndarray | None:
  path = beside_data_path(builder, split)
  if path is None or not files.as_path(path).exists():
    return None
  try:
    labels = np.load(io.BytesIO(files.as_path(path).read_bytes()), allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Cached labels %s unreadable (%s); not used.", path, e)
    return None
  return labels if expected is None or len(labels) == expected else None


def _write_beside_data(builder, split, labels) -> None:
  path = beside_data_path(builder, split)
  if path is None:
    return
  buffer = io.BytesIO()
  np.save(buffer, labels)
  try:
    files.as_path(path).write_bytes(buffer.getvalue())
  except Exception as e:  # pylint: disable=broad-except
    # A read-only folder (OSError) or bucket (gfile's PermissionDeniedError).
    logging.info("Could not cache labels at %s: %s", path, e)


def _scan(builder, split, compute) -> np.ndarray:
  logging.info("Reading all labels of %s %s once to select a class subset.",
               builder.name, split)
  return np.asarray(compute(), np.int64)


def _parse_labels(records) -> np.ndarray:
  """The int64 "label" feature of serialized tf.Examples: the proto parsed alone.

  TFDS's own parse (`deserialize_example_np`) also turns every feature into numpy and
  runs its decoders, several times the proto parse; `tf.io.parse_example` on the label
  key alone is no cheaper here, as the batch's bytes must first be copied into a tensor.
  """
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  return np.array([example_pb2.Example.FromString(record).features.feature["label"]
                   .int64_list.value[0] for record in records], np.int64)


def _in_chunks(n: int, read: Callable[[list[int]], np.ndarray]) -> np.ndarray:
  """read(keys) over 0..n-1 in chunks of _CHUNK, concurrently, concatenated in order."""
  chunks = [list(range(start, min(start + _CHUNK, n))) for start in range(0, n, _CHUNK)]
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    parts = list(pool.map(read, chunks))
  return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _index_meta(builder, split, num_examples) -> dict:
  return {"builder": builder.name, "version": str(builder.version), "split": split,
          "num_examples": int(num_examples)}


def _num_examples(builder, split) -> int | None:
  try:
    return int(builder.info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except
    return None  # unknown split sizes: the index is checked on its own length


def _tag(split: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", split)


def _process_index() -> int:
  return jax.process_index()


def _process_count() -> int:
  return jax.process_count()


def _broadcast_from_0(flag: bool) -> bool:
  """Process 0's `flag` on every process (a collective: every process must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
