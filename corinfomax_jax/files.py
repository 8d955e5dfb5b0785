"""Where a run's files live: local paths and URLs (gs://bucket/dir) alike, as epath Paths.

Every file the trainer reads or writes in a workdir goes through `as_path`, so a URL goes
to etils.epath's backend for its scheme (TensorFlow's gfile where TensorFlow is
installed, else fsspec: gcsfs for gs://) and is never made absolute: `os.path.abspath`
would turn gs://b/run into <cwd>/gs:/b/run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading

from etils import epath

_COPY_CHUNK = 16 << 20  # bytes per read when copying a local file to a URL
# Seconds a read of a workdir file (a checkpoint, the run record, the lock) may take
# before the run stops, naming it: a stuck network filesystem otherwise hangs forever.
READ_TIMEOUT_ENV = "CORINFOMAX_READ_TIMEOUT_S"
DEFAULT_READ_TIMEOUT_S = 600.0


def read_timeout_s() -> float:
  """$CORINFOMAX_READ_TIMEOUT_S, or DEFAULT_READ_TIMEOUT_S when it is unset."""
  value = os.environ.get(READ_TIMEOUT_ENV)
  if not value:
    return DEFAULT_READ_TIMEOUT_S
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1.0
  if not seconds > 0:
    from corinfomax_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"{READ_TIMEOUT_ENV}={value!r} is invalid: expected a number of "
                      f"seconds > 0 (default {DEFAULT_READ_TIMEOUT_S:g}).")
  return seconds


def within_read_timeout(what: str, fn, *args, **kwargs):
  """fn(*args, **kwargs), or ReadTimeoutError naming `what` when it gives no answer in
  read_timeout_s().

  fn runs in a daemon thread: a read blocked in the kernel cannot be interrupted, so it
  is abandoned (and does not keep the process alive). Its exception is raised here.
  """
  from corinfomax_jax.errors import ReadTimeoutError  # pylint: disable=g-import-not-at-top
  timeout = read_timeout_s()
  outcome = []

  def run():
    try:
      outcome.append((True, fn(*args, **kwargs)))
    except BaseException as e:  # pylint: disable=broad-except
      outcome.append((False, e))

  thread = threading.Thread(target=run, daemon=True, name="bounded_read")
  thread.start()
  thread.join(timeout)
  if not outcome:
    raise ReadTimeoutError(
        f"Reading {what} gave no answer within {timeout:g} s (a stuck filesystem or "
        f"network store?); check that it reads (e.g. with cat), or raise "
        f"{READ_TIMEOUT_ENV}.")
  ok, value = outcome[0]
  if not ok:
    raise value
  return value


def is_url(location: str | os.PathLike) -> bool:
  """True for scheme://... locations (gs://, s3://), which no local call may touch."""
  return "://" in os.fspath(location)


def as_path(location: str | os.PathLike) -> epath.Path:
  """`location` as an epath Path: URLs as given, local paths made absolute."""
  if is_url(location):
    return epath.Path(os.fspath(location))
  return epath.Path(os.path.abspath(os.fspath(location)))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` whole (a reader never sees half a file), making its folder.

  A local file is written beside and renamed over; an object store publishes an object
  only when its upload completes, so a URL is written directly.
  """
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f"{path.name}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def scratch_dir(near: str | os.PathLike) -> str:
  """A new local folder for files that only a local disk can take (memory maps).

  Beside `near` when that is local (the same disk, so a rename moves the result), else
  under the system's temporary folder (TMPDIR).
  """
  if is_url(near):
    return tempfile.mkdtemp(prefix="corinfomax_scratch_")
  path = as_path(near)
  path.mkdir(parents=True, exist_ok=True)
  return os.fspath(path)


def move_local_file(local_file: str, dst: str | os.PathLike) -> None:
  """Puts a finished local file at `dst`: a rename on a local disk, an upload to a URL."""
  dst = as_path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  if not is_url(dst):
    os.replace(local_file, os.fspath(dst))
    return
  with open(local_file, "rb") as src, dst.open("wb") as out:
    shutil.copyfileobj(src, out, _COPY_CHUNK)
  os.remove(local_file)
