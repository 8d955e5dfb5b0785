"""The augmentation recipe: the paper's numbers, overrides, checks, per-view settings."""
import dataclasses

import pytest

from corinfomax_jax.data import recipe


def test_normalization_stats_and_default_config():
  assert recipe.normalization_stats("cifar10") == ((0.4914, 0.4822, 0.4465),
                                              (0.247, 0.243, 0.261))
  assert recipe.normalization_stats("cifar100") == ((0.5071, 0.4865, 0.4409),
                                               (0.2673, 0.2564, 0.2762))
  imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  for name in ("imagenet2012", "imagenet100", "folder:/x/cifar10"):
    assert recipe.normalization_stats(name) == imagenet
  assert recipe.default_aug_config("cifar100")["std"] == (0.2673, 0.2564, 0.2762)


def test_view_override_and_config_checks():
  config = recipe.paper_config((0.5,) * 3, (0.25,) * 3)
  assert config["crop_scale"] == (0.08, 1.0)
  assert (config["brightness"], config["contrast"], config["saturation"],
          config["hue"], config["jitter_p"], config["grayscale_p"]) == (
              0.4, 0.4, 0.2, 0.1, 0.8, 0.2)
  recipe.check_config(config)
  config["view2"] = dict(config["view2"], crop_scale=(0.2, 1.0))
  assert recipe.view_config(config, "view2").crop_scale == (0.2, 1.0)
  assert recipe.view_config(config, "view1").crop_scale == (0.08, 1.0)
  bad = dict(config, view1=dict(blur_p=1.5))
  with pytest.raises(ValueError, match=r"view1\.blur_p=1\.5"):
    recipe.check_config(bad)
  with pytest.raises(ValueError, match="unknown keys.*blur_q"):
    recipe.view_config(dict(config, view1=dict(blur_q=1.0)), "view1")
  with pytest.raises(ValueError, match="crop_scale"):
    recipe.check_config(dict(config, crop_scale=(0.5, 0.1)))


def test_with_overrides_merges_views_and_rejects_unknown_keys():
  config = recipe.paper_config((0.5,) * 3, (0.25,) * 3)
  merged = recipe.with_overrides(config, {"hue": 0.05,
                                          "view2": {"solarize_p": 0.5}})
  assert merged["hue"] == 0.05
  assert merged["view2"] == {"blur_p": 0.1, "solarize_p": 0.5}
  assert config["hue"] == 0.1 and config["view2"]["solarize_p"] == 0.2
  assert recipe.with_overrides(config, None) == config
  with pytest.raises(ValueError, match="Unknown augmentation key 'hu'"):
    recipe.with_overrides(config, {"hu": 0.05})


def test_views_are_each_views_settings_and_the_keys_are_the_fields():
  config = recipe.paper_config((0.5,) * 3, (0.25,) * 3)
  config["probe"] = dict(config["probe"], flip_p=0.0)
  settings = recipe.views(config)
  assert settings == recipe.Views(*(recipe.view_config(config, name)
                                    for name in ("view1", "view2", "probe")), 8 / 7)
  assert (settings.view1.blur_p, settings.view2.blur_p) == (1.0, 0.1)
  assert (settings.probe.flip_p, settings.view1.flip_p) == (0.0, 0.5)
  fields = [f.name for f in dataclasses.fields(recipe.ViewSettings)]
  assert list(recipe.VIEW_KEYS) == fields
  assert list(recipe.DEVICE_KEYS) == fields[3:]  # all but crop_scale, crop_ratio, flip_p
