"""The loop skeleton every training loop uses: a step, batches, and periodic actions.

    state = loop.run(state, step_fn, batches, start_step=s, num_steps=n,
                     actions=[report, spectrum, evaluators, checkpoint], preemption=p)

`step_fn(state, batch) -> (state, metrics)` is the jitted step. After each step every
action is called as `action(step, state, metrics, is_last)`, in order; `is_last` is
true at the final step and at the step where a preemption notice was agreed on, so
actions that must leave a record (progress, checkpoint) act then too. Actions
decide their own cadence with `due`.
"""
from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import numpy as np
from absl import logging

from corinfomax_jax.run import checkpoints
from corinfomax_jax.errors import NonFiniteLossError


class Action(Protocol):

  def __call__(self, step: int, state: Any, metrics: Any, is_last: bool) -> None:
    ...


def due(step: int, every_steps: int, is_last: bool) -> bool:
  """Whether an action that runs every `every_steps` steps (0: never) runs at `step`."""
  return is_last or (every_steps > 0 and step % every_steps == 0)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """A duration in epochs as a whole number of steps (0 stays 0, anything else >= 1)."""
  return 0 if epochs == 0 else max(1, round(epochs * steps_per_epoch))


class Preemption:
  """A preemption notice asks the loop to checkpoint and stop after the current step.

  With one process a Python handler notes SIGTERM, and a first Ctrl-C (SIGINT) alike;
  a second Ctrl-C raises KeyboardInterrupt at once. With several, every process must
  stop at the same step: JAX's distributed runtime receives the notice on any host and
  `reached_preemption_sync_point` agrees on the step, so no handler is installed.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1:
      for sig, handler in ((signal.SIGTERM, self._handle_term),
                           (signal.SIGINT, self._handle_int)):
        try:
          self._previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: nothing to install or restore
          pass
    return self

  def _handle_term(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing this step, checkpointing, and exiting.")
    self.requested = True

  def _handle_int(self, signum, frame):
    del signum, frame
    if self.requested:  # the second Ctrl-C
      raise KeyboardInterrupt
    logging.warning("Ctrl-C: finishing this step and saving; press Ctrl-C again to abort.")
    self.requested = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service in this runtime
      return False


def run(state: Any, step_fn: Callable[[Any, Any], tuple[Any, Any]], batches: Iterator,
        *, start_step: int, num_steps: int, actions: Sequence[Action],
        preemption: Preemption | None = None) -> tuple[Any, bool]:
  """Steps start_step + 1 .. num_steps: (final state, whether it stopped for preemption).

  At most one step is queued behind the one the device runs: once step n is dispatched
  the loop waits for step n - 1's metrics, so a stop request that arrives during step
  n - 1 ends the run at step n, and none later.
  """
  preemption = preemption or Preemption()
  with preemption:
    previous = None  # the metrics of the step before, until the device has finished it
    for step in range(start_step + 1, num_steps + 1):
      state, metrics = step_fn(state, next(batches))
      # JAX dispatches asynchronously: unchecked, the loop runs as far ahead as the next
      # sync (a progress report), and a stop request lands that many steps late.
      jax.block_until_ready(previous)
      previous = metrics
      preempted = preemption.reached(step)
      is_last = step == num_steps or preempted
      for action in actions:
        action(step, state, metrics, is_last)
      if preempted:
        return state, True
  return state, False


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ReportProgress:
  """Progress, metrics and the NaN guard, every `every_steps` steps and at the last.

  Step metrics stay on the device until a report fetches them all at once (no
  per-step host sync). A report raises NonFiniteLossError when any fetched step's
  "loss" is NaN or infinite, so call `flush` before saving a checkpoint. It logs one
  line (process 0): step / total, epoch, the mean of each metric, images/s, elapsed
  time and ETA; and writes the means to TensorBoard as `<prefix><name>`.

  For each metric named in `totals` (counts, such as "cholesky_fallbacks") that the
  step returns, it also logs `<name>_total`: the sum over every step since this
  ReportProgress was created, i.e. since the process started or resumed.
  """

  def __init__(self, *, name: str, num_steps: int, every_steps: int, batch_size: int,
               steps_per_epoch: int, writer, prefix: str,
               nonfinite_hint: Callable[[], str] = lambda: "",
               totals: Sequence[str] = ()):
    self._name, self._num_steps, self._every = name, num_steps, every_steps
    self._batch_size, self._steps_per_epoch = batch_size, steps_per_epoch
    self._writer, self._prefix, self._hint = writer, prefix, nonfinite_hint
    self._totals = dict.fromkeys(totals, 0.0)
    self._pending: list[tuple[int, Any]] = []
    self._start = self._last = time.time()
    self._first_step = None  # steps before the first report include compilation
    self._timed_from = None

  def __call__(self, step, state, metrics, is_last):
    del state
    self._pending.append((step, metrics))
    if due(step, self._every, is_last):
      self.flush()

  def flush(self) -> None:
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    steps = [s for s, _ in self._pending]
    for s, m in zip(steps, fetched):
      if not math.isfinite(float(m["loss"])):
        others = ", ".join(f"{k} {float(v):.6g}" for k, v in m.items() if k != "loss")
        raise NonFiniteLossError(
            f"{self._name}: the loss is {float(m['loss'])} at step {s} ({others}); "
            f"training stopped without saving. {self._hint()}")
    now = time.time()
    step = steps[-1]
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    for k in [k for k in self._totals if k in fetched[0]]:
      self._totals[k] += float(np.sum([m[k] for m in fetched]))
      mean[f"{k}_total"] = self._totals[k]  # logged beside the means, not one of them
    images_per_s = len(fetched) * self._batch_size / max(now - self._last, 1e-9)
    if self._timed_from is None:
      eta = "?"
      self._timed_from = (step, now)
    else:
      done, since = step - self._timed_from[0], now - self._timed_from[1]
      eta = _duration((self._num_steps - step) * since / max(done, 1))
    if jax.process_index() == 0:
      values = " ".join(f"{k} {v:.6g}" for k, v in mean.items())
      logging.info("%s step %d/%d (epoch %.2f) %s | %.1f images/s | elapsed %s ETA %s",
                   self._name, step, self._num_steps, step / self._steps_per_epoch, values,
                   images_per_s, _duration(now - self._start), eta)
    self._writer.scalars(step, {**{f"{self._prefix}{k}": v for k, v in mean.items()},
                                f"{self._prefix}images_per_s": images_per_s,
                                f"{self._prefix}epoch": step / self._steps_per_epoch})
    self._pending.clear()
    self._last = now


class Periodic:
  """Calls `fn(step, state)` every `every_steps` steps (0: never) and at the last step."""

  def __init__(self, every_steps: int, fn: Callable[[int, Any], None],
               at_last: bool = True):
    self._every, self._fn, self._at_last = every_steps, fn, at_last

  def __call__(self, step, state, metrics, is_last):
    del metrics
    if due(step, self._every, is_last and self._at_last and self._every > 0):
      self._fn(step, state)


class Profile:
  """A profiler trace of `num_steps` steps (after a few of warm-up) to `logdir`.

  TensorBoard shows it under the Profile tab (logdir/plugins/profile). Process 0 only.
  """

  def __init__(self, logdir: str, start_step: int, num_steps: int, warmup: int = 3):
    self._logdir = logdir
    self._first = start_step + warmup + 1
    self._last = self._first + num_steps - 1
    self._on = num_steps > 0 and jax.process_index() == 0
    self._tracing = False

  def __call__(self, step, state, metrics, is_last):
    if not self._on:
      return
    if step == self._first - 1 or (step == self._first and not self._tracing):
      jax.block_until_ready(state)
      jax.profiler.start_trace(self._logdir)
      self._tracing = True
      logging.info("Profiling steps %d to %d into %s.", step + 1, self._last, self._logdir)
    elif self._tracing and (step >= self._last or is_last):
      jax.block_until_ready((state, metrics))
      jax.profiler.stop_trace()
      self._tracing = False
      self._on = False


class Checkpoint:
  """Saves `record_fn()` and the state every `every_steps` steps and at the last step.

  `before_save` runs first (the progress report's NaN guard), so a state that
  followed a non-finite loss is never saved; then `check_state(step, state)`, which
  raises for an updated state that must not be saved (run/health.py's check).
  """

  def __init__(self, manager, every_steps: int, record_fn: Callable[[], dict],
               before_save: Callable[[], None] = lambda: None,
               check_state: Callable[[int, Any], None] = lambda step, state: None):
    self._manager, self._every = manager, every_steps
    self._record_fn, self._before_save = record_fn, before_save
    self._check_state = check_state

  def __call__(self, step, state, metrics, is_last):
    del metrics
    if due(step, self._every, is_last):
      self._before_save()
      self._check_state(step, state)
      checkpoints.save(self._manager, step, state, self._record_fn())


class Resumable:
  """The scaffold of a resumable loop: one checkpoint directory, resumed and saved to.

      with loop.Resumable(directory, keep=2) as resumable:
        restored, record = resumable.restore(state, check_record)
        state, preempted = resumable.run(state, step_fn, batches, num_steps=n,
                                         report=report, every_steps=e, record_fn=f)

  On the way out the pending save is finished (CheckpointSaveError if it failed) and
  the orbax manager (`manager`) closed.
  """

  def __init__(self, directory, *, keep: int):
    self.manager = checkpoints.create_manager(directory, keep=keep)

  def __enter__(self) -> Resumable:
    return self

  def __exit__(self, *exc):
    try:
      checkpoints.finish(self.manager)
    finally:
      self.manager.close()

  def restore(self, template, check_record, **kwargs) -> tuple[Any, dict | None]:
    """(state, record) of the latest usable checkpoint, or (None, None): see
    checkpoints.restore_latest."""
    return checkpoints.restore_latest(self.manager, template, check_record, **kwargs)

  def run(self, state, step_fn, batches: Iterator, *, num_steps: int,
          report: ReportProgress, every_steps: int, record_fn: Callable[[], dict],
          actions: Sequence[Action] = (), after: Sequence[Action] = (),
          check_state: Callable[[int, Any], None] = lambda step, state: None
          ) -> tuple[Any, bool]:
    """`run` from state.step to num_steps with `report` (progress, NaN guard) first,
    then `actions`, then a Checkpoint of record_fn() every `every_steps` steps and at
    the last (after the NaN guard, then `check_state`), then `after`."""
    checkpoint = Checkpoint(self.manager, every_steps, record_fn, before_save=report.flush,
                            check_state=check_state)
    return run(state, step_fn, batches, start_step=int(state.step), num_steps=num_steps,
               actions=[report, *actions, checkpoint, *after])
