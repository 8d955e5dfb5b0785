"""The workdir: checked usable before any model set-up, in every mode.

A workdir is a local directory or a URL (gs://bucket/run, through `files`). A URL is
probed by making it and writing and removing a file there, within REMOTE_TIMEOUT_S
seconds: without network or credentials that fails (or hangs in retries) and the run
stops at start in one line, instead of at its first checkpoint.
"""
from __future__ import annotations

import importlib
import os
import tempfile
import threading
import uuid

from corinfomax_jax import files
from corinfomax_jax.errors import WorkdirError

REMOTE_TIMEOUT_S = 60.0  # a URL workdir that gives no answer in this time is unreachable
_GCS_HINT = ("A gs:// workdir needs an existing bucket and credentials that may write "
             "to it (`gcloud auth application-default login`, or "
             "GOOGLE_APPLICATION_CREDENTIALS naming a service-account key).")


def check_workdir(workdir: str, *, create: bool = True) -> None:
  """Raises WorkdirError (a ConfigError) unless `workdir` is (or, with `create`, can be
  made) a writable directory.

  Writability is tested by creating and removing a file, not by permission bits: they
  say nothing for root, read-only mounts or full quotas.
  """
  if not workdir:
    raise WorkdirError("--workdir is empty: name a directory for checkpoints and results.")
  if files.is_url(workdir):
    _check_remote(workdir, create=create)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir!r} is a file, not a directory: name a "
                       "directory (it is created if missing).")
  if not os.path.isdir(workdir):
    if not create:
      return
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"--workdir {workdir!r} cannot be created: "
                         f"{e.strerror or e} ({e.filename or workdir}).") from None
  try:
    with tempfile.TemporaryFile(dir=workdir, prefix=".write_probe_"):
      pass
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir!r} is not writable: "
                       f"{e.strerror or e}.") from None


def _check_remote(workdir: str, *, create: bool) -> None:
  gcs = workdir.startswith("gs://")
  if gcs:
    _check_gcs_client(workdir)
  failure = _failure_within(REMOTE_TIMEOUT_S, _probe_remote, workdir, create)
  if failure:
    raise WorkdirError(f"--workdir {workdir!r} cannot be reached or written: "
                       f"{failure.rstrip('.')}." + (f" {_GCS_HINT}" if gcs else ""))


def _check_gcs_client(workdir: str) -> None:
  """orbax lists the steps of a gs:// checkpoint directory with Google's storage client."""
  try:
    importlib.import_module("google.cloud.storage")
  except ImportError:
    raise WorkdirError(
        f"--workdir {workdir!r} needs the google-cloud-storage package (orbax lists gs:// "
        "checkpoints through it): pip install google-cloud-storage, or pip install "
        "\"corinfomax-jax[gcs]\".") from None


def _probe_remote(workdir: str, create: bool) -> None:
  path = files.as_path(workdir)
  if create:
    path.mkdir(parents=True, exist_ok=True)
  elif not path.is_dir():
    return  # a reading mode says "no checkpoint" later, as for a local path
  probe = path / f".write_probe_{uuid.uuid4().hex}"
  probe.write_bytes(b"")
  probe.unlink()


def _failure_within(timeout_s: float, fn, *args) -> str | None:
  """None when fn(*args) returns within timeout_s, else why not, in one line.

  A daemon thread, because a client retrying an unreachable host cannot be interrupted;
  it is abandoned, and does not keep the process alive.
  """
  outcome = []

  def run():
    try:
      fn(*args)
      outcome.append(None)
    except Exception as e:  # pylint: disable=broad-except
      outcome.append(" ".join(str(e).split())[:300] or type(e).__name__)

  thread = threading.Thread(target=run, daemon=True, name="workdir_probe")
  thread.start()
  thread.join(timeout_s)
  if not outcome:
    return f"no answer within {timeout_s:g} s"
  return outcome[0]
