"""The loop skeleton: action order, last step, preemption, NaN guard, checkpoints, profile."""
import glob
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corinfomax_jax.run import loop
from corinfomax_jax.errors import NonFiniteLossError


class _Writer:

  def __init__(self):
    self.written = []

  def scalars(self, step, values):
    self.written.append((step, dict(values)))


def _step(state, batch):
  return state + batch, {"loss": jnp.asarray(batch, jnp.float32)}


class _Recorder:

  def __init__(self, log, name):
    self.log, self.name = log, name

  def __call__(self, step, state, metrics, is_last):
    self.log.append((self.name, step, int(state), is_last))


def test_actions_run_in_order_after_each_step_and_know_the_last():
  log = []
  state, preempted = loop.run(0, _step, iter(range(1, 100)), start_step=2, num_steps=5,
                              actions=[_Recorder(log, "a"), _Recorder(log, "b")])
  assert not preempted and state == 1 + 2 + 3
  assert log == [("a", 3, 1, False), ("b", 3, 1, False), ("a", 4, 3, False),
                 ("b", 4, 3, False), ("a", 5, 6, True), ("b", 5, 6, True)]


def test_preemption_makes_that_step_the_last():
  log = []
  preemption = loop.Preemption()

  class PreemptAt2:

    def __call__(self, step, state, metrics, is_last):
      if step == 2:
        preemption.requested = True

  _, preempted = loop.run(0, _step, iter(range(1, 100)), start_step=0, num_steps=10,
                          actions=[PreemptAt2(), _Recorder(log, "a")],
                          preemption=preemption)
  # The notice arrives during step 2's actions; step 3 is the last one run.
  assert preempted and log[-1] == ("a", 3, 6, True) and len(log) == 3


class _Device:
  """Steps run in order, one at a time, and finish only when the loop waits for one
  (block_until_ready, or a report's device_get), as under JAX's asynchronous dispatch.

  The stop request arrives while step `request_in` runs: when the step before it ends.
  """

  def __init__(self, preemption, request_in):
    self.preemption, self.request_in = preemption, request_in
    self.finished = self.most_ahead = 0

  def step(self, state, batch):
    del batch
    step = state + 1
    self.most_ahead = max(self.most_ahead, step - self.finished)
    return step, {"loss": _Pending(self, step)}

  def finish_through(self, step):
    while self.finished < step:
      self.finished += 1
      if self.finished == self.request_in - 1:
        self.preemption.requested = True


class _Pending:
  """A step's loss, ready once its step (and every one before it) has finished."""

  def __init__(self, device, step):
    self.device, self.step = device, step

  def block_until_ready(self):
    self.device.finish_through(self.step)
    return self

  def __array__(self, dtype=None, copy=None):
    del copy
    self.block_until_ready()
    return np.asarray(1.0, dtype)


@pytest.mark.parametrize("request_in", [5, 8, 10])
def test_a_stop_request_ends_the_run_at_the_step_it_arrived_in(request_in):
  """Reports sync every 10 steps: a loop that ran ahead stopped at 10 whatever the step."""
  log = []
  preemption = loop.Preemption()
  device = _Device(preemption, request_in)
  report = loop.ReportProgress(name="t", num_steps=100, every_steps=10, batch_size=4,
                               steps_per_epoch=10, writer=_Writer(), prefix="train/")
  state, preempted = loop.run(0, device.step, iter(range(100)), start_step=0,
                              num_steps=100, actions=[report, _Recorder(log, "a")],
                              preemption=preemption)
  assert preempted and state == request_in
  assert log[-1] == ("a", request_in, request_in, True)
  assert device.most_ahead == 2  # the step that runs, and one queued behind it


def test_report_averages_logs_and_writes_every_n_steps():
  writer = _Writer()
  report = loop.ReportProgress(name="t", num_steps=6, every_steps=3, batch_size=4,
                               steps_per_epoch=2, writer=writer, prefix="train/")
  loop.run(0, _step, iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), start_step=0, num_steps=6,
           actions=[report])
  assert [s for s, _ in writer.written] == [3, 6]
  assert writer.written[0][1]["train/loss"] == pytest.approx(2.0)
  assert writer.written[1][1]["train/loss"] == pytest.approx(5.0)
  assert writer.written[1][1]["train/epoch"] == pytest.approx(3.0)
  assert writer.written[1][1]["train/images_per_s"] > 0


