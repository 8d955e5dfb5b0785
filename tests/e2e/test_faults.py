"""Surviving faults: a real SIGKILL and restart, SIGTERM preemption, corrupted and foreign
checkpoints, and a NaN loss."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from corinfomax_jax.data import augment
from corinfomax_jax import errors
from corinfomax_jax.data import pipeline
from corinfomax_jax.modes import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Flags that turn configs/default.py into the tiny run of conftest.tiny_config.
TINY_FLAGS = ["--config.image_size=16", "--config.width=4", "--config.projector=32-8",
              "--config.batch_size=16", "--config.base_batch_size=16",
              "--config.num_epochs=100", "--config.warmup_epochs=1",
              "--config.learning_rate=0.1", "--config.log_every_steps=1",
              "--config.spectrum_every_steps=1000"]


def main_command(image_folder, workdir, *flags):
  return [sys.executable, os.path.join(ROOT, "main.py"),
          f"--config={os.path.join(ROOT, 'configs/default.py')}",
          f"--config.dataset=folder:{image_folder}", f"--workdir={workdir}", *TINY_FLAGS,
          *flags]


def committed_steps(workdir):
  names = (os.path.basename(os.path.dirname(p)) for p in glob.glob(
      os.path.join(workdir, "checkpoints", "*", "commit_success.txt")))
  # orbax writes commit_success.txt before renaming <step>.orbax-checkpoint-tmp.
  return sorted(int(n) for n in names if n.isdigit())


def read_scalars(workdir, tag):
  """{step: value} of one TensorBoard scalar over every event file in workdir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    try:  # later files (a resumed run) override earlier ones
      for event in tf.compat.v1.train.summary_iterator(path):
        for v in event.summary.value:
          if v.tag == tag:
            values[event.step] = float(tf.make_ndarray(v.tensor))
    except tf.errors.DataLossError:
      pass  # a record cut short by SIGKILL ends the file, as TensorBoard reads it
  return values


def final_params(workdir):
  """The parameters of the latest checkpoint, on one device whatever topology wrote it."""
  step = max(committed_steps(workdir))
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
  return step, checkpointer.restore(path, abstract)["params"]


def wait_for(predicate, proc, timeout=240):
  start = time.time()
  while not predicate():
    assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
    assert time.time() - start < timeout, "timed out"
    time.sleep(0.05)


