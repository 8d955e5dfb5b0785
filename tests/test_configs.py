"""configs/: every file resolves (settings.resolve), and every key can be set on the
command line."""
import json
import pathlib

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags
import pytest

from corinfomax_jax import errors
from corinfomax_jax.run import command_line
from corinfomax_jax.run import run_record
from corinfomax_jax.run import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.py")
                      if p.name != "__init__.py")
# The files that need an argument: a workdir's record (here one of an earlier version),
# an image folder.
CONFIG_ARGS = {"run_record.py": str(ROOT / "tests/e2e/data/workdir_0.1.0/config.json"),
               "folder.py": "/data/my_images"}


def _parse(name, *overrides):
  """The config of configs/<name> after `--config.<key>=<value>` flags, as main.py parses;
  a file that needs an argument gets CONFIG_ARGS' unless `name` gives one (semi1 or
  semi10 after it)."""
  file, _, arg = name.partition(":")
  if file in CONFIG_ARGS and arg in ("", "semi1", "semi10"):
    name = ":".join([file, CONFIG_ARGS[file]] + ([arg] if arg else []))
  argv = ["main.py", f"--config={ROOT / 'configs'}/{name}", *overrides]  # a URL keeps its //
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def _leaves(config, prefix=""):
  for key, value in config.items(preserve_field_references=True):
    if isinstance(value, config_dict.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _flag_value(value):
  return value if isinstance(value, str) else repr(value)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_resolves(name):
  config = _parse(name)
  run = settings.resolve(config)
  assert run.method.name == config.method
  assert run.data.dataset == config.dataset and run.train.batch_size == config.batch_size
  assert run.record["model"]["projector"] == list(config.model.projector)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_no_key_is_a_plain_none(name):
  plain_none = [k for k, v in _leaves(_parse(name)) if v is None]
  assert not plain_none, f"{name}: use config_dict.placeholder(type) for {plain_none}"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_key_overrides_on_the_command_line(name):
  config = _parse(name)
  leaves = dict(_leaves(config))
  unset = {"data_dir": "/tmp/tfds", "aug.mean": "(0.5,0.5,0.5)", "aug.std": "(0.2,0.2,0.2)",
           "eval.embed_split": "validation",
           "eval.finetune.label_file": "/tmp/labels.txt"}
  flags_ = []
  for key, value in leaves.items():
    if isinstance(value, config_dict.FieldReference):
      value = value.get()
    flags_.append(f"--config.{key}={unset[key] if value is None else _flag_value(value)}")
  parsed = dict(_leaves(_parse(name, *flags_)))
  assert parsed.keys() == leaves.keys()
  for key, old in leaves.items():
    if isinstance(old, config_dict.FieldReference):
      old = old.get()
    expected = old if old is not None else _parse(name, f"--config.{key}={unset[key]}")
    if old is None:
      expected = dict(_leaves(expected))[key]
      assert expected is not None, key
    assert parsed[key] == expected, key


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_data_dir_and_augmentation_numbers_override(name):
  config = _parse(name, "--config.data_dir=/data/tfds", "--config.aug.view2.solarize_p=0.3",
                  "--config.aug.crop_scale=(0.2,1.0)")
  assert config.data_dir == "/data/tfds"
  run = settings.resolve(config)
  assert run.data.data_dir == "/data/tfds"
  recipe = run.data.recipe
  assert recipe["view2"] == {**_parse(name).aug.view2.to_dict(), "solarize_p": 0.3}
  assert tuple(recipe["crop_scale"]) == (0.2, 1.0)


def test_aug_leaves_the_data_set_statistics_unless_set():
  from corinfomax_jax.data import recipe  # pylint: disable=g-import-not-at-top
  cifar100 = settings.resolve(_parse("cifar100.py")).data
  # The paper's recipe with CIFAR-100's statistics.
  assert cifar100.recipe == recipe.default_aug_config("cifar100")
  assert cifar100.mean == tuple(recipe.normalization_stats("cifar100")[0])
  cpu = settings.resolve(_parse("cifar10_cpu.py", "--config.dataset=folder:/anywhere")).data
  assert cpu.mean == tuple(recipe.normalization_stats("cifar10")[0])  # a folder of CIFAR


def test_cifar10_cpu_reads_the_folder_beside_the_checkout_when_there(tmp_path, monkeypatch,
                                                                    caplog):
  import logging  # pylint: disable=g-import-not-at-top
  from configs import cifar10_cpu  # pylint: disable=g-import-not-at-top
  assert pathlib.Path(cifar10_cpu.BESIDE_CHECKOUT) == ROOT.parent / "shared/data/cifar10"
  folder = tmp_path / "cifar10"
  monkeypatch.setattr(cifar10_cpu, "BESIDE_CHECKOUT", str(folder))
  monkeypatch.chdir(tmp_path)  # the working directory plays no part
  with caplog.at_level(logging.INFO):
    assert cifar10_cpu.get_config().dataset == "cifar10"
  assert "using TFDS cifar10" in caplog.text
  folder.mkdir()
  caplog.clear()
  with caplog.at_level(logging.INFO):
    config = cifar10_cpu.get_config()
  assert config.dataset == f"folder:{folder}"
  assert f"reading the CIFAR-10 folder {folder}" in caplog.text
  assert settings.resolve(config).data.dataset == f"folder:{folder}"


@pytest.mark.parametrize("arg,percent,head_lr", [("semi1", 1, 10.0), ("semi10", 10, 20.0)])
def test_imagenet1k_takes_the_papers_semi_supervised_protocol_as_an_argument(
    arg, percent, head_lr):
  ft = settings.resolve(_parse(f"imagenet1k.py:{arg}")).eval.finetune
  assert (ft.label_file, ft.label_fraction, ft.head_lr, ft.backbone_lr) == (
      f"{percent}percent.txt", percent / 100, head_lr, 0.005)
  assert (ft.epochs, ft.batch_size, ft.weight_decay, ft.schedule, ft.head_init,
          ft.crop_interpolation, ft.evaluate_every_epoch) == (
              20, 256, 0.0, "step", "normal", "bilinear", True)
  plain = settings.resolve(_parse("imagenet1k.py")).eval.finetune
  assert (plain.schedule, plain.head_init, plain.crop_interpolation) == (
      "cosine", "zeros", "bicubic")


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if n != "run_record.py"])
@pytest.mark.parametrize("arg,percent", [("semi1", 1), ("semi10", 10)])
def test_every_config_takes_semi1_and_semi10(name, arg, percent):
  plain = settings.resolve(_parse(name))
  ft = settings.resolve(_parse(f"{name}:{arg}")).eval.finetune
  # SimCLR's lists name ImageNet-1K's images: elsewhere a class-balanced fraction.
  lists = plain.data.dataset == "imagenet2012"
  assert (ft.label_file, ft.label_fraction) == (
      f"{percent}percent.txt" if lists else None, percent / 100)
  assert (ft.subdir, plain.eval.finetune.subdir) == (f"finetune_{arg}", "finetune")
  assert (ft.epochs, ft.schedule, ft.evaluate_every_epoch) == (20, "step", True)
  # The argument changes the fine-tuning only.
  changed = {k for k, v in run_record.flatten(settings.resolve(_parse(f"{name}:{arg}")).record)
             .items() if run_record.flatten(plain.record)[k] != v}
  assert changed and all(k.startswith("eval.finetune.") for k in changed), changed


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if n.startswith("imagenet")])
def test_imagenet_configs_monitor_knn_on_a_subsampled_bank(name):
  run = settings.resolve(_parse(name))
  knn = run.eval.knn
  assert "knn" in run.eval.monitors and 0 < knn.every_epochs <= 20
  assert (knn.monitor_max_train_examples, knn.monitor_max_test_examples) == (10000, 5000)
  assert knn.max_train_examples == -1  # --mode=knn_eval: the whole train split


