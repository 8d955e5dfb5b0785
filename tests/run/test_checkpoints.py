"""checkpoints.finish: what a failed save says."""
import errno
import gc
import sys
import types

import pytest

from corinfomax_jax import errors
from corinfomax_jax.run import checkpoints


class FailedSave:
  """A CheckpointManager whose pending save (step 4) failed with `error`; step 2 is good."""
  directory = "/ckpt"

  def __init__(self, error):
    self.error = error

  def wait_until_finished(self):
    raise self.error

  def check_for_errors(self):
    pass

  def reload(self):
    pass

  def all_steps(self):
    return [2, 4]


def _message(error):
  manager = FailedSave(error)
  checkpoints._pending_step[id(manager)] = 4  # pylint: disable=protected-access
  with pytest.raises(errors.CheckpointSaveError) as e:
    checkpoints.finish(manager)
  return str(e.value)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EFBIG, "File too large"),
    ValueError("Error writing local file: No space left on device"),  # rewrapped text
])
def test_a_full_disk_says_to_free_space(error):
  message = _message(error)
  assert message.startswith("Saving the checkpoint of step 4 in /ckpt failed (")
  assert "last good checkpoint is step 2" in message and "Free space there" in message


@pytest.mark.parametrize("error,said", [
    (PermissionError(errno.EACCES, "Permission denied"), "[Errno 13] Permission denied"),
    (ValueError("INVALID_ARGUMENT: bad array"), "INVALID_ARGUMENT: bad array"),
    (RuntimeError(), "RuntimeError"),
])
def test_another_cause_is_named_without_the_free_space_advice(error, said):
  message = _message(error)
  assert f"failed ({said}); " in message, message
  assert "last good checkpoint is step 2" in message
  assert "space" not in message.lower(), message
  assert "\n" not in message


def _unraisable(error, obj=None):
  return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                               err_msg=None, object=obj)


def test_only_closed_loop_callbacks_are_silenced():
  passed = []
  hook = checkpoints.closed_loop_callbacks_silenced(passed.append)
  closed = _unraisable(RuntimeError("Event loop is closed"))
  hook(closed)  # a save's write completing into orbax's closed loop
  assert passed == []
  others = [_unraisable(RuntimeError("Event loop is running")),
            _unraisable(ValueError("Event loop is closed")),
            _unraisable(RuntimeError("Event loop is closed"), obj=object())]  # a __del__
  for other in others:
    hook(other)
  assert passed == others


def test_the_silencing_hook_sees_real_unraisables():
  # An exception in __del__ reaches sys.unraisablehook with the object named: kept.
  passed = []

  class Broken:
    def __del__(self):
      raise RuntimeError("Event loop is closed")

  previous = sys.unraisablehook
  sys.unraisablehook = checkpoints.closed_loop_callbacks_silenced(passed.append)
  try:
    Broken()
    gc.collect()
  finally:
    sys.unraisablehook = previous
  assert len(passed) == 1 and str(passed[0].exc_value) == "Event loop is closed"