def test_sigkill_then_restart_equals_an_uninterrupted_run(image_folder, tmp_path):
  flags = ["--config.max_steps=24", "--config.checkpoint_every_steps=4"]
  # The uninterrupted run goes on beside the killed one and its restart; its log goes to
  # a file (a pipe nobody reads until the end could fill and stall it).
  whole_log = tmp_path / "whole.log"
  with open(whole_log, "w") as log:
    whole = subprocess.Popen(main_command(image_folder, tmp_path / "whole", *flags),
                             stdout=subprocess.DEVNULL, stderr=log)

  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(main_command(image_folder, workdir, *flags),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for(lambda: committed_steps(workdir), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = committed_steps(workdir)
  assert max(killed_at) < 24, "the kill came after the end; nothing was tested"
  subprocess.run(main_command(image_folder, workdir, *flags), check=True,
                 capture_output=True)
  assert whole.wait(timeout=300) == 0, whole_log.read_text()[-3000:]

  step_a, params_a = final_params(str(tmp_path / "whole"))
  step_b, params_b = final_params(workdir)
  assert step_a == step_b == 24
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params_b, params_a)
  losses_a = read_scalars(str(tmp_path / "whole"), "train/loss")
  losses_b = read_scalars(workdir, "train/loss")
  assert sorted(losses_a) == sorted(losses_b) == list(range(1, 25))
  np.testing.assert_allclose([losses_b[s] for s in range(1, 25)],
                             [losses_a[s] for s in range(1, 25)], rtol=1e-5)


@pytest.mark.parametrize("sig,said", [
    (signal.SIGTERM, "SIGTERM received"),
    (signal.SIGINT, "finishing this step and saving; press Ctrl-C again to abort")])
def test_sigterm_or_a_first_ctrl_c_checkpoints_and_exits_zero(image_folder, tmp_path,
                                                             sig, said):
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      main_command(image_folder, workdir, "--config.max_steps=100000",
                   "--config.checkpoint_every_steps=5"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: committed_steps(workdir), proc)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert said in stderr
  last = max(committed_steps(workdir))
  assert f"Preempted: checkpoint at step {last} written" in stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_truncated_latest_checkpoint_falls_back_to_the_previous(image_folder, tmp_path, caplog):
  config = tiny_config(f"folder:{image_folder}", max_steps=4, checkpoint_every_steps=2)
  workdir = str(tmp_path)
  pretrain.train_and_evaluate(config, workdir)
  data_files = [p for p in glob.glob(f"{workdir}/checkpoints/4/state/**/*", recursive=True)
                if os.path.isfile(p)]
  biggest = max(data_files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  good = {p: open(p, "rb").read() for p in glob.glob(f"{workdir}/checkpoints/2/**/*",
                                                     recursive=True) if os.path.isfile(p)}

  config.max_steps = 3
  with caplog.at_level("WARNING"):
    state = pretrain.train_and_evaluate(config, workdir)
  assert int(state.step) == 3  # resumed from 2, not 4
  assert "Checkpoint step 4" in caplog.text and "unreadable" in caplog.text
  assert os.path.isdir(f"{workdir}/checkpoints/4.unreadable")  # kept, not deleted
  for path, content in good.items():  # the good checkpoint is untouched
    assert open(path, "rb").read() == content


def test_checkpoint_of_another_configuration_is_refused(image_folder, tmp_path,
                                                        monkeypatch):
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2), str(tmp_path))
  events = sorted(glob.glob(str(tmp_path / "events.out.tfevents.*")))
  other = tiny_config(f"folder:{image_folder}", max_steps=4, projector="32-4")

  def compiled(*args, **kwargs):
    raise AssertionError("the state was created (compiled) before the refusal")

  monkeypatch.setattr(pretrain.train_state_lib, "create_train_state", compiled)
  with pytest.raises(errors.ConfigError, match=r"config.model.projector: checkpoint \[32, 8\] vs config \[32, 4\]"):
    pretrain.train_and_evaluate(other, str(tmp_path))
  assert committed_steps(str(tmp_path)) == [2]
  assert sorted(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == events  # none new


def _with_nan_images(batch):
  """The batch with draws that make view 1 NaN on the device: a NaN blur sigma."""
  draws = np.zeros_like(batch["view1_draws"])  # every op applies
  draws[:, augment.DRAWS["blur"][0] + 1] = np.nan
  return dict(batch, view1_draws=draws)


def test_nan_loss_stops_with_the_step_and_keeps_the_good_checkpoint(image_folder, tmp_path,
                                                                    monkeypatch):
  real = pipeline.pretrain_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs), start=kwargs["start_step"] + 1):
      if i == 5:  # global step 5 sees NaN images
        batch = _with_nan_images(batch)
      yield batch

  monkeypatch.setattr(pipeline, "pretrain_batches", poisoned)
  config = tiny_config(f"folder:{image_folder}", max_steps=8, checkpoint_every_steps=2,
                       log_every_steps=100)
  with pytest.raises(errors.NonFiniteLossError, match="at step 5") as info:
    pretrain.train_and_evaluate(config, str(tmp_path))
  assert "last good checkpoint is step 4" in str(info.value)
  assert committed_steps(str(tmp_path)) == [2, 4]


def test_nan_at_a_checkpoint_step_saves_nothing_of_it(image_folder, tmp_path, monkeypatch):
  """The NaN lands on a checkpoint step (4) with reports rare: the guard runs first."""
  real = pipeline.pretrain_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs), start=kwargs["start_step"] + 1):
      if i == 4:
        batch = _with_nan_images(batch)
      yield batch

  monkeypatch.setattr(pipeline, "pretrain_batches", poisoned)
  config = tiny_config(f"folder:{image_folder}", max_steps=8, checkpoint_every_steps=2,
                       log_every_steps=100)
  with pytest.raises(errors.NonFiniteLossError, match="at step 4"):
    pretrain.train_and_evaluate(config, str(tmp_path))
  assert committed_steps(str(tmp_path)) == [2]
  assert not glob.glob(str(tmp_path / "checkpoints" / "4*"))  # not even a temporary one


def test_second_ctrl_c_aborts_in_one_line(image_folder, tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      main_command(image_folder, workdir, "--config.max_steps=100000",
                   "--config.checkpoint_every_steps=5"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: committed_steps(workdir), proc)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)  # two signals at once would merge into one
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
  assert "Traceback" not in stderr


