"""Errors a user can cause, shared by every layer; main.py prints them as one line."""


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
