"""The backbone seam: a backbone registered from outside works everywhere a ResNet does.

A tiny conv net (no ResNet, no width, no dtype option, features flattened so their size
depends on the image size) is put in models.BACKBONES for one test at a time.
"""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from corinfomax_jax import errors
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax import models
from corinfomax_jax.data import augment
from corinfomax_jax.interop import torchvision as export
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import settings
from corinfomax_jax.run import train_state as train_state_lib


class _TinyConvNet(nn.Module):
  """Two stride-2 3x3 convs, then flatten: D = (size / 4)^2 * 2 * features."""
  features: int = 3

  @nn.compact
  def __call__(self, x, train):
    del train  # no BatchNorm: nothing differs between training and inference
    x = nn.relu(nn.Conv(self.features, (3, 3), strides=2, name="conv1")(x))
    x = nn.relu(nn.Conv(2 * self.features, (3, 3), strides=2, name="conv2")(x))
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _check_features(features):
  if not isinstance(features, int) or isinstance(features, bool) or features <= 0:
    raise ValueError(f"features {features!r} must be a positive integer")


_TINY = models.BackboneSpec(build=_TinyConvNet, options={"features": _check_features})


@pytest.fixture
def tiny(monkeypatch):
  monkeypatch.setitem(models.BACKBONES, "tiny", _TINY)
  return "tiny"


def _tiny_config():
  config = tiny_config("cifar10")  # 16 px images
  config.model = ml_collections.ConfigDict(
      dict(backbone="tiny", features=2, projector=(8, 4), projector_bn=False,
           dtype="float32"))
  return config


def test_a_registered_backbone_builds_the_model_with_its_true_feature_dim(tiny):
  model = models.create_model(backbone=tiny, projector="16-8", features=2)
  assert model.backbone == _TinyConvNet(features=2)
  # Flattened 8x8 (32 px) or 4x4 (16 px) maps of 4 channels: no formula knows this.
  assert models.feature_dim(model) == 8 * 8 * 4
  assert models.feature_dim(model, image_size=16) == 4 * 4 * 4
  assert models.feature_dim(model.backbone, image_size=16) == 64
  x = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  # The usual parameter tree: "backbone" (the registered module's own) and "projector".
  assert set(variables["params"]) == {"backbone", "projector"}
  assert set(variables["params"]["backbone"]) == {"conv1", "conv2"}
  assert variables["params"]["projector"]["linear0"]["kernel"].shape == (64, 16)
  features, z = model.apply(variables, x, train=False)
  assert features.shape == (2, 64) and z.shape == (2, 8)
  np.testing.assert_array_equal(
      features, model.backbone.apply({"params": variables["params"]["backbone"]}, x,
                                     train=False))


def test_a_registered_backbone_refuses_options_it_does_not_have(tiny):
  with pytest.raises(ValueError, match=r"'tiny' has no option 'width'.*\['features'\]"):
    models.create_model(backbone=tiny, width=8)
  with pytest.raises(ValueError, match="'tiny' has no option 'cifar_stem'"):
    models.create_backbone(tiny, cifar_stem=True)
  with pytest.raises(ValueError, match="features 0 must be a positive integer"):
    models.create_model(backbone=tiny, features=0)
  # No dtype option: float32 is what it computes in, anything else is refused.
  with pytest.raises(ValueError, match="'tiny' has no dtype option"):
    models.create_model(backbone=tiny, dtype="bfloat16")


def test_the_config_of_a_registered_backbone_is_checked_by_its_entry(tiny):
  config = _tiny_config()
  settings.resolve(config)
  config.model.width = 8  # a ResNet key: not this backbone's
  with pytest.raises(errors.ConfigError,
                     match=re.escape("config.model.width = 8 is invalid: backbone 'tiny' "
                                     "has no option 'width'")):
    settings.resolve(config)
  config = _tiny_config()
  config.model.features = -1
  with pytest.raises(errors.ConfigError, match=re.escape("config.model.features = -1")):
    settings.resolve(config)
  config = _tiny_config()
  config.model.dtype = "bfloat16"
  with pytest.raises(errors.ConfigError,
                     match=re.escape("config.model.dtype = 'bfloat16'")):
    settings.resolve(config)


def test_a_registered_backbone_pretrains_with_the_online_probe(tiny):
  del tiny
  config = _tiny_config()
  config.eval.online_probe.enabled = True
  run = settings.resolve(config)
  model = run.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(run.optimizer, steps_per_epoch=10)
  tx = train_state_lib.create_optimizer(run.optimizer, lr_fn)
  mesh = mesh_lib.make_mesh()
  state = train_state_lib.create_train_state(run, model, tx, mesh, probe_classes=3)
  # The probe's size comes from the model: 4x4 maps of 4 channels at 16 px.
  assert state.probe["params"]["kernel"].shape == (64, 3)
  step = pretrain.jit_train_step(run, model, tx, lr_fn, mesh)
  rng = np.random.default_rng(0)
  batch = {"label": rng.integers(0, 3, 16).astype(np.int32)}
  for k in ("view1", "view2"):
    batch[k] = rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    batch[f"{k}_draws"] = rng.uniform(size=(16, augment.NUM_DRAWS)).astype(np.float32)
  new_state, metrics = step(state, batch)
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(new_state.params["backbone"]["conv1"]["kernel"],
                            state.params["backbone"]["conv1"]["kernel"])


def test_the_torchvision_export_refuses_a_registered_non_resnet_in_one_line(tiny):
  model = models.create_model(backbone=tiny, projector="8", features=2)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = {"params": variables["params"], "batch_stats": {"backbone": {}}}
  for call in (lambda: export.torchvision_state_dict(variables, backbone=tiny,
                                                     cifar_stem=False),
               lambda: export.flax_backbone_from_state_dict({}, backbone=tiny,
                                                            cifar_stem=False)):
    with pytest.raises(ValueError, match=r"'tiny' has no torchvision counterpart.*"
                       r"\['resnet18', 'resnet50'\]") as e:
      call()
    assert "\n" not in str(e.value)


def test_a_new_resnet_depth_is_one_table_line(monkeypatch):
  # resnet34 as torchvision builds it: BasicBlocks, (3, 4, 6, 3).
  monkeypatch.setitem(models.resnet.RESNETS, "resnet34",
                      dict(stage_sizes=(3, 4, 6, 3), block_cls=models.BasicBlock))
  monkeypatch.setitem(models.BACKBONES, "resnet34", models.BackboneSpec(
      functools.partial(models.resnet.create_resnet, "resnet34"), models.resnet.OPTIONS))
  backbone = models.create_backbone("resnet34", num_classes=1000)
  variables = jax.eval_shape(functools.partial(backbone.init, train=False),
                             jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert count == 21_797_672  # torchvision.models.resnet34()
  model = models.create_model("resnet34", projector="8", width=4, cifar_stem=True)
  assert models.feature_dim(model) == 32
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  sd = export.torchvision_state_dict(variables, backbone="resnet34", cifar_stem=True)
  # torchvision's resnet34 state_dict has 218 keys, fc.weight and fc.bias among them.
  assert len(sd) == 216 and "layer3.5.bn2.running_var" in sd
  assert "layer1.0.downsample.0.weight" not in sd and "layer2.0.downsample.0.weight" in sd
