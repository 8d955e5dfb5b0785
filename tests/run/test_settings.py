"""Configuration: the nested model keys, the old flat names, and refused old workdirs."""
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from corinfomax_jax.run import configuration
from corinfomax_jax import errors
from corinfomax_jax import models
from corinfomax_jax.modes import pretrain


def test_flat_model_flags_move_under_config_model():
  argv = ["main.py", "--config=configs/cifar10.py", "--config.model=resnet50",
          "--config.width", "32", "--config.projector=4096-4096-128",
          "--config.cifar_stem=False", "--config.projector_bn=True",
          "--config.dtype=bfloat16", "--config.model.projector=64-8",
          "--config.alpha=10", "--workdir=w"]
  assert configuration.translate_moved_flags(argv) == [
      "main.py", "--config=configs/cifar10.py", "--config.model.backbone=resnet50",
      "--config.model.width=32", "--config.model.projector=(4096,4096,128,)",
      "--config.model.cifar_stem=False", "--config.model.projector_bn=True",
      "--config.model.dtype=bfloat16", "--config.model.projector=(64,8,)",
      "--config.alpha=10", "--workdir=w"]


def test_model_is_created_from_the_nested_keys():
  config = tiny_config("cifar10")
  model = models.create_model(**config.model)
  assert (model.backbone_name, model.width, model.projector) == ("resnet18", 4, (32, 8))
  assert configuration.model_record(config)["projector"] == [32, 8]


@pytest.mark.parametrize("key,value", [("backbone", "vgg"), ("width", 0),
                                       ("projector", (64, 0)), ("dtype", "float16")])
def test_each_model_key_is_checked_by_name(key, value):
  config = tiny_config("cifar10")
  config.model[key] = value
  with pytest.raises(errors.ConfigError, match=re.escape(f"config.model.{key} = {value!r}")):
    configuration.validate_config(config)


def test_an_old_layout_workdir_is_refused_in_one_message(image_folder, tmp_path):
  # A checkpoint as earlier versions wrote it: no "format" in its record.
  manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "run"))
  manager.save(2, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": np.int32(2)}),
      run=ocp.args.JsonSave({"config": {"model": "resnet18"}})))
  manager.wait_until_finished()
  manager.close()
  config = tiny_config(f"folder:{image_folder}", max_steps=2)
  with pytest.raises(errors.ConfigError,
                     match=f"{re.escape(str(tmp_path))}.*older version.*new --workdir"):
    pretrain.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "checkpoints" / "2").is_dir()  # left as it was


@pytest.mark.parametrize("key,value", [("knn_k", ()), ("knn_k", (10, 0)),
                                       ("knn_temperature", (0.07, -1.0)),
                                       ("embed_split", "")])
def test_eval_keys_are_checked_by_name(key, value):
  config = tiny_config("cifar10")
  config.eval[key] = value
  with pytest.raises(errors.ConfigError, match=re.escape(f"config.eval.{key} = {value!r}")):
    configuration.validate_config(config)


def test_knn_k_and_temperature_take_one_value_or_several():
  config = tiny_config("cifar10")
  config.eval.knn_temperature = (0.07, 0.1)
  configuration.validate_config(config)
  config.eval.knn_k = (200,)
  configuration.validate_config(config)
