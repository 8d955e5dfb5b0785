"""The workdir: checked usable before any model set-up, in every mode."""
from __future__ import annotations

import os
import tempfile

from corinfomax_jax.errors import ConfigError


def check_workdir(workdir: str, *, create: bool = True) -> None:
  """Raises ConfigError unless `workdir` is (or, with `create`, can be made) a writable
  directory.

  Writability is tested by creating and removing a file, not by permission bits: they
  say nothing for root, read-only mounts or full quotas.
  """
  if not workdir:
    raise ConfigError("--workdir is empty: name a directory for checkpoints and results.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} is a file, not a directory: name a "
                      "directory (it is created if missing).")
  if not os.path.isdir(workdir):
    if not create:
      return
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ConfigError(f"--workdir {workdir!r} cannot be created: "
                        f"{e.strerror or e} ({e.filename or workdir}).") from None
  try:
    with tempfile.TemporaryFile(dir=workdir, prefix=".write_probe_"):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir {workdir!r} is not writable: {e.strerror or e}.") from None
