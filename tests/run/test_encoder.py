"""load_encoder: the checkpoint's backbone as a function, without TensorFlow or a mesh."""
import os
import subprocess
import sys

import numpy as np
import pytest

import corinfomax_jax
from corinfomax_jax import errors
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.run import settings
from corinfomax_jax.run import train_state as train_state_lib
from conftest import damaged_copy
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_features_equal_the_model_applied_to_the_restored_state(pretrained_workdir,
                                                                 image_folder):
  enc = corinfomax_jax.load_encoder(str(pretrained_workdir))
  assert enc.step == 4 and enc.config["model"]["width"] == 4
  run = settings.resolve(tiny_config(f"folder:{image_folder}"))
  model = run.model.create()
  state = train_state_lib.load_pretrained(run, model, mesh_lib.make_mesh(),
                                          str(pretrained_workdir))
  images = np.random.default_rng(0).normal(size=(5, 16, 16, 3)).astype(np.float32)
  expected = model.apply(train_state_lib.backbone_variables(state), images, train=False)[0]
  got = enc(images)  # 5 rows over 8 devices: padded and cut
  assert got.shape == (5, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-5)
  # Inference mode: a row's features do not depend on the rest of the batch.
  np.testing.assert_allclose(enc(images[:1]), got[:1], rtol=1e-5, atol=1e-5)


def test_an_earlier_step_and_a_missing_one(pretrained_workdir):
  assert corinfomax_jax.load_encoder(str(pretrained_workdir), step=2).step == 2
  with pytest.raises(errors.ConfigError, match=r"step 3 .* steps are \[2, 4\]"):
    corinfomax_jax.load_encoder(str(pretrained_workdir), step=3)


@pytest.mark.parametrize("step", ["2", 2.0, True])
def test_a_step_that_is_not_an_integer_is_named(pretrained_workdir, step):
  with pytest.raises(errors.ConfigError, match=f"step = {step!r} is invalid: expected an "
                                               "integer checkpoint step"):
    corinfomax_jax.load_encoder(str(pretrained_workdir), step=step)


def test_images_that_are_not_floats_are_refused_not_cast(pretrained_workdir):
  enc = corinfomax_jax.load_encoder(str(pretrained_workdir))
  pixels = np.full((2, 16, 16, 3), 200, np.uint8)
  with pytest.raises(ValueError, match="got dtype uint8.*normalize_uint8"):
    enc(pixels)
  assert np.isfinite(enc(pixels.astype(np.float64) / 255.0)).all()  # floats of any width


def test_a_damaged_latest_checkpoint_is_skipped_as_every_mode_skips_it(
    pretrained_workdir, image_folder, tmp_path, caplog):
  workdir = str(damaged_copy(pretrained_workdir, tmp_path / "w", steps=[4]))
  listing = sorted(os.listdir(f"{workdir}/checkpoints"))
  with caplog.at_level("WARNING"):
    enc = corinfomax_jax.load_encoder(workdir)
  assert enc.step == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert "step 4" in warnings[0] and "reading step 2" in warnings[0], warnings
  # The same step as the undamaged workdir's step 2, and as the modes that read the
  # whole train state (knn_eval, linear_eval, finetune) pick.
  images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(
      enc(images), corinfomax_jax.load_encoder(str(pretrained_workdir), step=2)(images))
  run = settings.resolve(tiny_config(f"folder:{image_folder}"))
  state = train_state_lib.load_pretrained(run, run.model.create(), mesh_lib.make_mesh(),
                                          workdir)
  assert int(state.step) == 2
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == listing  # a reader renames nothing


def test_no_readable_step_or_an_unreadable_step_is_one_config_error(pretrained_workdir,
                                                                     tmp_path):
  workdir = str(damaged_copy(pretrained_workdir, tmp_path / "w", steps=[2, 4]))
  with pytest.raises(errors.ConfigError, match="No readable checkpoint in") as e:
    corinfomax_jax.load_encoder(workdir)
  message = str(e.value)
  assert "\n" not in message and len(message) < 600, message
  assert f"{workdir}/checkpoints" in message
  assert "step 4 is unreadable (ValueError: " in message and "step 2 is unreadable" in message
  with pytest.raises(errors.ConfigError, match=r"checkpoint of step 4 in .* is unreadable "
                     r"\(ValueError: ") as e:
    corinfomax_jax.load_encoder(workdir, step=4)
  assert "\n" not in str(e.value) and len(str(e.value)) < 400, str(e.value)


def test_no_checkpoint_is_one_line(tmp_path):
  with pytest.raises(errors.ConfigError, match="No pretraining checkpoint") as e:
    corinfomax_jax.load_encoder(str(tmp_path))
  assert "\n" not in str(e.value)


def test_loads_on_one_device_without_tensorflow(pretrained_workdir):
  code = (
      "import sys; sys.modules['tensorflow'] = None; sys.modules['ml_collections'] = None\n"
      "import numpy as np, corinfomax_jax, jax\n"
      f"enc = corinfomax_jax.load_encoder({str(pretrained_workdir)!r})\n"
      "x = np.random.default_rng(0).normal(size=(5, 16, 16, 3)).astype(np.float32)\n"
      "print(jax.device_count(), enc.step, float(enc(x).sum()))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
  out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env,
                       capture_output=True, text=True).stdout.split()
  assert out[:2] == ["1", "4"]
  x = np.random.default_rng(0).normal(size=(5, 16, 16, 3)).astype(np.float32)
  here = corinfomax_jax.load_encoder(str(pretrained_workdir))(x).sum()
  np.testing.assert_allclose(float(out[2]),
                             here, rtol=1e-4)


def test_import_needs_only_jax():
  code = ("import sys; import corinfomax_jax; "
          "assert 'flax' not in sys.modules and 'orbax' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
