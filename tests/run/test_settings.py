"""Settings: the configuration resolved once into frozen sections; keys of earlier
versions moved to their place; refused values and old workdirs named in one message."""
import dataclasses
import re

from absl import flags
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from configs import default
from corinfomax_jax import errors
from corinfomax_jax import methods
from corinfomax_jax.eval import evaluators
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import command_line
from corinfomax_jax.run import settings


def test_flat_model_flags_move_under_config_model():
  argv = ["main.py", "--config=configs/cifar10.py", "--config.model=resnet50",
          "--config.width", "32", "--config.projector=4096-4096-128",
          "--config.cifar_stem=False", "--config.projector_bn=True",
          "--config.dtype=bfloat16", "--config.model.projector=4096-4096-128",
          "--config.alpha=10", "--config.corinfomax.alpha=10.0", "--workdir=w"]
  # CorInfoMax's flat keys now move too, to its section config.corinfomax.
  assert command_line.translate_moved_flags(argv) == [
      "main.py", "--config=configs/cifar10.py", "--config.model.backbone=resnet50",
      "--config.model.width=32", "--config.model.projector=(4096,4096,128,)",
      "--config.model.cifar_stem=False", "--config.model.projector_bn=True",
      "--config.model.dtype=bfloat16", "--config.model.projector=(4096,4096,128,)",
      "--config.corinfomax.alpha=10", "--config.corinfomax.alpha=10.0", "--workdir=w"]


def test_each_moved_flag_is_noted_for_the_log():
  notices = []
  command_line.translate_moved_flags(
      ["main.py", "--config.alpha=10", "--config.width", "8", "--config.seed=1"], notices)
  assert notices == ["--config.alpha is now --config.corinfomax.alpha.",
                     "--config.width is now --config.model.width."]


@pytest.mark.parametrize("argv,said", [
    (["--config.alpha=10", "--config.corinfomax.alpha=20"],
     "--config.alpha=10 and --config.corinfomax.alpha=20 set the same key"),
    (["--config.model.projector=64-8", "--config.projector", "128-8"],
     "--config.projector=128-8 and --config.model.projector=64-8 set the same key"),
    (["--config.eval.knn_k=(20,)", "--config.eval.knn.k=(200,)"],
     "(config.eval.knn.k, whose earlier name is config.eval.knn_k)"),
])
def test_an_old_and_a_new_flag_with_different_values_are_refused(argv, said):
  with pytest.raises(errors.ConfigError) as info:
    command_line.translate_moved_flags(["main.py", *argv])
  assert said in str(info.value) and "give it once" in str(info.value), str(info.value)


def test_flat_eval_flags_move_to_their_evaluator_sections():
  argv = ["main.py", "--config.eval.knn_k=(20,)", "--config.eval.knn_every_epochs", "2",
          "--config.eval.online_probe=True", "--config.eval.online_probe_lr=0.3",
          "--config.eval.linear_lr=0.5", "--config.eval.finetune_epochs=3",
          "--config.eval.label_fraction=0.01", "--config.eval.batch_size=8"]
  assert command_line.translate_moved_flags(argv) == [
      "main.py", "--config.eval.knn.k=(20,)", "--config.eval.knn.every_epochs=2",
      "--config.eval.online_probe.enabled=True", "--config.eval.online_probe.lr=0.3",
      "--config.eval.linear.lr=0.5", "--config.eval.finetune.epochs=3",
      "--config.eval.finetune.label_fraction=0.01", "--config.eval.batch_size=8"]


def test_unknown_override_names_the_closest_new_keys():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  assert "eval.knn.every_epochs" in command_line.dotted_keys(config)
  message = command_line.unknown_override(config, ["main.py", "--config.eval.knn.kk=5"])
  assert message == ("unknown config key config.eval.knn.kk (--config.eval.knn.kk=5): no "
                     "part of the library reads it; closest existing keys: "
                     "config.eval.knn.k.")
  # The one reporter: a config file's key that nothing reads gets the same line.
  config.eval.knn.kk = 5
  with pytest.raises(errors.ConfigError) as e:
    settings.resolve(config)
  assert str(e.value) == message.replace(" (--config.eval.knn.kk=5)", "")
  assert command_line.unknown_override(config, ["main.py", "--config.eval.knn.k=5"]) is None


def test_model_is_created_from_the_nested_keys():
  run = settings.resolve(tiny_config("cifar10"))
  model = run.model.create()
  backbone = model.backbone  # resnet18 at width 4, with the CIFAR stem
  assert (tuple(backbone.stage_sizes), backbone.num_filters, backbone.cifar_stem) == (
      (2, 2, 2, 2), 4, True)
  assert tuple(model.projector) == (32, 8)
  assert run.model.record()["projector"] == [32, 8]
  assert run.model.output_dim == 8