def test_a_workdirs_record_reads_back_as_the_configuration_that_wrote_it(tmp_path):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config("folder:/data/x", seed=3)
  config.eval.knn.k = (5, 7)
  config.aug.view2.solarize_p = 0.3
  record = settings.resolve(config).record
  (tmp_path / "config.json").write_text(json.dumps(record))
  argv = command_line.record_config_flag(
      ["main.py", f"--config={tmp_path}/config.json", "--config.eval.batch_size=8"],
      str(ROOT / "configs" / "run_record.py"))
  assert argv[1] == f"--config={ROOT / 'configs' / 'run_record.py'}:{tmp_path}/config.json"
  for given in (["--config", f"{tmp_path}/config.json.2"],
                ["--config=configs/folder.py:/data/x.json"], ["--config=configs/x.py"]):
    # An earlier generation, as two arguments; a config file's own argument; a file.
    translated = command_line.record_config_flag(["main.py", *given], "R.py")
    assert translated[1:] == (["--config", f"R.py:{tmp_path}/config.json.2"]
                              if given[0] == "--config" else given)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  assert settings.resolve(values.config).record == {
      **record, "eval": {**record["eval"], "batch_size": 8}}
  assert values.config.eval.knn.k == (5, 7)  # tuples, as config files write them


def test_the_folder_config_takes_the_folder_as_its_argument_or_says_how_to_give_it():
  run = settings.resolve(_parse("folder.py:/data/my_images:semi10"))
  assert (run.data.dataset, run.data.image_size, run.model.kwargs["backbone"]) == (
      "folder:/data/my_images", 224, "resnet18")
  assert (run.eval.finetune.subdir, run.eval.finetune.label_fraction) == (
      "finetune_semi10", 0.1)
  assert run.eval.knn.every_epochs == 0  # the monitor needs classes: off
  assert settings.resolve(_parse("folder.py:gs://bucket/images")).data.dataset == (
      "folder:gs://bucket/images")
  values = flags.FlagValues()
  argv = ["main.py", f"--config={ROOT / 'configs' / 'folder.py'}"]
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  with pytest.raises(errors.ConfigError) as e:
    settings.resolve(values.config)
  assert str(e.value) == (
      "config.dataset = 'folder:' names no image folder: give its path, "
      "--config.dataset=folder:/data/my_images or, with configs/folder.py, "
      "--config=configs/folder.py:/data/my_images (root/<split>/<class>/<image>)")
  values.config.dataset = "folder:/data/x"  # --config.dataset=folder:/data/x
  assert settings.resolve(values.config).data.dataset == "folder:/data/x"


