"""Tests for corinfomax_jax.models: torchvision parameter counts, init, BN, sharding, heads."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from corinfomax_jax import models


def _param_count(module, image_size=32):
  """Counts params (not batch_stats) from shapes alone: nothing is run."""
  variables = jax.eval_shape(
      functools.partial(module.init, train=False), _key(),
      jnp.zeros((1, image_size, image_size, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _key(seed=0):
  # rbg keys: threefry's random-normal init takes ~10x longer to compile on CPU.
  return jax.random.key(seed, impl="rbg")


def _tiny_model(**kwargs):
  kwargs = dict(projector="32-24-16", projector_bn=True, cifar_stem=True,
                width=4) | kwargs
  return models.create_model("resnet18", **kwargs)


def _structure(model, x):
  return jax.eval_shape(functools.partial(model.init, train=False), _key(), x)


@pytest.fixture(scope="module")
def tiny_variables():
  """Variables of _tiny_model(): width-4 CIFAR ResNet-18, 32-24-16 BN projector."""
  return jax.jit(functools.partial(_tiny_model().init, train=False))(
      _key(), jnp.zeros((2, 8, 8, 3)))


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_689_512),  # torchvision.models.resnet18()
    ("resnet50", 25_557_032),  # torchvision.models.resnet50()
])
def test_param_count_matches_torchvision(name, expected):
  assert _param_count(models.create_backbone(name, num_classes=1000)) == expected


def test_param_count_cifar_stem_resnet18():
  # 11,689,512 - fc (512*1000 + 1000) - conv1 7x7 (7*7*3*64) + conv1 3x3 (3*3*3*64).
  expected = 11_689_512 - 513_000 - 9408 + 1728
  assert expected == 11_168_832
  assert _param_count(models.create_backbone("resnet18", cifar_stem=True)) == expected


def test_param_count_with_projector():
  # ResNet-50 (no head) + 2048->8192 (+bias) + BN + 8192->8192 (+bias) + BN + 8192->128.
  backbone = 25_557_032 - (2048 * 1000 + 1000)
  projector = ((2048 * 8192 + 8192 + 2 * 8192) + (8192 * 8192 + 8192 + 2 * 8192)
               + 8192 * 128)
  model = models.create_model("resnet50", projector="8192-8192-128", projector_bn=True)
  assert _param_count(model) == backbone + projector


@pytest.mark.parametrize("name,width,dim", [
    ("resnet18", 64, 512), ("resnet50", 64, 2048), ("resnet18", 8, 64),
    ("resnet50", 16, 512)
])
def test_backbone_feature_dim(name, width, dim):
  assert models.backbone_feature_dim(name, width) == dim
  x = jnp.zeros((2, 32, 32, 3))
  backbone = models.create_backbone(name, width=width, cifar_stem=True)
  out = jax.eval_shape(functools.partial(backbone.init_with_output, train=False),
                       _key(), x)[0]
  assert out.shape == (2, dim)


def test_unknown_backbone_raises_with_accepted_names():
  with pytest.raises(ValueError, match="resnet18.*resnet50"):
    models.create_model("resnet34", projector="64")
  with pytest.raises(ValueError, match="resnet34"):
    models.backbone_feature_dim("resnet34", 64)


def test_conv_init_is_kaiming_normal_fan_out():
  model = models.create_backbone("resnet18", cifar_stem=True)
  # Returning one kernel lets XLA drop every other initializer: compiles in a second.
  kernel = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8, 8, 3)), train=False)[
      "params"]["layer4_0"]["conv2"]["kernel"])(jax.random.key(0))
  kernel = np.asarray(kernel)
  assert kernel.shape == (3, 3, 512, 512)
  expected_std = np.sqrt(2.0 / (3 * 3 * 512))  # fan_out = 3 * 3 * out_channels
  assert abs(kernel.std() / expected_std - 1) < 0.01
  assert abs(kernel.mean()) < 0.01 * expected_std
  # Untruncated normal: P(|w| > 2.5 sigma) = 1.2%; a truncated normal has none.
  assert 0.01 < (np.abs(kernel) > 2.5 * expected_std).mean() < 0.015


@pytest.mark.parametrize("name,last_bn,num_blocks", [
    ("resnet18", "bn2", 8), ("resnet50", "bn3", 16)])
def test_last_bn_scale_of_every_block_is_zero(name, last_bn, num_blocks):
  model = models.create_backbone(name, width=4)

  def block_batch_norms(key):
    params = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    return {block: {layer: p for layer, p in layers.items() if "bn" in layer}
            for block, layers in params.items() if block.startswith("layer")}

  bns = jax.jit(block_batch_norms)(_key())
  assert len(bns) == num_blocks
  for block, layers in bns.items():
    for layer, p in layers.items():
      want = 0.0 if layer == last_bn else 1.0
      np.testing.assert_array_equal(p["scale"], want, err_msg=f"{block}/{layer}")
      np.testing.assert_array_equal(p["bias"], 0.0, err_msg=f"{block}/{layer}")


def _conv_nhwc(x, kernel, stride):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def _apply(module, variables, x, train):
  if train:
    return module.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  return module.apply(variables, x, train=False)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("block_cls", [models.BasicBlock, models.Bottleneck])
def test_block_is_identity_or_downsample_at_init(block_cls, train):
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 16))
  filters = 16 // block_cls.expansion
  # Same shape: the residual branch is zero, so the block is relu(x).
  block = block_cls(filters=filters, strides=1)
  variables = block.init(_key(), x, train=False)
  assert "downsample_conv" not in variables["params"]
  np.testing.assert_allclose(_apply(block, variables, x, train), jax.nn.relu(x),
                             atol=1e-6)

  # Strided: relu(BN(conv1x1 stride 2 (x))), BN at init stats (eval) or batch stats.
  block = block_cls(filters=2 * filters, strides=2)
  variables = block.init(_key(), x, train=False)
  y = _conv_nhwc(x, variables["params"]["downsample_conv"]["kernel"], 2)
  assert y.shape == (4, 4, 4, 2 * filters * block_cls.expansion)
  if train:
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
  else:
    mean, var = 0.0, 1.0
  np.testing.assert_allclose(_apply(block, variables, x, train),
                             jax.nn.relu((y - mean) / jnp.sqrt(var + 1e-5)), atol=1e-5)


def test_projector_shapes_and_no_bias_on_last_layer():
  model = _tiny_model(projector_bn=False)
  x = jnp.zeros((4, 8, 8, 3))
  variables = _structure(model, x)
  shapes = jax.tree.map(lambda a: a.shape, variables["params"]["projector"])
  assert shapes == {
      "linear0": {"kernel": (32, 32), "bias": (32,)},  # width 4 -> 32 features
      "linear1": {"kernel": (32, 24), "bias": (24,)},
      "linear2": {"kernel": (24, 16)},
  }
  assert "projector" not in variables["batch_stats"]
  features, z = jax.eval_shape(functools.partial(model.apply, train=False),
                               variables, x)
  assert features.shape == (4, 32) and z.shape == (4, 16)


def test_projector_single_layer():
  variables = _structure(_tiny_model(projector="16"), jnp.zeros((2, 8, 8, 3)))
  assert jax.tree.map(lambda a: a.shape, variables["params"]["projector"]) == {
      "linear0": {"kernel": (32, 16)}}


def test_projector_bn_adds_batch_norm_after_hidden_linears():
  variables = _structure(_tiny_model(projector_bn=True), jnp.zeros((2, 8, 8, 3)))
  proj = variables["params"]["projector"]
  assert set(proj) == {"linear0", "bn0", "linear1", "bn1", "linear2"}
  assert proj["bn1"]["scale"].shape == (24,)
  assert set(variables["batch_stats"]["projector"]) == {"bn0", "bn1"}


@pytest.mark.parametrize("batch_norm", [False, True])
def test_projector_forward(batch_norm):
  proj = models.Projector((64, 8), batch_norm=batch_norm)
  x = 5.0 + jax.random.normal(jax.random.key(1), (256, 16))
  variables = proj.init(_key(), x, train=False)
  z, state = proj.apply(variables, x, train=True,
                        mutable=["batch_stats", "intermediates"],
                        capture_intermediates=lambda m, _: m.name in ("linear0", "bn0"))
  p = variables["params"]
  hidden = x @ p["linear0"]["kernel"] + p["linear0"]["bias"]
  np.testing.assert_allclose(state["intermediates"]["linear0"]["__call__"][0], hidden,
                             rtol=1e-5, atol=1e-4)
  if batch_norm:
    # BN before ReLU, on batch statistics in train mode.
    hidden = (hidden - hidden.mean(0)) / jnp.sqrt(hidden.var(0) + 1e-5)
    np.testing.assert_allclose(state["intermediates"]["bn0"]["__call__"][0], hidden,
                               rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z, jax.nn.relu(hidden) @ p["linear1"]["kernel"],
                             rtol=1e-4, atol=1e-4)
  # Not normalised: the loss does that.
  assert not np.allclose(np.linalg.norm(z, axis=1), 1.0)


@pytest.mark.parametrize("spec", ["", "2048-abc", "0-64", "-64", "64-", "64--32",
                                  "64-0", " 64", "64.5", None, 64, (), (64, 0),
                                  (64.0,), (True, 8), [-1]])
def test_malformed_projector_raises(spec):
  with pytest.raises(ValueError, match=r"projector .* malformed.*positive integers"):
    models.parse_projector(spec)
  with pytest.raises(ValueError, match="malformed"):
    models.create_model("resnet18", projector=spec)


def test_parse_projector():
  assert models.parse_projector("2048-2048-64") == (2048, 2048, 64)
  assert models.parse_projector("64") == (64,)
  assert models.parse_projector((2048, 2048, 64)) == (2048, 2048, 64)
  assert models.parse_projector([512, 64]) == (512, 64)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny_variables):
  model = _tiny_model(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  for leaf in jax.tree.leaves(_structure(model, x)):
    assert leaf.dtype == jnp.float32
  (features, z), new_state = model.apply(tiny_variables, x, train=True,
                                         mutable=["batch_stats"])
  assert features.dtype == jnp.float32 and z.dtype == jnp.float32
  for leaf in jax.tree.leaves(new_state):
    assert leaf.dtype == jnp.float32
  # Computation really is in bfloat16: results differ from float32, but not by much.
  features32, _ = _tiny_model().apply(tiny_variables, x, train=True,
                                      mutable=["batch_stats"])[0]
  assert not np.array_equal(features, features32)
  np.testing.assert_allclose(features, features32, rtol=0.05, atol=0.05)


def test_train_updates_batch_stats_and_eval_does_not(tiny_variables):
  model = _tiny_model()
  x = 3.0 + jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  _, new = model.apply(tiny_variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         tiny_variables["batch_stats"], new["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Running mean (init 0) moves 1 - momentum = 0.1 (torch's default) toward the
  # batch mean.
  conv_out = _conv_nhwc(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))),
                        tiny_variables["params"]["backbone"]["conv1"]["kernel"], 1)
  np.testing.assert_allclose(new["batch_stats"]["backbone"]["bn1"]["mean"],
                             0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)

  _, same = model.apply(tiny_variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, tiny_variables["batch_stats"],
               same["batch_stats"])
  # Eval mode uses running stats, so a sample's output doesn't depend on its batch.
  _, z_all = model.apply(tiny_variables, x, train=False)
  _, z_one = model.apply(tiny_variables, x[:1], train=False)
  np.testing.assert_allclose(z_all[:1], z_one, rtol=1e-5, atol=1e-6)


def test_sharded_forward_equals_unsharded(tiny_variables):
  # BN statistics under jit over a globally sharded batch must be global batch stats.
  assert jax.device_count() == 8
  model = _tiny_model()
  scale = jnp.arange(1.0, 17.0)[:, None, None, None]
  x = scale * jax.random.normal(jax.random.key(1), (16, 8, 8, 3))

  @jax.jit
  def forward(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  expected = forward(tiny_variables, x)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  got = forward(jax.device_put(tiny_variables, NamedSharding(mesh, P())),
                jax.device_put(x, NamedSharding(mesh, P("data"))))
  assert len(got[0][1].sharding.device_set) == 8
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
               got, expected)
  # Per-device BN (the bug this guards against) would differ: the shards' samples
  # have very different scales.
  per_shard = [forward(tiny_variables, x[2 * i:2 * i + 2])[0][1] for i in range(8)]
  assert not np.allclose(np.concatenate(per_shard), expected[0][1], atol=1e-3)


def test_feature_dim_is_the_models_own_output_size():
  model = _tiny_model()
  assert models.feature_dim(model) == models.feature_dim(model.backbone) == 32
  features, _ = jax.eval_shape(functools.partial(model.init_with_output, train=False),
                               _key(), jnp.zeros((1, 16, 16, 3)))[0]
  assert features.shape == (1, models.feature_dim(model, image_size=16))
  assert models.feature_dim(models.create_model("resnet50", projector="8")) == 2048


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=0), "width 0 must be a positive integer"),
    (dict(width=True), "width True must be a positive integer"),
    (dict(cifar_stem="yes"), "cifar_stem 'yes' must be True or False"),
    (dict(dtype="float16"), r"dtype 'float16' .*\['bfloat16', 'float32'\]"),
    (dict(depth=3), r"'resnet18' has no option 'depth'; it accepts \['cifar_stem', "
                    r"'dtype', 'num_classes', 'width'\]"),
])
def test_resnet_options_are_checked_by_its_entry(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.create_backbone("resnet18", **kwargs)
  with pytest.raises(ValueError, match=match):
    models.create_model("resnet18", projector="8", **kwargs)


def test_the_model_takes_no_classifier_backbone():
  with pytest.raises(ValueError, match="num_classes"):
    models.create_model("resnet18", projector="8", num_classes=10)


def test_linear_logits_is_an_affine_map_in_float32():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32)}
  features = rng.normal(size=(3, 6)).astype(np.float32)
  logits = models.linear_logits(params, jnp.asarray(features, jnp.bfloat16))
  assert logits.dtype == jnp.float32
  bf16 = np.asarray(jnp.asarray(features, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(logits, bf16 @ params["kernel"] + params["bias"], rtol=1e-5,
                             atol=1e-5)


def test_linear_head_initialisations():
  zeros = models.init_linear_head(6, 4)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), zeros) == {
      "kernel": ((6, 4), jnp.float32), "bias": ((4,), jnp.float32)}
  assert not any(np.any(a) for a in jax.tree.leaves(zeros))
  normal = models.init_linear_head(512, 100, init="normal", stddev=0.01,
                                   rng=jax.random.key(0))
  np.testing.assert_array_equal(normal["bias"], 0.0)
  assert abs(float(normal["kernel"].std()) / 0.01 - 1) < 0.01
  assert abs(float(normal["kernel"].mean())) < 5 * 0.01 / np.sqrt(512 * 100)  # 5 sigma
  # "lecun_normal" is flax's Dense initialisation, value for value.
  dense = nn.Dense(4).init(jax.random.key(3), jnp.zeros((1, 6)))["params"]
  lecun = models.init_linear_head(6, 4, init="lecun_normal", rng=jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, lecun, dict(dense))
  with pytest.raises(ValueError, match="pass rng"):
    models.init_linear_head(6, 4, init="normal")
  with pytest.raises(ValueError,
                     match=r"'uniform' .*\['zeros', 'normal', 'lecun_normal'\]"):
    models.init_linear_head(6, 4, init="uniform")