@pytest.mark.parametrize("key,value,message", [
    ("backbone", "vgg", "config.model.backbone = 'vgg'"),
    ("width", 0, "config.model.width = 0"),  # checked by the backbone's registry entry
    ("projector", (64, 0), "config.model.projector = (64, 0)"),
    ("dtype", "float16", "config.model.dtype = 'float16'")])
def test_each_model_key_is_checked_by_name(key, value, message):
  config = tiny_config("cifar10")
  config.model[key] = value
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    settings.resolve(config)


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


@pytest.mark.parametrize("key,value,name", [
    ("knn.k", (), "knn.k"), ("knn.k", (10, 0), "knn.k"),
    ("knn.temperature", (0.07, -1.0), "knn.temperature"),
    ("knn_k", (10, 0), "knn.k"),  # the flat key of earlier versions, named where it went
    ("knn.monitor_max_train_examples", 0, "knn.monitor_max_train_examples"),
    ("knn.monitor_max_test_examples", -2, "knn.monitor_max_test_examples"),
    ("embed_split", "", "embed_split")])
def test_eval_keys_are_checked_by_name(key, value, name):
  config = tiny_config("cifar10")
  section, _, leaf = key.rpartition(".")
  (config.eval[section] if section else config.eval)[leaf] = value
  with pytest.raises(errors.ConfigError, match=re.escape(f"config.eval.{name} = {value!r}")):
    settings.resolve(config)


def test_knn_k_and_temperature_take_one_value_or_several():
  config = tiny_config("cifar10")
  config.eval.knn.temperature = (0.07, 0.1)
  assert settings.resolve(config).eval.knn.temperatures == (0.07, 0.1)
  config.eval.knn.k = (200,)
  assert settings.resolve(config).eval.knn.ks == (200,)
  raw = config.to_dict()  # a ConfigDict keeps a tuple a tuple; a plain dict takes one
  raw["eval"]["knn"]["k"], raw["eval"]["knn"]["temperature"] = 20, 0.1
  run = settings.resolve(raw)
  assert (run.eval.knn.ks, run.eval.knn.temperatures) == ((20,), (0.1,))


# --------------------------------------------------------------------------- methods


def test_an_unknown_method_is_one_error_naming_the_methods():
  config = tiny_config("cifar10", method="simclr")
  with pytest.raises(errors.ConfigError) as e:
    settings.resolve(config)
  message = str(e.value)
  assert "config.method = 'simclr'" in message and "\n" not in message
  for name in methods.METHODS:
    assert repr(name) in message


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_each_method_resolves_to_its_own_object(method):
  run = settings.resolve(tiny_config("cifar10", method=method))
  assert run.method.name == method
  assert isinstance(run.method, methods.METHODS[method])


def test_a_key_of_an_inactive_method_is_refused_naming_it():
  config = tiny_config("cifar10")
  config.vicreg.sim_weight = 10.0
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.vicreg.sim_weight is set, but config.method = 'corinfomax'")) as e:
    settings.resolve(config)
  assert "\n" not in str(e.value)
  # The same key for the method that reads it is taken.
  config.method = "vicreg"
  assert settings.resolve(config).method.sim_weight == 10.0
  # And now CorInfoMax's section is the inactive one.
  config.corinfomax.alpha = 100.0
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.corinfomax.alpha is set, but config.method = 'vicreg'")):
    settings.resolve(config)


def test_a_method_value_out_of_range_names_its_section_key():
  with pytest.raises(errors.ConfigError, match=re.escape("config.corinfomax.la_R = 1.5")):
    settings.resolve(tiny_config("cifar10", la_R=1.5))


# --------------------------------------------------------------------------- old keys


def test_old_flat_keys_land_in_their_new_places():
  config = tiny_config("cifar10", alpha=100.0, width=8)
  config.eval.knn_k = (20,)
  config.eval.linear_lr = 0.5
  config.eval.online_probe_lr = 0.3
  config.eval.label_fraction = 0.01
  run = settings.resolve(config)
  assert run.method.alpha == 100.0 and run.model.kwargs["width"] == 8
  assert run.eval.knn.ks == (20,)
  assert run.eval.linear.lr == 0.5
  assert run.eval.online_probe.lr == 0.3
  assert run.eval.finetune.label_fraction == 0.01
  # The record (config.json) holds them in their new places only.
  record = run.record
  assert record["corinfomax"]["alpha"] == 100.0 and "alpha" not in record
  assert record["model"]["width"] == 8 and "width" not in record
  assert record["eval"]["knn"]["k"] == [20] and "knn_k" not in record["eval"]
  assert record["eval"]["linear"]["lr"] == 0.5 and "linear_lr" not in record["eval"]
  assert record["eval"]["finetune"]["label_fraction"] == 0.01