def test_an_unknown_config_argument_is_one_error_line_naming_it():
  from configs import imagenet100  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError) as e:
    imagenet100.get_config("semi5")
  assert str(e.value) == (
      "the config file argument 'semi5' is not known: accepted 'semi1' or 'semi10' "
      "(fine-tuning on 1% or 10% of the labels), or none, e.g. "
      "--config=configs/imagenet100.py:semi1")


@pytest.mark.parametrize("name,crop_min,blur,solarize,epochs", [
    ("cifar10_vicreg_published.py", 0.2, (0.0, 0.0), (0.1, 0.1), 1000),
    ("imagenet100_vicreg_published.py", 0.2, (0.5, 0.5), (0.1, 0.1), 400),
    ("cifar10_barlow_twins_published.py", 0.08, (0.0, 0.0), (0.0, 0.2), 1000),
    ("imagenet100_barlow_twins_published.py", 0.08, (1.0, 0.1), (0.0, 0.2), 400),
])
def test_published_recipes_take_the_published_run_whole(name, crop_min, blur, solarize,
                                                        epochs):
  run = settings.resolve(_parse(name))
  recipe = run.data.recipe
  assert recipe["crop_scale"][0] == crop_min
  assert (recipe["view1"]["blur_p"], recipe["view2"]["blur_p"]) == blur
  assert (recipe["view1"]["solarize_p"], recipe["view2"]["solarize_p"]) == solarize
  opt = run.optimizer
  assert (opt.name, opt.batch_size, opt.num_epochs, opt.warmup_epochs) == ("lars", 256,
                                                                          epochs, 10.0)
  assert (opt.learning_rate * opt.batch_size / opt.base_batch_size, opt.warmup_start_lr,
          opt.min_learning_rate, opt.weight_decay, opt.lars_eta) == (0.3, 3e-5, 0.0, 1e-4,
                                                                     0.02)
  # The like-for-like recipe keeps the base config's views, batch and schedule.
  like = settings.resolve(_parse(name.replace("_published", "")))
  base = settings.resolve(_parse(name.split("_")[0] + ".py"))
  assert like.data.recipe == base.data.recipe
  assert (like.optimizer.batch_size, like.optimizer.num_epochs) == (
      base.optimizer.batch_size, base.optimizer.num_epochs)


def test_the_cpu_budget_keeps_its_steps_under_a_published_recipe():
  for method in ("vicreg", "barlow_twins"):
    published = settings.resolve(_parse(f"cifar10_cpu_{method}_published.py"))
    budget = settings.resolve(_parse("cifar10_cpu.py"))
    assert (published.optimizer.num_epochs, published.optimizer.warmup_epochs,
            published.optimizer.batch_size) == (budget.optimizer.num_epochs,
                                                budget.optimizer.warmup_epochs, 256)
    assert published.method.name == method and published.optimizer.name == "lars"


def test_an_unknown_published_run_is_refused():
  from configs import default, recipes  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="own='stl10'"):
    recipes.vicreg(default.get_config(), own="stl10")


@pytest.mark.parametrize("name", ["imagenet100_vit_s16.py", "imagenet100_vit_b16.py"])
def test_the_imagenet100_vits_take_another_method_as_an_argument(name):
  run = settings.resolve(_parse(f"{name}:vicreg"))
  assert run.method.name == "vicreg" and run.optimizer.name == "adamw"
  assert run.record["corinfomax"]["alpha"] == 250.0  # back at its default, unread
  assert settings.resolve(_parse(name)).method.alpha == 500.0


@pytest.mark.parametrize("name", ["cifar10_vit_ti4.py", "cifar10_cpu_vit_ti4.py"])
def test_the_cifar_vits_take_another_method_on_the_command_line(name):
  run = settings.resolve(_parse(name, "--config.method=barlow_twins"))
  assert run.method.name == "barlow_twins" and run.model.kwargs["patch_size"] == 4
