"""The online linear probe: trained inside the pretraining step, never touching the backbone."""
import json
import logging
import re

import jax
import numpy as np
import pytest
from conftest import tiny_config

from corinfomax_jax.data import augment
from corinfomax_jax import errors
from corinfomax_jax.eval import features
from corinfomax_jax.eval import probe
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import settings
from corinfomax_jax.run import train_state as train_state_lib


def _step_twice(config, probe_classes):
  run = settings.resolve(config)
  model = run.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(run.optimizer, steps_per_epoch=10)
  tx = train_state_lib.create_optimizer(run.optimizer, lr_fn)
  mesh = mesh_lib.make_mesh()
  state = train_state_lib.create_train_state(run, model, tx, mesh,
                                             probe_classes=probe_classes)
  step = pretrain.jit_train_step(run, model, tx, lr_fn, mesh)
  rng = np.random.default_rng(0)
  batch = {}
  for k in ("view1", "view2"):
    batch[k] = rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    batch[f"{k}_draws"] = rng.uniform(size=(16, augment.NUM_DRAWS)).astype(np.float32)
  batch["label"] = rng.integers(0, 3, 16).astype(np.int32)
  for _ in range(2):
    state, metrics = step(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


def test_the_probe_trains_and_leaves_pretraining_exactly_as_without_it():
  config = tiny_config("cifar10")
  config.eval.online_probe.enabled = True
  without, m0 = _step_twice(config, 0)
  with_probe, m1 = _step_twice(config, 3)
  assert without.probe == {} and "online_probe_top1" not in m0
  # Stop-gradient: the backbone, projector, BatchNorm statistics and loss state are
  # bit-identical with and without the probe.
  for a, b in zip(jax.tree.leaves((without.params, without.batch_stats, without.opt_state,
                                   without.loss_state)),
                  jax.tree.leaves((with_probe.params, with_probe.batch_stats,
                                   with_probe.opt_state, with_probe.loss_state))):
    np.testing.assert_array_equal(a, b)
  assert m1["loss"] == m0["loss"]
  kernel = with_probe.probe["params"]["kernel"]
  assert kernel.shape == (32, 3) and np.abs(kernel).sum() > 0  # zero-initialised, moved
  assert 0 <= m1["online_probe_top1"] <= 100 and np.isfinite(m1["online_probe_loss"])


def test_pretraining_with_the_probe_checkpoints_resumes_and_tests_it(image_folder, tmp_path,
                                                                     caplog):
  overrides = dict(max_steps=2, checkpoint_every_steps=2)
  config = tiny_config(f"folder:{image_folder}", **overrides)
  config.eval.online_probe.enabled = True
  config.eval.monitors = ("online_probe",)
  # The probe monitor's own cadence (the kNN one stays off): 24 images, batch 16.
  config.eval.online_probe.every_epochs = 1
  with caplog.at_level(logging.INFO):
    state = pretrain.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2 and set(state.probe) == {"params", "opt_state"}
  assert "online_probe monitor at step" in caplog.text
  assert "knn monitor at step" not in caplog.text
  run = settings.resolve(config)
  result = probe.OnlineProbeEvaluator(run.eval.online_probe, features.Context(
      run.data, run.eval.batch_size, run.model.create(), mesh_lib.make_mesh(), None,
      features.open_sources(run.data)[1])).run_on_state(state)
  assert result["num_test_examples"] == 24 and 0 <= result["test_top1"] <= 100
  record = json.loads((tmp_path / "checkpoints/2/run/metadata").read_text())
  assert record["online_probe_classes"] == 2
  # Resuming keeps the probe, step for step; switching it off is refused in one line.
  config.max_steps = 3
  resumed = pretrain.train_and_evaluate(config, str(tmp_path))
  assert int(resumed.step) == 3 and not np.array_equal(
      resumed.probe["params"]["kernel"], state.probe["params"]["kernel"])
  config.eval.online_probe.enabled, config.eval.monitors, config.max_steps = (
      False, ("knn",), 4)
  with pytest.raises(errors.ConfigError, match=re.escape(
      "written with config.eval.online_probe.enabled=True, this run has False")) as e:
    pretrain.train_and_evaluate(config, str(tmp_path))
  assert "\n" not in str(e.value)


def test_the_probe_on_an_unlabelled_folder_is_refused_before_any_training(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ("train", "test"):  # root/<split>/<image>: no class directories
    (tmp_path / "data" / split).mkdir(parents=True)
    for i in range(16):
      Image.fromarray(np.full((8, 8, 3), 16 * i, np.uint8)).save(
          tmp_path / "data" / split / f"{i:02d}.png")
  config = tiny_config(f"folder:{tmp_path / 'data'}", max_steps=1)
  config.eval.online_probe.enabled = True
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError, match=re.escape(
      "split 'train' has no class directories, so the online probe "
      "(config.eval.online_probe.enabled=True) has no labels")) as e:
    pretrain.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(e.value)
  assert not train_state_lib.checkpoint_dir(str(workdir)).exists()


def test_the_probe_monitor_needs_the_probe():
  config = tiny_config("cifar10")
  config.eval.monitors = ("knn", "online_probe")
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.eval.monitors lists 'online_probe', but config.eval.online_probe.enabled is "
      "False")):
    settings.resolve(config)
  config.eval.online_probe.enabled = True
  assert settings.resolve(config).eval.monitors == ("knn", "online_probe")
