"""Checkpoints: a state pytree plus a JSON record, in orbax step directories.

A checkpoint directory holds `<step>/` directories, each with the item "state" (the
pytree) and "run" (a JSON record that says which configuration wrote it and carries the
checkpoint `FORMAT`). Saves are asynchronous; a save cut short by a crash leaves a
temporary directory that the next run removes.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import logging as logging_std
import sys
from typing import Any, Callable

import jax
from absl import logging

from corinfomax_jax import files
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.run import health
from corinfomax_jax.errors import CheckpointSaveError
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.errors import ReadTimeoutError

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
    remedy = ("Free space there (or use another --workdir)" if _is_out_of_space(e)
              else "Fix that (or use another --workdir)")
    raise CheckpointSaveError(
        f"Saving the checkpoint of step {step} in {manager.directory} failed ({cause}); "
        f"the last good checkpoint is "
        f"{f'step {max(good)}' if good else 'none'}. {remedy} and run again to "
        "resume.") from None


_OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OUT_OF_SPACE_TEXTS = ("No space left", "Disk quota exceeded", "File too large")


def _is_out_of_space(error: BaseException) -> bool:
  """True when `error` or an exception it chains says the disk, the quota or the file
  size limit is full. orbax rewraps the OS's error, so its text is checked too."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno in _OUT_OF_SPACE_ERRNOS
        or any(text in str(error) for text in _OUT_OF_SPACE_TEXTS)):
      return True
    error = error.__cause__ or error.__context__
  return False