def probe_steps(workdir):
  names = (os.path.basename(os.path.dirname(p)) for p in glob.glob(
      os.path.join(workdir, "linear_eval", "checkpoints", "*", "commit_success.txt")))
  return sorted(int(n) for n in names if n.isdigit())  # not <step>.orbax-checkpoint-tmp


def test_linear_eval_sigterm_saves_the_probe_and_resumes(image_folder, tmp_path):
  workdir = str(tmp_path)
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2), workdir)
  probe_flags = ["--mode=linear_eval", "--config.eval.linear.batch_size=16",
                 "--config.eval.batch_size=16", "--config.eval.linear.epochs=100000"]
  proc = subprocess.Popen(main_command(image_folder, workdir, *probe_flags),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: probe_steps(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  last = max(probe_steps(workdir))
  assert f"Linear probe preempted at step {last}" in stderr
  leftovers = [p for p in os.listdir(os.path.join(workdir, "linear_eval", "checkpoints"))
               if not p.isdigit()]
  assert not leftovers, leftovers  # no temporary directory left behind
  assert not os.path.exists(os.path.join(workdir, "linear_eval.json"))

  rerun = subprocess.run(
      # The flat flag of earlier versions still works (moved to eval.linear.max_steps).
      main_command(image_folder, workdir, *probe_flags,
                   f"--config.eval.linear_max_steps={last + 2}"),
      capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from" in rerun.stderr and f"at step {last} of {last + 2}" in rerun.stderr
  assert os.path.exists(os.path.join(workdir, "linear_eval.json"))


def test_every_checkpoint_unreadable_gives_one_warning_each(image_folder, tmp_path, capfd,
                                                           caplog):
  config = tiny_config(f"folder:{image_folder}", max_steps=4, checkpoint_every_steps=2)
  workdir = str(tmp_path)
  pretrain.train_and_evaluate(config, workdir)
  for step in (2, 4):
    data_files = [p for p in glob.glob(f"{workdir}/checkpoints/{step}/state/**/*",
                                       recursive=True) if os.path.isfile(p)]
    biggest = max(data_files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  capfd.readouterr()
  config.max_steps = 1
  with caplog.at_level("WARNING"):
    state = pretrain.train_and_evaluate(config, workdir)
    import gc  # pylint: disable=g-import-not-at-top
    gc.collect()  # "exception was never retrieved" is logged when a future is collected
  assert int(state.step) == 1  # from scratch
  messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert sum("unreadable" in m for m in messages) == 2, messages  # one per checkpoint
  assert sum("starting from scratch" in m for m in messages) == 1, messages
  text = caplog.text + capfd.readouterr().err
  assert "never retrieved" not in text and "Traceback" not in text, text[-3000:]
  assert {"2.unreadable", "4.unreadable"} <= set(os.listdir(f"{workdir}/checkpoints"))


DISK_FULL_AFTER_FIRST_SAVE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
from corinfomax_jax.run import checkpoints
real_save = checkpoints.save
def save(manager, step, state, record):
  if step > 2:  # the disk is full from the second save on: 'File too large'
    checkpoints.finish(manager)
    # Larger than the few KiB of event-file and log writes of this short run, smaller
    # than the checkpoint's array files (over 100 KiB): only the save fails.
    resource.setrlimit(resource.RLIMIT_FSIZE, (32768, resource.RLIM_INFINITY))
  real_save(manager, step, state, record)
checkpoints.save = save
sys.argv = sys.argv[1:]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], "exec"),
     {"__name__": "__main__", "__file__": sys.argv[0]})
"""


def test_a_failed_save_stops_in_one_line_and_keeps_the_last_good(image_folder, tmp_path):
  workdir = str(tmp_path)
  command = main_command(image_folder, workdir, "--config.max_steps=8",
                         "--config.checkpoint_every_steps=2", "--config.log_every_steps=100")
  command[1:1] = ["-c", DISK_FULL_AFTER_FIRST_SAVE]
  proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": ROOT})
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert lines[-1].startswith("error: Saving the checkpoint of step 4"), proc.stderr[-3000:]
  assert workdir in lines[-1] and "last good checkpoint is step 2" in lines[-1]
  assert "File too large" in lines[-1]
  assert committed_steps(workdir) == [2]
  # The failed save's other writes complete into orbax's closed event loop; main.py drops
  # those "Event loop is closed" reports (hundreds on a busy host), and nothing else fails.
  assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
