"""A diverging run stops before saving, and the good checkpoints survive it: the last
healthy one is kept, named, readable and finite; a reader refuses a poisoned one."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_faults import committed_steps

import corinfomax_jax
from corinfomax_jax import errors
from corinfomax_jax.modes import knn_eval
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import checkpoints
from corinfomax_jax.run import train_state as train_state_lib


def _copy(pretrained_workdir, tmp_path):
  """A writable copy of the shared workdir with the tiny checkpoints of steps 2 and 4."""
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained_workdir, workdir)
  return workdir


# 1e6: the check before the save finds it (reports are rare); 1e30: the check at each
# report, which runs before the save of the same step.
@pytest.mark.parametrize("learning_rate,log_every_steps", [(1e6, 100), (1e30, 1)])
def test_a_diverging_resume_keeps_the_last_healthy_checkpoint(image_folder,
                                                              pretrained_workdir,
                                                              tmp_path, learning_rate,
                                                              log_every_steps):
  workdir = _copy(pretrained_workdir, tmp_path)
  config = tiny_config(f"folder:{image_folder}", max_steps=12, checkpoint_every_steps=1,
                       keep_checkpoints=2, log_every_steps=log_every_steps,
                       learning_rate=learning_rate)
  directory = train_state_lib.checkpoint_dir(workdir)
  with pytest.raises(errors.DivergenceError) as info:
    pretrain.train_and_evaluate(config, workdir)
  message = str(info.value)
  assert "the state after step 5 is not healthy" in message, message
  assert f"The last healthy checkpoint is step 4 in {directory}" in message, message
  # Nothing of the diverged steps was saved, so rotation (keep 2) deleted nothing good.
  assert committed_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, "lock.json"))
  encoder = corinfomax_jax.load_encoder(workdir)
  assert encoder.step == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(encoder.variables))
  images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  assert np.isfinite(encoder(images)).all()


def _poisoned_step_6(workdir):
  """Saves step 4's state with NaN parameters as step 6, as an earlier version did."""
  manager = checkpoints.create_manager(train_state_lib.checkpoint_dir(workdir), keep=10)
  try:
    state, record = checkpoints.restore_latest(manager, None, lambda record, step: None,
                                               set_aside=False)
    poisoned = {**state, "step": jnp.int32(6),
                "params": jax.tree.map(lambda x: x * jnp.nan, state["params"])}
    checkpoints.save(manager, 6, poisoned, record)
    checkpoints.finish(manager)
  finally:
    manager.close()


def test_a_non_finite_checkpoint_is_refused_by_readers_and_set_aside_by_a_resume(
    image_folder, pretrained_workdir, tmp_path, caplog):
  workdir = _copy(pretrained_workdir, tmp_path)
  _poisoned_step_6(workdir)
  directory = train_state_lib.checkpoint_dir(workdir)
  with pytest.raises(errors.ConfigError) as info:
    corinfomax_jax.load_encoder(workdir)
  message = str(info.value)
  assert f"The checkpoint of step 6 in {directory} is not usable (NaN or infinite " \
         "values in params)" in message, message
  assert f"step 4 is the latest usable one: move {directory / '6'} out of" in message
  assert "load_encoder: step=4" in message
  with pytest.raises(errors.ConfigError, match="step 6 .* is not usable"):
    corinfomax_jax.load_encoder(workdir, step=6)
  assert corinfomax_jax.load_encoder(workdir, step=4).step == 4
  assert committed_steps(workdir) == [2, 4, 6]  # a reader changes nothing

  # Pretraining sets it aside (nothing is deleted) and resumes from step 4.
  with caplog.at_level(logging.WARNING):
    state = pretrain.train_and_evaluate(
        tiny_config(f"folder:{image_folder}", max_steps=5, log_every_steps=100), workdir)
  assert int(state.step) == 5
  assert "Checkpoint step 6" in caplog.text and "is not healthy" in caplog.text
  assert os.path.isdir(directory / "6.unhealthy")
  assert committed_steps(workdir) == [2, 4, 5]


def _unblock(fifo):
  """Ends the reads still blocked on `fifo` (a writer that opens and closes it)."""
  for _ in range(50):
    try:
      os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left
      return


def test_a_checkpoint_read_that_never_answers_stops_in_one_line(image_folder,
                                                                pretrained_workdir,
                                                                tmp_path, monkeypatch):
  workdir = _copy(pretrained_workdir, tmp_path)
  state_files = [os.path.join(root, name) for root, _, names in
                 os.walk(os.path.join(workdir, "checkpoints", "4", "state"))
                 for name in names]
  fifo = max(state_files, key=os.path.getsize)  # an array file: read by every restore
  os.remove(fifo)
  os.mkfifo(fifo)  # opening it for reading blocks, as on a stuck network filesystem
  monkeypatch.setenv("CORINFOMAX_READ_TIMEOUT_S", "3")
  directory = train_state_lib.checkpoint_dir(workdir)
  try:
    for run in (knn_eval.knn_eval, pretrain.train_and_evaluate):
      with pytest.raises(errors.ReadTimeoutError) as info:
        run(tiny_config(f"folder:{image_folder}", max_steps=6), workdir)
      assert str(info.value).startswith(
          f"Reading the checkpoint of step 4 in {directory} gave no answer within 3 s"), (
              str(info.value))
      assert "CORINFOMAX_READ_TIMEOUT_S" in str(info.value)
      assert not os.path.exists(os.path.join(workdir, "lock.json"))  # released
  finally:
    _unblock(fifo)
  # Neither set aside as unreadable nor read: a slow store is not a damaged checkpoint.
  assert committed_steps(workdir) == [2, 4]
  assert sorted(os.listdir(directory)) == ["2", "4"]