def test_the_old_online_probe_bool_becomes_the_enabled_key():
  # A config (or config.json record) of an earlier version: eval.online_probe a bool.
  moved = settings.moved_keys_applied(
      {"alpha": 10.0, "eval": {"online_probe": True, "online_probe_lr": 0.2, "knn_k": 20}})
  assert moved == {"corinfomax": {"alpha": 10.0},
                   "eval": {"online_probe": {"enabled": True, "lr": 0.2},
                            "knn": {"k": 20}}}
  # On the command line, as main.py reads it.
  argv = command_line.translate_moved_flags(
      ["main.py", "--config=configs/default.py", "--config.eval.online_probe=True",
       "--config.eval.monitors=('knn','online_probe')"])
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  run = settings.resolve(values.config)
  assert run.eval.online_probe.enabled is True
  assert run.eval.monitors == ("knn", "online_probe")


def test_an_old_key_given_with_its_new_one_keeps_the_old_value():
  config = tiny_config("cifar10", alpha=100.0)
  config.corinfomax.alpha = 5.0
  assert settings.resolve(config).method.alpha == 100.0  # as the command line does


# --------------------------------------------------------------------------- eval


def test_each_evaluator_has_its_own_cadence():
  config = tiny_config("cifar10")
  run = settings.resolve(config)
  assert run.eval.knn.every_epochs == 0 and run.eval.online_probe.every_epochs == 1
  config.eval.online_probe.enabled = True
  config.eval.monitors = ("knn", "online_probe")
  config.eval.knn.every_epochs = 2
  config.eval.online_probe.every_epochs = 3
  run = settings.resolve(config)
  assert (run.eval.knn.every_epochs, run.eval.online_probe.every_epochs) == (2, 3)
  made = evaluators.create_evaluators(run.eval, run.data, None, None, None, None)
  assert [(e.name, e.every_steps(10)) for e in made] == [("knn", 20), ("online_probe", 30)]
  # One cadence off leaves the other evaluator on.
  config.eval.knn.every_epochs = 0
  run = settings.resolve(config)
  made = evaluators.create_evaluators(run.eval, run.data, None, None, None, None)
  assert [(e.name, e.every_steps(10)) for e in made] == [("online_probe", 30)]
  # The flat key of earlier versions sets the kNN cadence alone.
  config.eval.knn_every_epochs = 1
  run = settings.resolve(config)
  assert (run.eval.knn.every_epochs, run.eval.online_probe.every_epochs) == (1, 3)
  # A cadence is a number of epochs, a fraction too (a plain dict: the defaults are ints,
  # which a ConfigDict will not turn into floats).
  raw = config.to_dict()
  raw["eval"]["online_probe"]["every_epochs"] = 0.5
  run = settings.resolve(raw)
  made = evaluators.create_evaluators(run.eval, run.data, None, None, None, None)
  assert [(e.name, e.every_steps(10)) for e in made] == [("knn", 10), ("online_probe", 5)]


@pytest.mark.parametrize("key,value", [("knn.every_epochs", -1),
                                       ("online_probe.every_epochs", -2)])
def test_each_cadence_is_checked_by_name(key, value):
  config = tiny_config("cifar10")
  section, leaf = key.split(".")
  config.eval[section][leaf] = value
  with pytest.raises(errors.ConfigError, match=re.escape(f"config.eval.{key} = {value!r}")):
    settings.resolve(config)


@pytest.mark.parametrize("key,value", [
    ("schedule", "linear"), ("step_epochs", 0), ("backbone_step_factor", 0.0),
    ("head_step_factor", 2.0), ("head_init", "lecun_normal"),
    ("crop_interpolation", "nearest"), ("momentum", 1.0), ("evaluate_every_epoch", 1),
    # A folder of its own in the workdir: not a path, nor a folder other modes write.
    ("subdir", ""), ("subdir", "a/b"), ("subdir", ".."), ("subdir", "checkpoints"),
    ("subdir", "linear_eval")])
def test_each_finetune_protocol_key_is_checked_by_name(key, value):
  raw = tiny_config("cifar10").to_dict()  # a plain dict takes any type
  raw["eval"]["finetune"][key] = value
  with pytest.raises(errors.ConfigError,
                     match=re.escape(f"config.eval.finetune.{key} = {value!r}")):
    settings.resolve(raw)


