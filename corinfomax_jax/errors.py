"""Errors a user can cause, shared by every layer; main.py prints them as one line."""


class ConfigError(ValueError):
  """A configuration value that cannot work; raised before any work is done."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


class DivergenceError(FloatingPointError):
  """Training reached a state that is not finite, or diverged, or collapsed; it was not
  saved, and the latest checkpoint is the last healthy one."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full disk); the earlier ones are intact."""


class WorkdirError(ConfigError):
  """The workdir cannot be made, reached or written; no file can be left in it."""


class WorkdirBusyError(WorkdirError):
  """Another run holds the workdir's lock; its files are left alone (no error.log)."""


class ReadTimeoutError(WorkdirError):
  """A read of a workdir file gave no answer in time (files.read_timeout_s)."""