def open_reader(directory):
  """An orbax CheckpointManager that only reads `directory` (a local path or a URL).

  Unlike create_manager's, it creates nothing and leaves alone the temporary directory
  of a save in progress (a pretraining run writing to the same workdir).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Not orbax's read_only option: it only skips saves, with two warnings.
  options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(files.as_path(directory), options=options,
                               item_names=("state", "run"))


def restore_latest(manager, template: Any, check_record: Callable[[dict, int], None], *,
                   set_aside: bool = True, step: int | None = None,
                   check_state: Callable[[Any], str | None] | None = None
                   ) -> tuple[Any, dict | None]:
  """The latest usable checkpoint: (state, record), or (None, None) when there is none.

  The one place that decides which step a run reads: every mode and load_encoder come
  here, so with a damaged latest checkpoint they all read the same earlier step.
  A checkpoint reads when its record and every array of its state read; it is usable
  when it reads and `check_state` accepts its state. Each read that gives no answer
  within files.read_timeout_s() raises ReadTimeoutError naming the step.

  Args:
    manager: the CheckpointManager of the checkpoint directory.
    template: the state pytree to restore into, a function of the checkpoint's record
      that returns it, or None for the tree as saved, each array replicated over this
      process's devices.
    check_record: `check_record(record, step)` raises ConfigError for a checkpoint this
      run must not use (another model); that error propagates, as does the refusal of
      a record of an older layout.
    set_aside: True for a writer of new checkpoints (pretraining): an unreadable
      checkpoint (a file truncated by a crash) is renamed `<step>.unreadable`, and one
      that check_state refuses `<step>.unhealthy`, so nothing is deleted and no new save
      collides with it; when none is usable the run starts from scratch. False (a
      reader): nothing in the directory changes; when checkpoints exist but none reads,
      ConfigError names each step and its damage, and a newer checkpoint that
      check_state refuses is refused in one ConfigError that names the latest usable
      step, if any (a reader never silently reads older weights than the latest).
    step: read only this step (which must exist); ConfigError when it is unreadable.
    check_state: `check_state(state)` says why a restored state must not be used (None:
      usable); default health.nonfinite_weights, NaN or infinite parameters.

  Returns:
    (state, record) of the newest usable step, with one warning line per newer step
    skipped saying why; (None, None) when there is no checkpoint (or, with set_aside,
    none that is usable).
  """
  check_state = check_state or health.nonfinite_weights
  template_fn = template if callable(template) else lambda record: template
  unreadable = {}  # step -> why
  unhealthy = {}  # step -> why
  found, found_step = (None, None), None
  directory = manager.directory
  steps = (sorted(files.within_read_timeout(f"the checkpoints in {directory}",
                                            manager.all_steps), reverse=True)
           if step is None else [step])
  with _unretrieved_futures_silenced():
    for step_ in steps:
      try:
        record, state = _read_step(manager, step_, template, template_fn, check_record)
      except _Unreadable as e:
        unreadable[step_] = str(e)
        continue
      why = check_state(state)
      if why is not None:
        unhealthy[step_] = why
        continue
      found, found_step = (state, record), step_
      break
  _account(manager, unreadable, unhealthy, found_step, step, set_aside)
  return found


def _account(manager, unreadable: dict, unhealthy: dict, found_step, step, set_aside):
  """restore_latest's verdict on the steps it skipped: a reader's refusal, or for a
  writer each skipped step set aside; one warning line per skipped step either way."""
  directory = manager.directory
  if not set_aside:
    _refuse_unhealthy(directory, unhealthy, found_step, step)
  if unreadable and found_step is None and not set_aside:
    if step is not None:
      raise ConfigError(f"The checkpoint of step {step} in {directory} is "
                        f"unreadable ({unreadable[step]}).")
    raise ConfigError(
        f"No readable checkpoint in {directory}: "
        + "; ".join(f"step {s} is unreadable ({why})" for s, why in unreadable.items())
        + ".")
  moved = {}
  if set_aside and (unreadable or unhealthy):
    moved = {**_set_aside(manager, list(unreadable), "unreadable"),
             **_set_aside(manager, list(unhealthy), "unhealthy")}
  for step_ in sorted(unreadable.keys() | unhealthy.keys(), reverse=True):  # one line each
    why = (f"is unreadable ({unreadable[step_]})" if step_ in unreadable
           else f"is not healthy ({unhealthy[step_]})")
    logging.warning("Checkpoint step %d in %s %s; %s%s.", step_, directory, why,
                    f"moved to {moved[step_]}" if step_ in moved else "skipped",
                    f", reading step {found_step}" if found_step is not None else "")
  if (unreadable or unhealthy) and found_step is None and set_aside:
    logging.warning("No usable checkpoint in %s: starting from scratch.", directory)


class _Unreadable(Exception):
  """A checkpoint step whose record or arrays do not read; its message says why."""


def _read_step(manager, step_: int, template, template_fn, check_record):
  """(record, state) of one step; _Unreadable for a damaged one. A read that gives no
  answer in time raises ReadTimeoutError, and check_record's refusal propagates."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = manager.directory
  what = f"the checkpoint of step {step_} in {directory}"
  try:
    record = files.within_read_timeout(
        what, manager.restore, step_,
        args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
  except ReadTimeoutError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(_cause(e)) from None
  _check_format(record, directory)
  check_record(record, step_)
  # Outside the try: a template that fails is a bug, not a damaged checkpoint.
  abstract = None if template is None else jax.tree.map(
      ocp.utils.to_shape_dtype_struct, template_fn(record))
  try:
    if abstract is None:
      abstract = files.within_read_timeout(what, _saved_abstract, manager, step_)
    state = files.within_read_timeout(what, manager.restore, step_,
                                      args=ocp.args.Composite(
                                          state=ocp.args.StandardRestore(abstract)))
  except ReadTimeoutError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(_cause(e)) from None
  return record, state["state"]


def _check_format(record: dict, directory) -> None:
  if record.get("format") != FORMAT:
    raise ConfigError(
        f"The checkpoints in {directory} were written by an older version "
        f"of corinfomax-jax (checkpoint format {record.get('format', 1)}, this "
        f"version reads format {FORMAT}). Use a new --workdir, or the version that "
        "wrote them.")


def check_latest_record(manager, check_record: Callable[[dict, int], None]) -> None:
  """Runs restore_latest's checks of the record (its format, `check_record`) on the
  newest checkpoint whose record reads, reading no array: a run that restore_latest
  would refuse is refused before it compiles anything."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = manager.directory
  steps = files.within_read_timeout(f"the checkpoints in {directory}", manager.all_steps)
  for step in sorted(steps, reverse=True):
    try:
      record = files.within_read_timeout(
          f"the checkpoint of step {step} in {directory}", manager.restore, step,
          args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except ReadTimeoutError:
      raise
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable: restore_latest says so, and sets it aside
    _check_format(record, directory)
    check_record(record, step)
    return


def _refuse_unhealthy(directory, unhealthy: dict, found_step: int | None,
                      step: int | None) -> None:
  """ConfigError for a reader whose latest (or requested) checkpoint is not healthy,
  naming the step, its path and the latest usable step."""
  if not unhealthy:
    return
  newest = max(unhealthy)
  path = files.as_path(directory) / str(newest)
  if step is not None:
    raise ConfigError(f"The checkpoint of step {step} in {directory} is not usable "
                      f"({unhealthy[step]}): a diverged run saved it. Read another step.")
  later = ", ".join(str(s) for s in sorted(unhealthy) if s != newest)
  usable = (f"step {found_step} is the latest usable one: move {path}"
            f"{' (and steps ' + later + ')' if later else ''} out of {directory} to read "
            f"it (load_encoder: step={found_step})" if found_step is not None else
            "no earlier checkpoint is usable: pretrain again with a lower "
            "config.learning_rate")
  raise ConfigError(f"The checkpoint of step {newest} in {directory} is not usable "
                    f"({unhealthy[newest]}): a diverged run saved it; {usable}.")


def _cause(error: BaseException, limit: int = 150) -> str:
  """`Type: first line` of what made a checkpoint unreadable, at most `limit` characters
  of the line. TensorStore's own error (the file and byte range) is the explicit cause
  of orbax's, whose message is the whole store specification."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  line = lines[0] if lines else ""
  if len(line) > limit:
    line = line[:limit] + "..."
  return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _saved_abstract(manager, step: int) -> Any:
  """The state tree of `step` as saved (shapes, dtypes), replicated over this process's
  devices: restoring it needs neither the configuration nor the writer's topology."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  replicated = mesh_lib.replicated(mesh_lib.make_mesh(jax.local_devices()))
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(files.as_path(manager.directory) / str(step) / "state")
  finally:
    handler.close()
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                      metadata)


class UnretrievedFutures(logging_std.Filter):
  """Drops asyncio's "exception was never retrieved" records (orbax's failed futures)."""

  def filter(self, record):
    return "exception was never retrieved" not in record.getMessage()


def closed_loop_callbacks_silenced(previous=None):
  """A `sys.unraisablehook` that drops "Event loop is closed" from orphaned callbacks.

  When an asynchronous save fails (a full disk), orbax's event loop closes while
  tensorstore still completes the save's other writes; each completion's callback into
  the closed loop is reported as an unraisable RuntimeError, hundreds of tracebacks on a
  busy host, all after the one error that matters. Anything else goes to `previous`
  (the hook in place when this one is made).
  """
  previous = previous or sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if (unraisable.object is None and isinstance(error, RuntimeError)
        and str(error) == "Event loop is closed"):
      return
    previous(unraisable)

  return hook


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


def _set_aside(manager, steps, why: str) -> dict:
  """Renames step directories `<step>.<why>` (unreadable, unhealthy) so that new saves
  never collide with them: {step: new path}."""
  if not steps:
    return {}
  moved = {}
  if jax.process_index() == 0:
    for step in steps:
      path = files.as_path(manager.directory) / str(step)
      target = path.parent / f"{step}.{why}"
      suffix = 1
      while target.exists():
        target, suffix = path.parent / f"{step}.{why}{suffix}", suffix + 1
      path.rename(target)
      moved[step] = str(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("corinfomax_set_aside_unreadable_checkpoints")
  manager.reload()
  return moved
