"""Tests for corinfomax_jax.interop.torchvision: torchvision keys and shapes, an independent forward of
the exported dict against the Flax model, and the safetensors file format."""
import functools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corinfomax_jax.interop import torchvision as export
from corinfomax_jax import models

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _torchvision_keys(backbone):
  """torchvision.models.resnet18()/resnet50().state_dict() keys without fc.*, in order."""
  stages, convs = {"resnet18": ((2, 2, 2, 2), 2), "resnet50": ((3, 4, 6, 3), 3)}[backbone]
  keys = ["conv1.weight"] + [f"bn1.{k}" for k in _BN_KEYS]
  for i, n in enumerate(stages, start=1):
    for j in range(n):
      for c in range(1, convs + 1):
        keys += [f"layer{i}.{j}.conv{c}.weight"] + [f"layer{i}.{j}.bn{c}.{k}" for k in _BN_KEYS]
      if j == 0 and (i > 1 or backbone == "resnet50"):
        keys += [f"layer{i}.{j}.downsample.0.weight"]
        keys += [f"layer{i}.{j}.downsample.1.{k}" for k in _BN_KEYS]
  return keys


def _random_variables(backbone, *, cifar_stem, width, image_size, seed=0):
  """Variables of create_model(...) with every leaf random: kernels He-scaled, BN scales,
  biases and running means of either sign, running variances in [0.5, 2]. Init values
  (scale 1 or 0, mean 0, var 1) would hide a swapped mean/var or a dropped BN."""
  model = models.create_model(backbone, projector="8", cifar_stem=cifar_stem, width=width)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0, impl="rbg"),
                          jnp.zeros((1, image_size, image_size, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "scale":
      return (rng.choice([-1, 1], leaf.shape) * rng.uniform(0.5, 1.5, leaf.shape)
              ).astype(np.float32)
    return rng.normal(0, 0.3, leaf.shape).astype(np.float32)  # bias, mean

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_keys_are_torchvisions(backbone):
  _, variables = _random_variables(backbone, cifar_stem=False, width=4, image_size=32)
  state_dict = export.torchvision_state_dict(variables, backbone=backbone, cifar_stem=False)
  assert list(state_dict) == _torchvision_keys(backbone)
  # torchvision: 122 and 320 keys, fc.weight and fc.bias included.
  assert len(state_dict) == {"resnet18": 120, "resnet50": 318}[backbone]


def test_resnet18_shapes_and_parameter_count():
  _, variables = _random_variables("resnet18", cifar_stem=False, width=64, image_size=32)
  sd = export.torchvision_state_dict(variables, backbone="resnet18", cifar_stem=False,
                                     num_batches_tracked=1234)
  assert sd["conv1.weight"].shape == (64, 3, 7, 7)
  assert sd["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
  assert sd["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
  assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
  assert sd["layer4.1.bn2.running_var"].shape == (512,)
  assert sd["bn1.num_batches_tracked"].shape == ()
  assert sd["bn1.num_batches_tracked"].dtype == np.int64
  assert sd["bn1.num_batches_tracked"] == 1234
  assert all(v.dtype == np.float32 for k, v in sd.items() if "num_batches" not in k)
  # torchvision.models.resnet18() has 11,689,512 parameters, fc 512*1000+1000 of them.
  buffers = ("running_mean", "running_var", "num_batches_tracked")
  count = sum(v.size for k, v in sd.items() if not k.endswith(buffers))
  assert count == 11_689_512 - 513_000
  # HWIO -> OIHW is a transpose, not a reshape: check one element by its indices.
  kernel = np.asarray(variables["params"]["backbone"]["layer2_0"]["conv1"]["kernel"])
  assert sd["layer2.0.conv1.weight"][5, 7, 0, 2] == kernel[0, 2, 7, 5]

  _, cifar = _random_variables("resnet18", cifar_stem=True, width=64, image_size=32)
  sd = export.torchvision_state_dict(cifar, backbone="resnet18", cifar_stem=True)
  assert sd["conv1.weight"].shape == (64, 3, 3, 3)


def test_wrong_stem_or_backbone_is_refused():
  _, variables = _random_variables("resnet18", cifar_stem=True, width=4, image_size=32)
  with pytest.raises(ValueError, match="cifar_stem"):
    export.torchvision_state_dict(variables, backbone="resnet18", cifar_stem=False)
  with pytest.raises(ValueError, match="resnet18 or resnet50"):
    export.torchvision_state_dict(variables, backbone="resnet50", cifar_stem=True)
  with pytest.raises(ValueError, match="accepted names"):
    export.torchvision_state_dict(variables, backbone="resnet34", cifar_stem=True)


@pytest.mark.parametrize("backbone,cifar_stem,image_size", [
    ("resnet18", True, 32),
    ("resnet50", False, 64),
])
def test_torch_layout_forward_matches_flax(backbone, cifar_stem, image_size):
  model, variables = _random_variables(backbone, cifar_stem=cifar_stem, width=8,
                                       image_size=image_size)
  images = np.random.default_rng(1).normal(size=(2, image_size, image_size, 3))
  images = images.astype(np.float32)
  flax_features, _ = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  sd = export.torchvision_state_dict(variables, backbone=backbone, cifar_stem=cifar_stem)
  torch_features = jax.jit(functools.partial(
      export.torch_layout_features, backbone=backbone, cifar_stem=cifar_stem))(sd, images)
  flax_features, torch_features = np.asarray(flax_features), np.asarray(torch_features)
  assert flax_features.shape == (2, {"resnet18": 64, "resnet50": 256}[backbone])
  scale = np.abs(flax_features).max()
  assert scale > 1e-2  # features neither vanished nor all zero after the final ReLU
  np.testing.assert_array_less(np.abs(torch_features - flax_features).max(), 1e-4 * scale)


def test_safetensors_round_trip_is_bitwise(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "conv.weight": rng.normal(size=(5, 3, 3, 3)).astype(np.float32),
      "odd": rng.normal(size=(3,)).astype(np.float32),  # 12 bytes: unaligned offsets
      "bn.num_batches_tracked": np.array(-7, dtype=np.int64),
      "empty": np.zeros((0, 4), np.float32),
      "special": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),
      "big_endian": np.arange(4, dtype=">i8"),
  }
  path = tmp_path / "t.safetensors"
  export.save_safetensors(tensors, path, metadata={"format": "pt", "step": "12"})
  loaded = export.load_safetensors(path)
  assert list(loaded) == list(tensors)
  for name, value in tensors.items():
    assert loaded[name].shape == value.shape
    assert loaded[name].dtype == value.dtype.newbyteorder("=")
    assert loaded[name].tobytes() == value.astype(value.dtype.newbyteorder("=")).tobytes()

  raw = path.read_bytes()
  (size,) = struct.unpack("<Q", raw[:8])
  assert (8 + size) % 8 == 0
  header = json.loads(raw[8:8 + size])
  assert header == export.read_safetensors_header(path)
  assert header["__metadata__"] == {"format": "pt", "step": "12"}
  assert header["bn.num_batches_tracked"] == {"dtype": "I64", "shape": [],
                                              "data_offsets": [4 * 135 + 12, 4 * 135 + 20]}
  assert header["conv.weight"]["dtype"] == "F32"
  # The data section is exactly the tensors, back to back.
  assert len(raw) == 8 + size + sum(v.nbytes for v in tensors.values())
  assert raw[8 + size:8 + size + 4] == struct.pack("<f", tensors["conv.weight"].flat[0])


def test_safetensors_refuses_bad_input(tmp_path):
  with pytest.raises(ValueError, match="complex64"):
    export.save_safetensors({"z": np.zeros(2, np.complex64)}, tmp_path / "z.safetensors")
  with pytest.raises(ValueError, match="str to str"):
    export.save_safetensors({}, tmp_path / "m.safetensors", metadata={"step": 3})
  path = tmp_path / "cut.safetensors"
  export.save_safetensors({"x": np.zeros(8, np.float32)}, path)
  path.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(ValueError, match="offsets"):
    export.load_safetensors(path)


def test_state_dict_file_and_inverse_round_trip(tmp_path):
  _, variables = _random_variables("resnet50", cifar_stem=True, width=4, image_size=32)
  sd = export.torchvision_state_dict(variables, backbone="resnet50", cifar_stem=True,
                                     num_batches_tracked=99)
  export.save_safetensors(sd, tmp_path / "backbone.safetensors")
  loaded = export.load_safetensors(tmp_path / "backbone.safetensors")
  assert list(loaded) == list(sd)
  assert all(loaded[k].tobytes() == sd[k].tobytes() and loaded[k].shape == sd[k].shape
             for k in sd)

  loaded["fc.weight"] = np.zeros((10, 128), np.float32)  # a classifier is ignored
  back = export.flax_backbone_from_state_dict(loaded, backbone="resnet50", cifar_stem=True)
  expected = {"params": variables["params"]["backbone"],
              "batch_stats": variables["batch_stats"]["backbone"]}
  assert jax.tree.structure(back) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b), strict=True),
               back, expected)
  # And the Flax backbone variables export to the same dict again.
  again = export.torchvision_state_dict(back, backbone="resnet50", cifar_stem=True,
                                        num_batches_tracked=99)
  assert all(np.array_equal(again[k], sd[k]) for k in sd) and list(again) == list(sd)

  del loaded["layer3.0.downsample.1.running_var"]
  with pytest.raises(ValueError, match="layer3.0.downsample.1.running_var"):
    export.flax_backbone_from_state_dict(loaded, backbone="resnet50", cifar_stem=True)
  loaded["layer3.0.downsample.1.running_var"] = sd["layer3.0.downsample.1.running_var"]
  loaded["layer5.0.conv1.weight"] = sd["conv1.weight"]
  with pytest.raises(ValueError, match="layer5.0.conv1.weight"):
    export.flax_backbone_from_state_dict(loaded, backbone="resnet50", cifar_stem=True)


def test_safetensors_bfloat16_reads_as_float32_exactly(tmp_path):
  # safetensors' BF16: the upper 16 bits of each float32, little-endian.
  values = np.array([1.0, -3.5, 0.15625, -0.0], np.float32)
  raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
  header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2],
                             "data_offsets": [0, len(raw)]}}).encode()
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
  loaded = export.load_safetensors(path)["w"]
  assert loaded.dtype == np.float32 and loaded.shape == (2, 2)
  assert loaded.tobytes() == values.tobytes()
