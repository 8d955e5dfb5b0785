"""The CPU step options: chosen by platform, yielding to XLA_FLAGS, same numbers."""
import jax
import numpy as np
import pytest

from corinfomax_jax import compiler
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.data import augment
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import settings
from corinfomax_jax.run import train_state as train_state_lib
from configs import default


def test_cpu_steps_keep_only_the_reduce_fusions(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert compiler.step_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  assert compiler.step_options("gpu") == {}
  assert compiler.step_options("tpu") == {}


def test_the_environment_s_choice_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert compiler.step_options("cpu") == {}


def _tiny_run():
  c = default.get_config()
  c.dataset = "cifar10"
  c.model.width = 4
  c.model.projector = (32, 16)
  c.batch_size = 16
  c.image_size = 16
  return settings.resolve(c)


def test_the_step_gives_the_same_numbers_with_and_without_the_options(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  run = _tiny_run()
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  model = run.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(run.optimizer, steps_per_epoch=10)
  tx = train_state_lib.create_optimizer(run.optimizer, lr_fn)
  rng = np.random.default_rng(0)
  batch = {"label": np.zeros(16, np.int32)}
  for k in ("view1", "view2"):
    batch[k] = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    batch[k + "_draws"] = rng.uniform(size=(16, augment.NUM_DRAWS)).astype(np.float32)
  results, texts = {}, {}
  for name in ("chosen", "default"):
    if name == "default":
      monkeypatch.setattr(compiler, "step_options", lambda platform=None: {})
    step = pretrain.jit_train_step(run, model, tx, lr_fn, mesh)
    state = train_state_lib.create_train_state(run, model, tx, mesh)
    compiled = step.lower(state, batch).compile()
    texts[name] = compiled.as_text()
    for _ in range(2):
      state, metrics = compiled(state, batch)
    results[name] = (jax.device_get(state.params), jax.device_get(metrics))
  assert texts["chosen"] != texts["default"]  # the option reached the compiler
  chosen, base = results["chosen"], results["default"]
  assert float(chosen[1]["loss"]) == pytest.approx(float(base[1]["loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(chosen[0]), jax.tree.leaves(base[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
