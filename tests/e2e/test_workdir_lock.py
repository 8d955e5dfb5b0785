"""The workdir lock: a second writer refused in one line, a stale lock taken over, readers
beside a writer, and the lock released however a run ends."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import tiny_config
from test_faults import _with_nan_images
from test_faults import committed_steps
from test_faults import main_command
from test_faults import wait_for
from test_main import assert_one_error_line
from test_remote_workdir import bucket  # noqa: F401  (a pytest fixture)

from corinfomax_jax import errors
from corinfomax_jax.data import pipeline
from corinfomax_jax.modes import finetune
from corinfomax_jax.modes import knn_eval
from corinfomax_jax.modes import linear_eval
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import checkpoints
from corinfomax_jax.run import workdir_lock


def _lock_path(workdir):
  return os.path.join(workdir, workdir_lock.LOCK_FILE)


def _write_lock(workdir, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": "2024-01-01T00:00:00+00:00", "mode": "pretrain", "command": "x",
            **fields}
  with open(_lock_path(workdir), "w") as f:
    json.dump(record, f)
  return record


def _snapshot(workdir):
  """{relative path: bytes} of every file under workdir."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


@pytest.fixture
def other_process():
  """A live process of this host that is not this one (a stand-in holder)."""
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  yield proc
  proc.kill()
  proc.wait()


def _held_by(workdir, proc, **fields):
  """A lock written by `proc` itself, with its boot id and start time."""
  return _write_lock(workdir, pid=proc.pid,
                     **workdir_lock.process_identity(proc.pid), **fields)


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()  # reaped: no process has this pid until the system reuses it
  return proc.pid


def test_a_second_pretraining_is_refused_and_leaves_the_first_untouched(image_folder,
                                                                        tmp_path):
  workdir = str(tmp_path)
  first = subprocess.Popen(
      main_command(image_folder, workdir, "--config.max_steps=100000",
                   "--config.checkpoint_every_steps=5"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: committed_steps(workdir), first)
    first.send_signal(signal.SIGSTOP)  # alive, but writing nothing while we look
    with open(_lock_path(workdir)) as f:
      lock = json.load(f)
    assert lock["pid"] == first.pid and lock["mode"] == "pretrain"
    assert lock["host"] == socket.gethostname() and "--config.max_steps=100000" in (
        lock["command"])
    before = _snapshot(workdir)

    # Another learning rate: the checkpoints' record accepts it, so without the lock it
    # would resume from the first run's checkpoint and write its own beside them.
    second = subprocess.run(
        main_command(image_folder, workdir, "--config.max_steps=8",
                     "--config.learning_rate=0.5"),
        capture_output=True, text=True, timeout=300)
    line = assert_one_error_line(second, "is in use by pretrain", f"pid {first.pid}",
                                 socket.gethostname(), lock["since"], "another --workdir")
    assert _snapshot(workdir) == before, line  # not even an error.log
  finally:
    first.send_signal(signal.SIGCONT)
  first.send_signal(signal.SIGTERM)
  _, stderr = first.communicate(timeout=120)
  assert first.returncode == 0, stderr[-3000:]
  assert "Preempted: checkpoint" in stderr
  assert not os.path.exists(_lock_path(workdir))  # released after SIGTERM


def test_a_stale_lock_is_taken_over_with_one_warning(image_folder, tmp_path, caplog,
                                                     monkeypatch):
  workdir = str(tmp_path)
  dead = _dead_pid()
  _write_lock(workdir, pid=dead)
  held = []
  real_save = checkpoints.save

  def save(*args, **kwargs):
    with open(_lock_path(workdir)) as f:
      held.append(json.load(f))
    return real_save(*args, **kwargs)

  monkeypatch.setattr(checkpoints, "save", save)
  with caplog.at_level(logging.WARNING):
    state = pretrain.train_and_evaluate(
        tiny_config(f"folder:{image_folder}", max_steps=2), workdir)
  assert int(state.step) == 2
  warnings = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
  assert len(warnings) == 1 and f"pid {dead} on this host" in warnings[0], warnings
  assert "no longer running" in warnings[0]
  assert held and held[0]["pid"] == os.getpid() and held[0]["mode"] == "pretrain"
  assert not os.path.exists(_lock_path(workdir))  # released after a normal run
  assert not [n for n in os.listdir(workdir) if n.startswith("lock.json.")]


def test_a_lock_of_another_host_is_refused_and_kept(image_folder, tmp_path):
  workdir = str(tmp_path)
  record = _write_lock(workdir, host="elsewhere-7", pid=_dead_pid())
  with pytest.raises(errors.WorkdirBusyError, match="elsewhere-7") as info:
    pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2),
                                workdir)
  assert f"delete {_lock_path(workdir)}" in str(info.value)
  with open(_lock_path(workdir)) as f:
    assert json.load(f) == record
  assert committed_steps(workdir) == []