def test_report_totals_a_count_over_the_run_beside_its_interval_mean():
  writer = _Writer()
  report = loop.ReportProgress(name="t", num_steps=6, every_steps=3, batch_size=4,
                               steps_per_epoch=2, writer=writer, prefix="train/",
                               totals=("fallbacks", "absent"))
  counts = iter([0.0, 2.0, 1.0, 0.0, 0.0, 1.0])
  step = lambda state, batch: (state, {"loss": jnp.float32(batch),
                                       "fallbacks": jnp.float32(next(counts))})
  loop.run(0, step, iter([1.0] * 6), start_step=0, num_steps=6, actions=[report])
  first, second = (values for _, values in writer.written)
  assert first["train/fallbacks"] == pytest.approx(1.0)  # (0 + 2 + 1) / 3
  assert first["train/fallbacks_total"] == 3.0
  assert second["train/fallbacks"] == pytest.approx(1 / 3)
  assert second["train/fallbacks_total"] == 4.0  # the run so far, not the interval
  assert "train/absent_total" not in second  # a metric the step does not return


def test_nan_guard_names_the_step_and_runs_before_a_save():
  saved = []

  class Manager:

    def save(self, step, args):
      del args
      saved.append(step)

    def wait_until_finished(self):
      pass

    def check_for_errors(self):
      pass

  report = loop.ReportProgress(name="t", num_steps=8, every_steps=100, batch_size=1,
                               steps_per_epoch=1, writer=_Writer(), prefix="",
                               nonfinite_hint=lambda: "HINT")
  checkpoint = loop.Checkpoint(Manager(), 2, lambda: {}, before_save=report.flush)
  batches = iter([1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0])
  with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 4.*HINT"):
    loop.run(0.0, _step, batches, start_step=0, num_steps=8,
             actions=[report, checkpoint])
  assert saved == [2]  # step 4's state followed a NaN: never saved


def test_durations():
  assert loop.epochs_to_steps(0, 100) == 0
  assert loop.epochs_to_steps(0.001, 100) == 1
  assert loop.epochs_to_steps(2.5, 10) == 25
  assert [s for s in range(1, 8) if loop.due(s, 3, s == 7)] == [3, 6, 7]
  assert [s for s in range(1, 8) if loop.due(s, 0, False)] == []


def test_profile_writes_a_trace_of_the_chosen_steps(tmp_path):
  step = jax.jit(lambda s, b: (s + b, {"loss": s.sum()}))
  state = jnp.zeros(4)
  profile = loop.Profile(str(tmp_path), start_step=0, num_steps=2, warmup=1)
  loop.run(state, step, iter([jnp.ones(4)] * 6), start_step=0, num_steps=6,
           actions=[profile])
  traces = glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*"))
  assert traces, os.listdir(tmp_path)
  assert not loop.Profile(str(tmp_path / "off"), 0, 0)._on  # pylint: disable=protected-access


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: jax.Array


def _count(state, batch):
  return (_State(state.step + 1, state.params + batch),
          {"loss": jnp.asarray(batch, jnp.float32)})


def test_a_resumable_loop_saves_resumes_and_finishes_its_saves(tmp_path):
  log = []
  report = loop.ReportProgress(name="t", num_steps=5, every_steps=100, batch_size=1,
                               steps_per_epoch=1, writer=_Writer(), prefix="")
  state = _State(jnp.asarray(0, jnp.int32), jnp.asarray(0.0, jnp.float32))
  with loop.Resumable(tmp_path, keep=5) as resumable:
    state, preempted = resumable.run(
        state, _count, iter([1.0] * 5), num_steps=5, report=report, every_steps=2,
        record_fn=lambda: log.append("save") or {"n": len(log)},
        actions=[lambda step, *_: log.append(f"a{step}")],
        after=[lambda step, *_: log.append(f"z{step}")])
  # Report, actions, checkpoint, then `after`; saves every 2 steps and at the last.
  assert not preempted and log == ["a1", "z1", "a2", "save", "z2", "a3", "z3", "a4",
                                   "save", "z4", "a5", "save", "z5"]
  assert sorted(os.listdir(tmp_path)) == ["2", "4", "5"]  # all finished on the way out
  template = _State(jnp.asarray(0, jnp.int32), jnp.asarray(0.0, jnp.float32))
  with loop.Resumable(tmp_path, keep=5) as resumable:
    restored, record = resumable.restore(template, lambda record, step: None)
    assert (int(restored.step), float(restored.params), record["n"]) == (5, 5.0, 12)
    report = loop.ReportProgress(name="t", num_steps=7, every_steps=100, batch_size=1,
                                 steps_per_epoch=1, writer=_Writer(), prefix="")
    state, _ = resumable.run(restored, _count, iter([2.0] * 2), num_steps=7,
                             report=report, every_steps=2, record_fn=dict)
  assert (int(state.step), float(state.params)) == (7, 9.0)
  assert sorted(os.listdir(tmp_path)) == ["2", "4", "5", "6", "7"]
