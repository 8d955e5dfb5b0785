"""Checkpoints: a state pytree plus a JSON record, in orbax step directories.

A checkpoint directory holds `<step>/` directories, each with the item "state" (the
pytree) and "run" (a JSON record that says which configuration wrote it and carries the
checkpoint `FORMAT`). Saves are asynchronous; a save cut short by a crash leaves a
temporary directory that the next run removes.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
from absl import logging

from corinfomax_jax.errors import ConfigError

# Version of the checkpoint layout; a record without it comes from an older layout.
FORMAT = 2


def create_manager(directory: str, *, keep: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "run"))


def save(manager, step: int, state: Any, record: dict) -> None:
  """Starts an asynchronous save of (state, record) as `step`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      run=ocp.args.JsonSave({**record, "format": FORMAT})))


def restore_latest(manager, template: Any, check_record: Callable[[dict, int], None], *,
                   set_aside: bool = True) -> tuple[Any, dict | None]:
  """The latest usable checkpoint: (state, record), or (None, None) when there is none.

  `template` is the state pytree to restore into, or a function of the checkpoint's
  record that returns it. `check_record(record, step)` raises ConfigError for a checkpoint this run must not use
  (another model); that error propagates. A record of an older layout is refused the
  same way. A checkpoint that cannot be read (a file truncated by a crash) is skipped
  with one warning in favour of the one before it and, when `set_aside` (a writer of
  new checkpoints), renamed `<step>.unreadable`: nothing is deleted and no good
  checkpoint is overwritten.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  template_fn = template if callable(template) else lambda record: template
  unreadable = []
  found = None, None
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      record = manager.restore(
          step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except Exception as e:  # pylint: disable=broad-except
      record, error = None, e
    if record is not None:
      if record.get("format") != FORMAT:
        raise ConfigError(
            f"The checkpoints in {manager.directory} were written by an older version of "
            f"corinfomax-jax (checkpoint format {record.get('format', 1)}, this version "
            f"reads format {FORMAT}). Use a new --workdir, or the version that wrote them.")
      check_record(record, step)
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_fn(record))
      try:
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        found = state, record
        break
      except Exception as e:  # pylint: disable=broad-except
        error = e
    logging.warning("Checkpoint step %d in %s is unreadable (%s: %s); trying an older one.",
                    step, manager.directory, type(error).__name__,
                    str(error).splitlines()[0][:200] if str(error) else "")
    unreadable.append(step)
  if unreadable and set_aside:
    _set_aside(manager, unreadable)
    if found[0] is None:
      logging.warning("No readable checkpoint in %s: starting from scratch.", manager.directory)
  return found


def check_same(saved: dict, expected: dict, step: int, directory, prefix: str = "") -> None:
  """Raises ConfigError naming every key whose saved value differs from `expected`."""
  mismatched = {k: (saved[k], v) for k, v in expected.items() if k in saved and saved[k] != v}
  if mismatched:
    detail = ", ".join(f"config.{prefix}{k}: checkpoint {a!r} vs config {b!r}"
                       for k, (a, b) in mismatched.items())
    raise ConfigError(
        f"The checkpoint of step {step} in {directory} was written by a different "
        f"configuration ({detail}). Use another --workdir, or the original configuration.")


def _set_aside(manager, steps):
  """Renames unreadable step directories so that new saves never collide with them."""
  if jax.process_index() == 0:
    for step in steps:
      path = os.path.join(str(manager.directory), str(step))
      target = f"{path}.unreadable"
      suffix = 1
      while os.path.exists(target):
        target, suffix = f"{path}.unreadable{suffix}", suffix + 1
      os.rename(path, target)
      logging.warning("Moved unreadable checkpoint %s to %s.", path, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("corinfomax_set_aside_unreadable_checkpoints")
  manager.reload()
