"""Checkpoints: a state pytree plus a JSON record, in orbax step directories.

A checkpoint directory holds `<step>/` directories, each with the item "state" (the
pytree) and "run" (a JSON record that says which configuration wrote it and carries the
checkpoint `FORMAT`). Saves are asynchronous; a save cut short by a crash leaves a
temporary directory that the next run removes.
"""
from __future__ import annotations

import contextlib
import gc
import logging as logging_std
from typing import Any, Callable

import jax
from absl import logging

from corinfomax_jax import files
from corinfomax_jax.errors import CheckpointSaveError
from corinfomax_jax.errors import ConfigError

# Version of the checkpoint layout; a record without it comes from an older layout.
FORMAT = 2


def create_manager(directory, *, keep: int):
  """An orbax CheckpointManager of `directory` (a local path or a URL)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(files.as_path(directory), options=options, item_names=("state", "run"))


_pending_step = {}  # id(manager) -> the step of its latest asynchronous save


def save(manager, step: int, state: Any, record: dict) -> None:
  """Starts an asynchronous save of (state, record) as `step`.

  The previous save must have finished first (orbax waits for it anyway): if it failed,
  CheckpointSaveError says so now, instead of a pile of tracebacks at the end.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  finish(manager)
  _pending_step[id(manager)] = step
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      run=ocp.args.JsonSave({**record, "format": FORMAT})))


def finish(manager) -> None:
  """Waits for the pending save; CheckpointSaveError (one line) if it failed."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    step = _pending_step.pop(id(manager), None)
    manager.reload()
    good = [s for s in manager.all_steps() if s != step]
    cause = " ".join(str(e).split()) or type(e).__name__
    if len(cause) > 300:  # the OS's reason ("File too large") ends the message
      cause = "..." + cause[-240:]
    raise CheckpointSaveError(
        f"Saving the checkpoint of step {step} in {manager.directory} failed ({cause}); "
        f"the last good checkpoint is "
        f"{f'step {max(good)}' if good else 'none'}. Free space there (or use another "
        "--workdir) and run again to resume.") from None


def restore_latest(manager, template: Any, check_record: Callable[[dict, int], None], *,
                   set_aside: bool = True) -> tuple[Any, dict | None]:
  """The latest usable checkpoint: (state, record), or (None, None) when there is none.

  `template` is the state pytree to restore into, or a function of the checkpoint's
  record that returns it. `check_record(record, step)` raises ConfigError for a
  checkpoint this run must not use (another model); that error propagates. A record of an older layout is refused the
  same way. A checkpoint that cannot be read (a file truncated by a crash) is skipped
  in favour of the one before it, with one warning and, when `set_aside` (a writer of
  new checkpoints), renamed `<step>.unreadable`: nothing is deleted and no good
  checkpoint is overwritten.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  template_fn = template if callable(template) else lambda record: template
  unreadable = {}  # step -> why
  found = None, None
  with _unretrieved_futures_silenced():
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        record = manager.restore(
            step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
      except Exception as e:  # pylint: disable=broad-except
        record, error = None, e
      if record is not None:
        if record.get("format") != FORMAT:
          raise ConfigError(
              f"The checkpoints in {manager.directory} were written by an older version "
              f"of corinfomax-jax (checkpoint format {record.get('format', 1)}, this "
              f"version reads format {FORMAT}). Use a new --workdir, or the version that "
              "wrote them.")
        check_record(record, step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_fn(record))
        try:
          state = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract)))["state"]
          found = state, record
          break
        except Exception as e:  # pylint: disable=broad-except
          error = e
      unreadable[step] = (f"{type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''}")
  moved = _set_aside(manager, list(unreadable)) if unreadable and set_aside else {}
  for step, why in unreadable.items():  # one line each
    logging.warning("Checkpoint step %d in %s is unreadable (%s); %s.", step,
                    manager.directory, why,
                    f"moved to {moved[step]}" if step in moved else "skipped")
  if unreadable and found[0] is None and set_aside:
    logging.warning("No readable checkpoint in %s: starting from scratch.", manager.directory)
  return found


class UnretrievedFutures(logging_std.Filter):
  """Drops asyncio's "exception was never retrieved" records (orbax's failed futures)."""

  def filter(self, record):
    return "exception was never retrieved" not in record.getMessage()


@contextlib.contextmanager
def _unretrieved_futures_silenced():
  """A failed restore leaves orbax's sibling asyncio futures failed and unread; asyncio
  logs a traceback for each when they are collected. The warning above says it once."""
  quiet = UnretrievedFutures()
  asyncio_logger = logging_std.getLogger("asyncio")
  asyncio_logger.addFilter(quiet)
  try:
    yield
  finally:
    gc.collect()  # collect them while the filter is on
    asyncio_logger.removeFilter(quiet)


def check_same(saved: dict, expected: dict, step: int, directory, prefix: str = "") -> None:
  """Raises ConfigError naming every key whose saved value differs from `expected`."""
  mismatched = {k: (saved[k], v) for k, v in expected.items() if k in saved and saved[k] != v}
  if mismatched:
    detail = ", ".join(f"config.{prefix}{k}: checkpoint {a!r} vs config {b!r}"
                       for k, (a, b) in mismatched.items())
    raise ConfigError(
        f"The checkpoint of step {step} in {directory} was written by a different "
        f"configuration ({detail}). Use another --workdir, or the original configuration.")


def _set_aside(manager, steps) -> dict:
  """Renames unreadable step directories so that new saves never collide with them:
  {step: new path}."""
  moved = {}
  if jax.process_index() == 0:
    for step in steps:
      path = files.as_path(manager.directory) / str(step)
      target = path.parent / f"{step}.unreadable"
      suffix = 1
      while target.exists():
        target, suffix = path.parent / f"{step}.unreadable{suffix}", suffix + 1
      path.rename(target)
      moved[step] = str(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("corinfomax_set_aside_unreadable_checkpoints")
  manager.reload()
  return moved
