"""The trainer: end-to-end runs on tiny data, the sharded step, resume, config errors."""

import functools
import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corinfomax_jax.methods import corinfomax as objective
from corinfomax_jax.data import augment
from corinfomax_jax import errors
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import settings
from corinfomax_jax.run import train_state as train_state_lib


def _folder_config(image_folder, **overrides):
  return tiny_config(f"folder:{image_folder}", **overrides)


def _two_view_batch(n, size, seed=0):
  """What the host pipeline sends: uint8 crops and each example's draws, per view."""
  rng = np.random.default_rng(seed)
  batch = {}
  for k in ("view1", "view2"):
    batch[k] = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    batch[f"{k}_draws"] = rng.uniform(size=(n, augment.NUM_DRAWS)).astype(np.float32)
  return batch


def _leaves_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=rtol, atol=atol), a, b)


def test_end_to_end_on_an_image_folder(image_folder, tmp_path):
  config = _folder_config(image_folder, max_steps=4)
  state = pretrain.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints/*")))
  assert steps == [2, 4]
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert os.path.getsize(tmp_path / "spectrum.png") > 1000
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_end_to_end_on_tfds_mock_data(tmp_path):
  config = tiny_config("cifar10", max_steps=2, image_size=32)
  with tfds.testing.mock_data(num_examples=64):
    state = pretrain.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_learning_rate_schedule_and_linear_scaling():
  config = tiny_config("cifar10", learning_rate=0.5, base_batch_size=8, batch_size=16,
                       warmup_epochs=2, warmup_start_lr=0.01, num_epochs=10,
                       min_learning_rate=1e-3)
  lr = train_state_lib.create_learning_rate_fn(settings.resolve(config).optimizer,
                                               steps_per_epoch=5)
  peak = 0.5 * 16 / 8
  np.testing.assert_allclose(float(lr(0)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), peak, rtol=1e-6)  # end of warmup
  np.testing.assert_allclose(float(lr(30)), 1e-3 + (peak - 1e-3) * 0.5, rtol=1e-5)  # mid
  np.testing.assert_allclose(float(lr(50)), 1e-3, rtol=1e-4)  # end


def test_train_step_on_8_devices_equals_one_device():
  run = settings.resolve(tiny_config("cifar10", dtype="float32"))
  model = run.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(run.optimizer, steps_per_epoch=10)
  tx = train_state_lib.create_optimizer(run.optimizer, lr_fn)
  batch = _two_view_batch(16, 16)

  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = mesh_lib.make_mesh(devices)
    state = train_state_lib.create_train_state(run, model, tx, mesh)
    step = pretrain.jit_train_step(run, model, tx, lr_fn, mesh)
    sharded = jax.device_put(batch, NamedSharding(mesh, P(mesh_lib.DATA_AXIS)))
    for _ in range(2):
      state, metrics = step(state, sharded)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s1, m1), (s8, m8) = results
  _leaves_close(m8, m1, rtol=1e-4, atol=1e-6)
  # Every leaf of the state agrees to float32 reduction-order noise, relative to the
  # leaf's own scale. Momentum holds raw gradients, some of them small differences of
  # large terms (BatchNorm biases, which start at zero and so have the scale of one
  # update), hence the looser bounds; a per-device BatchNorm or a
  # per-device covariance would be off by O(1).
  for tree_8, tree_1, tol in ((s8.params, s1.params, 5e-3),
                              (s8.batch_stats, s1.batch_stats, 5e-3),
                              (s8.loss_state, s1.loss_state, 1e-4),
                              (s8.opt_state, s1.opt_state, 1e-2)):
    for a, b in zip(jax.tree.leaves(tree_8), jax.tree.leaves(tree_1)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)) + 1e-8


def test_bfloat16_runs_network_in_bf16_with_float32_state():
  run = settings.resolve(tiny_config("cifar10", dtype="bfloat16"))
  model = run.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(run.optimizer, steps_per_epoch=10)
  tx = train_state_lib.create_optimizer(run.optimizer, lr_fn)
  mesh = mesh_lib.make_mesh()
  state = train_state_lib.create_train_state(run, model, tx, mesh)
  batch = _two_view_batch(16, 16)
  jaxpr = str(jax.make_jaxpr(functools.partial(
      pretrain.train_step, model=model, tx=tx, learning_rate_fn=lr_fn,
      method=run.method, views_fn=pretrain.make_views(run.data)))(state, batch))
  assert "bf16" in jaxpr  # the convolutions run in bfloat16
  state, metrics = pretrain.jit_train_step(run, model, tx, lr_fn, mesh)(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  for leaf in jax.tree.leaves((state.params, state.loss_state)):
    assert leaf.dtype == jnp.float32


def test_lars_optax_excludes_biases_and_norms_from_decay_and_adaptation():
  run = settings.resolve(tiny_config("cifar10", optimizer="lars_optax", weight_decay=0.5))
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
            "bn": {"scale": jnp.ones((4,))}}
  tx = train_state_lib.create_optimizer(run.optimizer, lambda step: 1.0)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # With zero gradients only weight decay moves a parameter.
  assert np.all(np.asarray(updates["dense"]["kernel"]) != 0)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0)
  np.testing.assert_array_equal(updates["bn"]["scale"], 0)


def test_resume_across_a_restart_equals_one_run(image_folder, tmp_path):
  config = _folder_config(image_folder, max_steps=4, checkpoint_every_steps=2)
  one_run = pretrain.train_and_evaluate(config, str(tmp_path / "a"))
  first = pretrain.train_and_evaluate(_folder_config(image_folder, max_steps=2),
                                   str(tmp_path / "b"))
  assert int(first.step) == 2
  resumed = pretrain.train_and_evaluate(config, str(tmp_path / "b"))
  assert int(resumed.step) == 4
  _leaves_close(jax.device_get(resumed), jax.device_get(one_run), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"model.backbone": "resnet34"}, "resnet34"),
    (dict(learning_rate=-0.1), "config.learning_rate = -0.1"),
    (dict(batch_size=12), "config.batch_size = 12 does not divide over the 8 devices"),
    (dict(projector=(2048, 0, 64)), "config.model.projector = (2048, 0, 64)"),
    (dict(dtype="float16"), "config.model.dtype = 'float16'"),
    (dict(la_R=1.5), "config.corinfomax.la_R = 1.5"),  # the flat key, named where it went
    ({"corinfomax.la_R": 1.5}, "config.corinfomax.la_R = 1.5"),
    (dict(method="simclr"), "config.method = 'simclr'"),
    ({"vicreg.sim_weight": 10.0}, "config.vicreg.sim_weight is set"),
    (dict(max_steps=0), "config.max_steps = 0"),
])
def test_invalid_config_fails_before_any_work(overrides, message, image_folder, tmp_path):
  config = _folder_config(image_folder, **{k: v for k, v in overrides.items()
                                           if "." not in k})
  for key, value in overrides.items():  # keys inside a section
    if "." in key:
      section, leaf = key.split(".")
      config[section][leaf] = value
  workdir = tmp_path / "never_created"
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    pretrain.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_state_is_one_pytree_with_the_loss_state():
  run = settings.resolve(tiny_config("cifar10"))
  model = run.model.create()
  tx = train_state_lib.create_optimizer(
      run.optimizer, train_state_lib.create_learning_rate_fn(run.optimizer, 10))
  state = train_state_lib.create_train_state(run, model, tx, mesh_lib.make_mesh())
  assert isinstance(state.loss_state, objective.CorInfoMaxState)
  np.testing.assert_array_equal(state.loss_state.cov1, np.eye(8) * run.method.r_init)
  assert int(state.step) == 0
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


_FLOAT64_RUN = """
import sys
import jax, numpy as np, orbax.checkpoint as ocp
from absl import logging
from conftest import tiny_config
from corinfomax_jax.modes import pretrain
folder, workdir = sys.argv[1:]
logging.set_verbosity(logging.INFO)
assert not jax.config.jax_enable_x64
config = tiny_config(f"folder:{folder}", max_steps=2)
config.corinfomax.stats_dtype = "float64"
first = pretrain.train_and_evaluate(config, workdir)
assert jax.config.jax_enable_x64  # turned on by startup.begin
config.max_steps = 4
state = pretrain.train_and_evaluate(config, workdir)  # resumes from the step-2 checkpoint
for s, step in ((first, 2), (state, 4)):
  assert s.step.dtype == np.int32 and int(s.step) == step
  assert [x.dtype for x in s.loss_state] == [np.float64] * 4
  wide = [l.dtype for l in jax.tree.leaves(s.replace(loss_state=()))
          if l.dtype.itemsize > 4]
  assert not wide, wide  # x64 changed nothing but the method's state
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(s))
saved = ocp.StandardCheckpointer().metadata(f"{workdir}/checkpoints/2/state")
saved = getattr(saved, "item_metadata", saved)
assert [saved["loss_state"][k].dtype for k in ("mu1", "mu2", "cov1", "cov2")] == (
    [np.float64] * 4), saved["loss_state"]
assert saved["step"].dtype == np.int32
print("FLOAT64 RUN OK")
"""


def test_float64_statistics_train_resume_and_checkpoint(image_folder, tmp_path):
  # x64 mode is process-wide once enabled: the run gets its own process.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.join(root, "tests"), root, os.environ.get("PYTHONPATH", "")])}
  env.pop("JAX_ENABLE_X64", None)
  out = subprocess.run([sys.executable, "-c", "import conftest\n" + _FLOAT64_RUN,
                        str(image_folder), str(tmp_path / "wd")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "FLOAT64 RUN OK" in out.stdout
  assert "enabled JAX's x64 mode" in out.stderr
  assert not jax.config.jax_enable_x64  # nothing leaked into this process


def test_float64_statistics_setting_is_checked():
  with pytest.raises(errors.ConfigError, match="config.corinfomax.stats_dtype"):
    settings.resolve(tiny_config("cifar10", corinfomax={"stats_dtype": "float16"}))
  run = settings.resolve(tiny_config("cifar10", corinfomax={"stats_dtype": "float64"}))
  assert run.method.stats_dtype == "float64"
  from corinfomax_jax.modes import startup  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(errors.ConfigError, match="stats_dtype = 'float64' .*TPUs have no"):
      startup.enable_x64_for(run)
  assert not jax.config.jax_enable_x64
