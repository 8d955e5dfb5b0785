"""The labelled subsets of a split (a class-balanced fraction, or named files)."""
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from corinfomax_jax import errors
from corinfomax_jax.data import sources
from corinfomax_jax.eval import features


def test_the_labelled_subset_is_class_balanced_seeded_or_named(image_folder, tmp_path,
                                                               caplog):
  source = sources.get_source(f"folder:{image_folder}", None, "train")  # 2 x 12, by class
  index = features.labelled_index(source, fraction=0.25, label_file=None, seed=0)
  assert len(index) == 6 and np.all(np.diff(index) > 0)
  np.testing.assert_array_equal(np.bincount(index // 12), [3, 3])
  np.testing.assert_array_equal(
      index, features.labelled_index(source, fraction=0.25, label_file=None, seed=0))
  assert not np.array_equal(
      index, features.labelled_index(source, fraction=0.25, label_file=None, seed=1))
  assert len(features.labelled_index(source, fraction=0.01, label_file=None, seed=0)) == 2
  names = tmp_path / "subset.txt"
  names.write_text("3.png\n10.png\n")  # in both class directories
  with caplog.at_level("WARNING"):
    index = features.labelled_index(source, fraction=1.0, label_file=str(names), seed=0)
  assert [os.path.basename(source.describe(i)) for i in index] == ["10.png", "3.png"] * 2
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "2 of its 2 names each match several images" in (
      warnings[0]) and "4 examples are labelled for 2 names" in warnings[0], warnings
  names.write_text("3.png\nnot_there.png\n")
  with pytest.raises(errors.ConfigError, match="1 of its 2 names"):
    features.labelled_index(source, fraction=1.0, label_file=str(names), seed=0)


class CorinfomaxNamedImages(tfds.core.GeneratorBasedBuilder):
  """Record i: image file name f"img_{i}.JPEG" (as imagenet2012's file_name), label i % 2."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b"]),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 4, 3), i, np.uint8), "label": i % 2,
                "file_name": f"img_{i}.JPEG"}


def test_a_label_file_selects_tfds_records_by_their_file_name_feature(tmp_path):
  CorinfomaxNamedImages(data_dir=str(tmp_path / "tfds"),
                        file_format="array_record").download_and_prepare()
  source = sources.get_source("corinfomax_named_images", str(tmp_path / "tfds"), "train")
  names = tmp_path / "subset.txt"
  names.write_text("img_4.JPEG\nimg_1.JPEG\n")
  index = features.labelled_index(source, fraction=1.0, label_file=str(names), seed=0)
  # The record order of a prepared split is TFDS's (shuffled by key), so compare names.
  assert sorted(source.file_names()[i] for i in index) == ["img_1.JPEG", "img_4.JPEG"]
  assert source.paths() == source.file_names()  # what --mode=embed writes as paths
  labels = source.load_batch(tf.constant(index))[1].numpy()
  assert sorted(labels.tolist()) == [0, 1]  # img_4 is class 0, img_1 class 1


def test_a_label_file_on_a_source_without_file_names_fails_in_one_line(tmp_path):
  with tfds.testing.mock_data(num_examples=4):  # cifar10's records have no file names
    source = sources.get_source("cifar10", None, "train")
  names = tmp_path / "subset.txt"
  names.write_text("3.png\n")
  with pytest.raises(errors.ConfigError, match="needs file names"):
    features.labelled_index(source, fraction=1.0, label_file=str(names), seed=0)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_label_file_is_named_as_empty(text, image_folder, tmp_path):
  source = sources.get_source(f"folder:{image_folder}", None, "train")
  names = tmp_path / "subset.txt"
  names.write_text(text)
  with pytest.raises(errors.ConfigError, match=re.escape(f"{str(names)!r} is empty")) as e:
    features.labelled_index(source, fraction=1.0, label_file=str(names), seed=0)
  assert "\n" not in str(e.value) and "0 of its 0" not in str(e.value)
