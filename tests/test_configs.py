"""configs/: every file resolves (settings.resolve), and every key can be set on the
command line."""
import pathlib

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags
import pytest

from corinfomax_jax.run import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.py")
                      if p.name != "__init__.py")


def _parse(name, *overrides):
  """The config of configs/<name> after `--config.<key>=<value>` flags, as main.py parses."""
  argv = ["main.py", f"--config={ROOT / 'configs' / name}", *overrides]
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
  from corinfomax_jax.data import augment  # pylint: disable=g-import-not-at-top
  cifar100 = settings.resolve(_parse("cifar100.py")).data
  # The paper's recipe with CIFAR-100's statistics.
  assert cifar100.recipe == augment.default_aug_config("cifar100")
  assert cifar100.mean == tuple(augment.normalization_stats("cifar100")[0])
  cpu = settings.resolve(_parse("cifar10_cpu.py", "--config.dataset=folder:/anywhere")).data
  assert cpu.mean == tuple(augment.normalization_stats("cifar10")[0])  # a folder of CIFAR


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
