"""--mode=import: a torchvision-layout file becomes a workdir every mode reads."""
import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import tiny_config
from torch_layout import save_torch_file
from torch_layout import torchvision_resnet

import corinfomax_jax
from corinfomax_jax import errors
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.interop import torchvision as tv
from corinfomax_jax.modes import export as export_lib
from corinfomax_jax.modes import import_weights
from corinfomax_jax.modes import knn_eval as knn_eval_lib
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import settings
from corinfomax_jax.run import train_state as train_state_lib


def _images(n=3):
  return np.random.default_rng(1).normal(size=(n, 16, 16, 3)).astype(np.float32)


def _backbone_of(sd):
  return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def test_an_imported_workdir_is_read_by_every_mode_and_pretraining_continues(
    tmp_path, image_folder):
  sd = torchvision_resnet("resnet18", width=4, cifar_stem=True, classes=10)
  save_torch_file(sd, tmp_path / "r18.pth")
  config = tiny_config(f"folder:{image_folder}")
  workdir = str(tmp_path / "w")
  out = import_weights.import_weights(config, workdir, str(tmp_path / "r18.pth"))
  assert out["step"] == 0 and out["keys"] == 122 and out["read"] == 120
  assert out["ignored"] == ["fc.bias", "fc.weight"] and out["left_out"] == {}
  assert out["num_batches_tracked"] == 1234 and out["source"] == "the top level"
  with open(os.path.join(workdir, import_weights.RESULT)) as f:
    assert json.load(f)["sha256"] == out["sha256"]
  assert os.path.exists(os.path.join(workdir, "config.json"))

  # load_encoder: the file's eval-mode features, from the checkpoint of step 0.
  enc = corinfomax_jax.load_encoder(workdir)
  assert enc.step == 0 and enc.config[train_state_lib.IMPORTED]["path"] == out["path"]
  expected = np.asarray(tv.torch_layout_features(_backbone_of(sd), _images(),
                                                 backbone="resnet18", cifar_stem=True))
  scale = np.abs(expected).max()
  assert scale > 1e-2
  assert np.abs(enc(_images()) - expected).max() < 1e-4 * scale
  # The projector is the config's seeded fresh one: a pretraining's initial projector.
  run = settings.resolve(config)
  initial = train_state_lib.initial_state(run, run.model.create(), mesh_lib.make_mesh())
  assert set(enc.variables["params"]) == {"backbone", "projector"}
  jax.tree.map(np.testing.assert_array_equal, enc.variables["params"]["projector"],
               jax.device_get(initial.params["projector"]))

  # export: the file again, bit for bit (fc left out), num_batches_tracked included.
  exported = tv.load_safetensors(export_lib.export_backbone(config, workdir)["safetensors"])
  assert list(exported) == list(_backbone_of(sd))
  assert all(exported[k].tobytes() == sd[k].tobytes() for k in exported)

  assert knn_eval_lib.knn_eval(config, workdir)["step"] == 0

  # Pretraining continues from it, and its checkpoints keep naming the file.
  state = pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2),
                                      workdir)
  assert int(state.step) == 2
  enc2 = corinfomax_jax.load_encoder(workdir)
  assert enc2.step == 2
  assert enc2.config[train_state_lib.IMPORTED] == enc.config[train_state_lib.IMPORTED]
  # Two small steps from the imported weights, not from a random network.
  imported = np.asarray(enc.variables["params"]["backbone"]["layer4_1"]["conv2"]["kernel"])
  trained = np.asarray(enc2.variables["params"]["backbone"]["layer4_1"]["conv2"]["kernel"])
  fresh = np.asarray(initial.params["backbone"]["layer4_1"]["conv2"]["kernel"])
  assert 0 < np.linalg.norm(trained - imported) < 0.2 * np.linalg.norm(fresh - imported)
  again = tv.load_safetensors(export_lib.export_backbone(config, workdir)["safetensors"])
  assert int(again["bn1.num_batches_tracked"]) == 1234 + 2


def test_export_import_export_round_trips_bit_for_bit(pretrained_workdir, tmp_path,
                                                      image_folder):
  config = tiny_config(f"folder:{image_folder}")
  os.symlink(pretrained_workdir / "checkpoints", tmp_path / "checkpoints")
  first = export_lib.export_backbone(config, str(tmp_path))
  workdir = str(tmp_path / "imported")
  out = import_weights.import_weights(config, workdir, first["safetensors"])
  assert out["ignored"] == [] and out["read"] == out["keys"] == 120
  second = export_lib.export_backbone(config, workdir)
  a, b = (tv.load_safetensors(p["safetensors"]) for p in (first, second))
  assert list(a) == list(b) and int(b["bn1.num_batches_tracked"]) == first["step"] == 4
  assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def _one_line(e):
  message = str(e.value)
  assert "\n" not in message
  return message


def test_what_does_not_fit_is_one_line(tmp_path, image_folder):
  config = tiny_config(f"folder:{image_folder}")
  imagenet = torchvision_resnet("resnet18", width=4, cifar_stem=False, classes=10)
  safetensors.numpy.save_file(imagenet, str(tmp_path / "in.safetensors"))
  with pytest.raises(errors.ConfigError) as e:
    import_weights.import_weights(config, str(tmp_path / "a"), str(tmp_path / "in.safetensors"))
  assert _one_line(e).startswith(
      f"--weights '{tmp_path / 'in.safetensors'}' (the top level) does not fit config.model "
      "(backbone resnet18, cifar_stem True, width 4): conv1.weight is 7x7: an ImageNet "
      "stem")
  assert not os.path.exists(tmp_path / "a" / "checkpoints")

  r50 = torchvision_resnet("resnet50", width=4, cifar_stem=True, classes=10)
  save_torch_file({"model_state_dict": {f"backbone.{k}": v for k, v in r50.items()}},
                  tmp_path / "r50.pth")
  with pytest.raises(errors.ConfigError) as e:
    import_weights.import_weights(config, str(tmp_path / "b"), str(tmp_path / "r50.pth"))
  line = _one_line(e)
  assert "('model_state_dict', keys 'backbone.*')" in line
  assert "the file holds a resnet50, the model is a resnet18" in line
  assert "unexpected keys (" in line and "other shapes (" in line

  with pytest.raises(errors.ConfigError, match="needs --weights=PATH"):
    import_weights.import_weights(config, str(tmp_path / "c"), None)
  with pytest.raises(errors.ConfigError, match="does not exist"):
    import_weights.import_weights(config, str(tmp_path / "c"), str(tmp_path / "nope.pth"))


def test_a_workdir_with_checkpoints_is_not_overwritten(pretrained_workdir, tmp_path,
                                                       image_folder):
  os.symlink(pretrained_workdir / "checkpoints", tmp_path / "checkpoints")
  sd = torchvision_resnet("resnet18", width=4, cifar_stem=True, classes=10)
  save_torch_file(sd, tmp_path / "r18.pth")
  with pytest.raises(errors.ConfigError, match=r"already holds pretraining checkpoints "
                     r"\(steps \[2, 4\]\): import into a new --workdir"):
    import_weights.import_weights(tiny_config(f"folder:{image_folder}"), str(tmp_path),
                                  str(tmp_path / "r18.pth"))