def test_settings_sections_are_frozen():
  run = settings.resolve(tiny_config("cifar10"))
  for section, field in ((run, "seed"), (run.train, "batch_size"),
                         (run.optimizer, "learning_rate"), (run.data, "image_size"),
                         (run.model, "kwargs"), (run.eval, "batch_size"),
                         (run.eval.knn, "every_epochs"),
                         (run.eval.online_probe, "enabled"), (run.eval.linear, "lr"),
                         (run.eval.finetune, "epochs"), (run.method, "alpha")):
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(section, field, getattr(section, field))


@pytest.mark.parametrize("where, key, closest", [
    ("", "alphaa", "config.corinfomax.alpha"),
    ("eval.knn", "kk", "config.eval.knn.k"),
    ("eval", "knn_evry_epochs", "config.eval.knn.every_epochs"),
])
def test_a_key_nothing_reads_is_refused_naming_the_closest(where, key, closest):
  config = default.get_config()
  section = config
  for part in filter(None, where.split(".")):
    section = section[part]
  section[key] = 1  # a config file may add keys: nothing would read this one
  path = f"{where}.{key}" if where else key
  with pytest.raises(errors.ConfigError,
                     match=rf"unknown config key config\.{re.escape(path)}: no part of the "
                           rf"library reads it; closest existing keys: .*"
                           rf"{re.escape(closest)}"):
    settings.resolve(config)


@pytest.mark.parametrize("dataset", ["folder:", "folder: "])
def test_a_folder_dataset_without_a_root_is_refused(dataset):
  with pytest.raises(errors.ConfigError, match="config.dataset = .folder: ?. names no "
                                               "image folder: give its path, --config.dataset="
                                               "folder:/data/my_images or"):
    settings.resolve(tiny_config(dataset))


# --------------------------------------------------------------------------- sections


def _section_keys(config, prefix=""):
  """The dotted keys of a ConfigDict's sections and leaves, as resolve's known_keys
  lists them (by section), leaving out the keys other registries check."""
  out = {}
  for key, value in config.items():
    out.setdefault(prefix.rstrip("."), set()).add(key)
    if hasattr(value, "items") and key not in ("model", "aug"):
      out.update(_section_keys(value, f"{prefix}{key}."))
  return out


def test_the_known_keys_are_the_defaults_keys():
  """The keys resolve reads come from the sections' fields (and the methods'): they are
  exactly configs/default.py's, so a key is its default plus one field."""
  assert settings.known_keys() == _section_keys(default.get_config())


def test_every_moved_key_lands_on_a_key_that_is_read():
  known = settings.known_keys()
  for old, new in settings.MOVED_KEYS.items():
    section, _, leaf = new.rpartition(".")
    # config.model's keys are the backbone registry's (width, cifar_stem: a ResNet's).
    assert section == "model" or leaf in known[section], (old, new)
    assert settings.moved_key(old) == new and settings.moved_key(new) == new


def test_the_monitors_are_the_eval_fields_typed_monitor():
  assert settings.EVAL_SECTIONS == {"knn": settings.Knn,
                                    "online_probe": settings.OnlineProbe}
  assert settings.EVALUATORS == ("knn", "online_probe")
  config = tiny_config("cifar10")
  config.eval.monitors = ("knn", "linear")
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.eval.monitors = ('knn', 'linear') is invalid: expected a tuple of "
      "evaluator names from ['knn', 'online_probe']")):
    settings.resolve(config)


def test_a_section_checks_itself_however_it_is_made():
  run = settings.resolve(tiny_config("cifar10"))
  with pytest.raises(errors.ConfigError,
                     match=re.escape("config.eval.linear.lr = 0.0 is invalid")):
    dataclasses.replace(run.eval.linear, lr=0.0)
  with pytest.raises(errors.ConfigError, match=re.escape("config.eval.knn.k = 0 is")):
    settings.Knn(**{**dataclasses.asdict(run.eval.knn), "ks": 0})
  # The field whose key has another name: one k is a tuple of one, as from a config.
  assert dataclasses.replace(run.eval.knn, ks=20).ks == (20,)
  with pytest.raises(errors.ConfigError, match=re.escape("config.optimizer = 'adam'")):
    dataclasses.replace(run.optimizer, name="adam")


def test_a_key_a_method_lacks_is_named_with_the_closest():
  config = tiny_config("cifar10")
  config.corinfomax.alphaa = 1.0
  with pytest.raises(errors.ConfigError, match=re.escape(
      "unknown config key config.corinfomax.alphaa: no part of the library reads it; "
      "closest existing keys: config.corinfomax.alpha.")):
    settings.resolve(config)
