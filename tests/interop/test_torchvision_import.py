"""Importing torchvision ResNets: a state_dict built from torchvision's definition (keys,
shapes, fc included) with random weights, saved as .pth (without torch) and as
.safetensors (by the safetensors package), read back, mapped into the Flax backbone,
gives the features of an independent forward of the same dict; every mismatch is named."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from torch_layout import save_torch_file
from torch_layout import torchvision_resnet
from test_torchvision import _torchvision_keys

from corinfomax_jax import models
from corinfomax_jax.interop import torchvision as tv
from corinfomax_jax.interop import weights_files


def _parameters(sd):
  buffers = ("running_mean", "running_var", "num_batches_tracked")
  return sum(v.size for k, v in sd.items() if not k.endswith(buffers))


@functools.lru_cache(maxsize=None)
def _abstract_backbone(backbone, width, cifar_stem, size=32):
  net = models.create_backbone(backbone, cifar_stem=cifar_stem, width=width)
  return net, jax.eval_shape(functools.partial(net.init, train=False),
                             jax.random.key(0), jnp.zeros((1, size, size, 3)))


@pytest.mark.parametrize("backbone,count", [("resnet18", 11_689_512),
                                            ("resnet50", 25_557_032)])
def test_pth_and_safetensors_import_gives_torchvisions_features(backbone, count, tmp_path):
  sd = torchvision_resnet(backbone)
  # The layout is torchvision's: its keys (plus fc) and its parameter count.
  assert list(sd) == _torchvision_keys(backbone) + ["fc.weight", "fc.bias"]
  assert _parameters(sd) == count
  save_torch_file(sd, tmp_path / "w.pth")
  safetensors.numpy.save_file(sd, str(tmp_path / "w.safetensors"))
  pth = weights_files.read_weights(tmp_path / "w.pth")
  st = weights_files.read_weights(tmp_path / "w.safetensors")
  assert list(pth.state_dict) == list(sd)  # safetensors stores its keys sorted
  for weights in (pth, st):
    assert sorted(weights.state_dict) == sorted(sd) and weights.left_out == {}
    assert all(weights.state_dict[k].tobytes() == sd[k].tobytes() for k in sd)
  assert tv.ignored_keys(pth.state_dict) == ["fc.bias", "fc.weight"]

  net, like = _abstract_backbone(backbone, 64, False)
  variables = tv.flax_backbone_from_state_dict(pth.state_dict, backbone=backbone,
                                               cifar_stem=False, like=like)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda x: x.shape, like)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  flax_features = np.asarray(jax.jit(functools.partial(net.apply, train=False))(
      variables, images))
  torch_features = np.asarray(jax.jit(functools.partial(
      tv.torch_layout_features, backbone=backbone, cifar_stem=False))(
          {k: v for k, v in sd.items() if not k.startswith("fc.")}, images))
  assert flax_features.shape == (2, {"resnet18": 512, "resnet50": 2048}[backbone])
  scale = np.abs(torch_features).max()
  assert scale > 1e-2
  worst = np.abs(flax_features - torch_features).max() / scale
  print(f"{backbone}: worst difference {worst:.2e} of the largest feature")
  assert worst < 1e-4
  # Exported again, the backbone is the file without fc, bit for bit.
  again = tv.torchvision_state_dict(variables, backbone=backbone, cifar_stem=False,
                                    num_batches_tracked=tv.batches_tracked(sd))
  assert list(again) == list(sd)[:-2]
  assert all(again[k].tobytes() == sd[k].tobytes() and again[k].dtype == sd[k].dtype
             for k in again)


def test_nested_checkpoints_lose_their_prefixes_and_count_what_is_left_out(tmp_path):
  sd = torchvision_resnet("resnet18", width=4, cifar_stem=True, classes=10)
  nested = {"epoch": 7, "optimizer_state_dict": {"lr": np.array(0.1)},
            "model_state_dict": {
                **{f"module.backbone.{k}": v for k, v in sd.items()},
                **{f"module.projector.{i}.weight": np.ones((3, 3), np.float32)
                   for i in range(3)}}}
  save_torch_file(nested, tmp_path / "ckpt.pth")
  weights = weights_files.read_weights(tmp_path / "ckpt.pth")
  assert list(weights.state_dict) == list(sd)
  assert weights.left_out == {"projector.*": 3}
  assert weights.source == "'model_state_dict', keys 'module.' removed, keys 'backbone.*'"
  record = weights.record()
  assert record["keys"] == len(sd) and len(record["sha256"]) == 64
  assert record["sha256"] == __import__("hashlib").sha256(
      (tmp_path / "ckpt.pth").read_bytes()).hexdigest()

  safetensors.numpy.save_file({"weight": np.ones(2, np.float32)},
                              str(tmp_path / "a.safetensors"))
  save_torch_file({"epoch": 1, "args": "x"}, tmp_path / "none.pth")
  with pytest.raises(ValueError, match=r"no state_dict .* top level is \['args', 'epoch'\]"):
    weights_files.read_weights(tmp_path / "none.pth")
  (tmp_path / "junk.bin").write_bytes(b"\x01" * 64)
  with pytest.raises(ValueError, match="neither a safetensors file nor a torch.save"):
    weights_files.read_weights(tmp_path / "junk.bin")


def _mismatch(sd, backbone, width, cifar_stem):
  _, like = _abstract_backbone(backbone, width, cifar_stem, size=16)
  return tv.state_dict_mismatch(sd, tv.torchvision_shapes(like, backbone=backbone),
                                backbone=backbone, cifar_stem=cifar_stem)


def test_mismatches_are_one_line_naming_keys_shapes_and_the_stem():
  cifar = torchvision_resnet("resnet18", width=4, cifar_stem=True, classes=10)
  assert _mismatch(cifar, "resnet18", 4, True) is None
  # A CIFAR stem given to an ImageNet model, and the reverse.
  line = _mismatch(cifar, "resnet18", 4, False)
  assert line == ("conv1.weight is 3x3: a CIFAR stem (3x3 stride-1 conv1, no max-pool), "
                  "but the model has cifar_stem=False; set config.model.cifar_stem=True")
  imagenet = torchvision_resnet("resnet18", width=4, cifar_stem=False, classes=10)
  assert _mismatch(imagenet, "resnet18", 4, True).startswith(
      "conv1.weight is 7x7: an ImageNet stem (7x7 stride-2 conv1, then a 3x3 max-pool), "
      "but the model has cifar_stem=True; set config.model.cifar_stem=False")
  # Another width: the shapes that differ, and why.
  line = _mismatch(cifar, "resnet18", 8, True)
  assert "other shapes (" in line and "conv1.weight [4, 3, 3, 3] in the file, [8, 3, 3, 3] " \
      "in the model" in line and "the file's conv1 has 4 output channels, the model 8" in line
  # A resnet50 file for a resnet18 model: what the file holds, missing and unexpected keys.
  r50 = torchvision_resnet("resnet50", width=4, cifar_stem=True, classes=10)
  line = _mismatch(r50, "resnet18", 4, True)
  assert line.startswith("the file holds a resnet50, the model is a resnet18; ")
  assert "unexpected keys (" in line and "layer1.0.conv3.weight" in line
  assert "other shapes (" in line  # layer1.0.conv1 is 1x1 in a bottleneck
  # One key missing, one too many: both named; fc is never unexpected.
  broken = dict(cifar)
  del broken["layer3.1.bn2.running_var"]
  broken["layer3.1.conv9.weight"] = broken["layer3.1.conv2.weight"]
  line = _mismatch(broken, "resnet18", 4, True)
  assert line == ("missing keys (1): layer3.1.bn2.running_var; "
                  "unexpected keys (1): layer3.1.conv9.weight")
  assert "\n" not in line
  with pytest.raises(ValueError, match="missing keys"):
    tv.flax_backbone_from_state_dict(broken, backbone="resnet18", cifar_stem=True)


def test_import_gives_torchvisions_own_features_where_torch_is_installed(tmp_path):
  """Against torchvision's real eval-mode forward (skipped without torch and torchvision;
  the test above checks the same against an independent forward of the dict)."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  net = torchvision.models.resnet18()
  with torch.no_grad():
    for name, buffer in net.named_buffers():
      if name.endswith("running_mean"):
        buffer.normal_(0, 0.3)
      elif name.endswith("running_var"):
        buffer.uniform_(0.5, 2.0)
  torch.save(net.state_dict(), tmp_path / "r18.pth")
  weights = weights_files.read_weights(tmp_path / "r18.pth")
  flax_net, like = _abstract_backbone("resnet18", 64, False)
  variables = tv.flax_backbone_from_state_dict(weights.state_dict, backbone="resnet18",
                                               cifar_stem=False, like=like)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  net.fc = torch.nn.Identity()
  with torch.no_grad():
    expected = net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(flax_net.apply(variables, images, train=False))
  assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