def test_readers_run_beside_a_writer(image_folder, tmp_path, caplog, other_process):
  workdir = str(tmp_path)
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2), workdir)
  record = _held_by(workdir, other_process)  # a live writer
  with caplog.at_level(logging.INFO):
    result = knn_eval.knn_eval(tiny_config(f"folder:{image_folder}"), workdir)
  assert result["step"] == 2
  assert "Loaded the pretraining checkpoint of step 2" in caplog.text
  with open(_lock_path(workdir)) as f:
    assert json.load(f) == record  # neither taken nor removed
  with pytest.raises(errors.WorkdirBusyError,
                     match=f"in use by pretrain .pid {other_process.pid}.*kill {other_process.pid}"):
    linear_eval.linear_eval(tiny_config(f"folder:{image_folder}"), workdir)


def test_the_lock_is_released_after_a_nan(image_folder, tmp_path, monkeypatch):
  real = pipeline.pretrain_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs), start=kwargs["start_step"] + 1):
      yield _with_nan_images(batch) if i == 3 else batch

  monkeypatch.setattr(pipeline, "pretrain_batches", poisoned)
  with pytest.raises(errors.NonFiniteLossError, match="at step 3"):
    pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=4),
                                str(tmp_path))
  assert not os.path.exists(_lock_path(str(tmp_path)))


@pytest.mark.parametrize("mode", ["linear_eval", "finetune"])
def test_the_lock_is_released_after_an_error_past_start_up(image_folder, tmp_path, mode):
  workdir = str(tmp_path)
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=1), workdir)
  config = tiny_config(f"folder:{image_folder}")
  # More than the 24 images: a ConfigError once the data is open, after start-up.
  config.eval.linear.batch_size = config.eval.finetune.batch_size = 1024
  run = {"linear_eval": linear_eval.linear_eval, "finetune": finetune.finetune}[mode]
  with pytest.raises(errors.ConfigError, match="exceeds"):
    run(config, workdir)
  assert not os.path.exists(_lock_path(workdir))


def test_a_gs_workdir_is_locked_through_the_file_layer(bucket, image_folder, other_process):
  workdir = "gs://bucket/run"
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=1), workdir)
  local = bucket.local(workdir)
  assert os.path.isdir(os.path.join(local, "checkpoints"))
  assert not os.path.exists(_lock_path(local))  # taken and released in the bucket
  _held_by(local, other_process)
  with pytest.raises(errors.WorkdirBusyError, match=f"pid {other_process.pid}"):
    pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2),
                                workdir)


def _take(workdir):
  lock = workdir_lock.WorkdirLock(workdir, "pretrain")
  lock.acquire()
  with open(_lock_path(workdir)) as f:
    taken = json.load(f)
  lock.release()
  return taken


def test_the_lock_records_the_process_start_time_and_boot(tmp_path):
  taken = _take(str(tmp_path))
  assert taken["pid"] == os.getpid()
  assert taken["start_time"] == workdir_lock.process_identity(os.getpid())["start_time"]
  with open("/proc/sys/kernel/random/boot_id") as f:
    assert taken["boot_id"] == f.read().strip()
  assert not os.path.exists(_lock_path(str(tmp_path)))


@pytest.mark.parametrize("case", ["pid reused", "own pid", "another boot"])
def test_a_lock_of_a_restarted_holder_is_taken_over(tmp_path, caplog, other_process, case):
  workdir = str(tmp_path)
  identity = workdir_lock.process_identity(other_process.pid)
  if case == "pid reused":  # a live, unrelated process now has the pid
    _write_lock(workdir, pid=other_process.pid, boot_id=identity["boot_id"],
                start_time=identity["start_time"] - 1)
  elif case == "own pid":  # a container restarted with the same (low) pid
    _write_lock(workdir, pid=os.getpid())  # a lock of an earlier version: no start time
  else:
    _write_lock(workdir, pid=other_process.pid, boot_id="another-boot",
                start_time=identity["start_time"])
  with caplog.at_level(logging.WARNING):
    taken = _take(workdir)
  assert taken["pid"] == os.getpid()
  warnings = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
  said = {"pid reused": "started later", "own pid": "this process's own",
          "another boot": "before this host's last boot"}[case]
  assert len(warnings) == 1 and said in warnings[0], warnings


def test_a_live_holder_is_refused_and_kill_is_advised_only_when_verified(tmp_path,
                                                                         other_process):
  workdir = str(tmp_path)
  record = _held_by(workdir, other_process)
  with pytest.raises(errors.WorkdirBusyError, match=f"kill {other_process.pid}"):
    _take(workdir)
  # An earlier version's lock (no start time) of a live pid: it may be another process.
  unverified = {k: v for k, v in record.items() if k not in ("start_time", "boot_id")}
  with open(_lock_path(workdir), "w") as f:
    json.dump(unverified, f)
  with pytest.raises(errors.WorkdirBusyError) as info:
    _take(workdir)
  assert "kill" not in str(info.value) and f"delete {_lock_path(workdir)}" in str(info.value)
  with open(_lock_path(workdir)) as f:
    assert json.load(f) == unverified  # refused, and kept


def test_a_lock_file_that_is_a_directory_is_one_clear_error(tmp_path):
  os.mkdir(_lock_path(str(tmp_path)))
  with pytest.raises(errors.WorkdirError, match="is a directory, not the workdir's lock file"):
    _take(str(tmp_path))
