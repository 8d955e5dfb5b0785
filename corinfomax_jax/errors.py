"""Errors a user can cause, shared by every layer; main.py prints them as one line."""
import os
import sys


class ConfigError(ValueError):
  """A configuration value that cannot work; raised before any work is done."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full disk); the earlier ones are intact."""


class WorkdirError(ConfigError):
  """The workdir cannot be made, reached or written; no file can be left in it."""


class WorkdirBusyError(WorkdirError):
  """Another run holds the workdir's lock; its files are left alone (no error.log)."""


_terminal_fd = None  # the process's stderr before quiet_stderr, once it has run


def quiet_stderr() -> None:
  """Points file descriptor 2 at the null device, keeping the original for last_line.

  For a process that is about to end on an error: background threads (a failed
  checkpoint's writers) can go on printing tracebacks after the error is known, and the
  one-line error must stay the last thing on stderr. Idempotent.
  """
  global _terminal_fd
  if _terminal_fd is not None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  _terminal_fd = os.dup(2)
  quiet = os.open(os.devnull, os.O_WRONLY)
  os.dup2(quiet, 2)
  os.close(quiet)


def last_line(text: str) -> None:
  """Writes `text` to the process's stderr (the original one after quiet_stderr)."""
  os.write(2 if _terminal_fd is None else _terminal_fd, text.encode("utf-8", "replace"))
