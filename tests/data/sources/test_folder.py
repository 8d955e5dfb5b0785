"""sources.folder: recursive and unlabelled image folders, local or under a gs:// URL."""
from corinfomax_jax.data import sources
from corinfomax_jax.data.sources import folder


def _png(path, colour):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)


def test_class_directories_are_read_recursively_in_relative_path_order(tmp_path):
  # The official Tiny ImageNet layout: train/<wnid>/images/<image>, plus a boxes file.
  for wnid in ("n02", "n01"):
    for name in ("images/b.png", "images/a.png", "z.png", "images/deeper/c.JPG"):
      _png(tmp_path / "train" / wnid / name, 10)
    (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("boxes\n")
  source = sources.get_source(f"folder:{tmp_path}", None, "train")
  assert source.class_names == ("n01", "n02") and not source.unlabelled
  described = [source.describe(i) for i in range(source.num_examples)]
  below = ["images/a.png", "images/b.png", "images/deeper/c.JPG", "z.png"]
  assert described == [str(tmp_path / "train" / w / f) for w in ("n01", "n02")
                       for f in below]
  _, labels = source.load_batch(tf_indices(range(8)))
  assert labels.numpy().tolist() == [0] * 4 + [1] * 4
  assert folder._images_below(str(tmp_path / "train" / "n01")) == (below, 1, 0)


def tf_indices(values):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.constant(list(values), tf.int64)


def test_an_unlabelled_folder_pretrains_and_refuses_evaluation(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import errors  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.modes import knn_eval  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.modes import linear_eval  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.modes import pretrain  # pylint: disable=g-import-not-at-top
  for split in ("train", "test"):
    for i in range(16):
      _png(tmp_path / "data" / split / f"{i:02d}.png", 16 * i)
  dataset = f"folder:{tmp_path / 'data'}"
  source = sources.get_source(dataset, None, "train")
  assert source.unlabelled and source.class_names == ("",)
  assert source.num_examples == 16
  _, labels = source.load_batch(tf_indices(range(16)))
  assert set(labels.numpy().tolist()) == {0}

  state = pretrain.train_and_evaluate(tiny_config(dataset, max_steps=1),
                                      str(tmp_path / "run"))
  assert int(state.step) == 1
  for run in (lambda c: pretrain.train_and_evaluate(c, str(tmp_path / "knn_monitor")),
              lambda c: knn_eval.knn_eval(c, str(tmp_path / "run")),
              lambda c: linear_eval.linear_eval(c, str(tmp_path / "run"))):
    config = tiny_config(dataset, max_steps=1)
    config.eval.knn_every_epochs = 1
    with pytest.raises(errors.ConfigError, match=r"split 'train' has no class "
                       r"directories: .* needs labels") as e:
      run(config)
    assert "\n" not in str(e.value)


def _same_tree_in_a_stand_in_bucket(tmp_path, monkeypatch, local):
  """`local` copied to gs://bucket/data on the GCS stand-in (tests/gcs_stand_in.py)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from gcs_stand_in import BucketFolders  # pylint: disable=g-import-not-at-top
  from gcs_stand_in import install_stand_in  # pylint: disable=g-import-not-at-top
  fs = BucketFolders(tmp_path / "store")
  shutil.copytree(local, fs.local("gs://bucket/data"))
  install_stand_in(monkeypatch, fs)
  return "gs://bucket/data"


def test_a_folder_under_a_gs_url_lists_and_reads_as_the_local_folder(tmp_path,
                                                                     monkeypatch):
  local = tmp_path / "local"
  for wnid in ("n02", "n01"):  # recursive class folders, as in the test above
    for name in ("images/b.png", "images/a.png", "z.png", "images/deeper/c.JPG"):
      _png(local / "train" / wnid / name, 10 + int(wnid[-1]))
    (local / "train" / wnid / f"{wnid}_boxes.txt").write_text("boxes\n")
  for i in range(3):  # an unlabelled split
    _png(local / "unlabelled" / f"{i}.png", 40 * i)
  url = _same_tree_in_a_stand_in_bucket(tmp_path, monkeypatch, local)
  assert folder._images_below(f"{url}/train/n01") == folder._images_below(
      str(local / "train" / "n01"))
  for split in ("train", "unlabelled"):
    mine = sources.get_source(f"folder:{local}", None, split)
    remote = sources.get_source(f"folder:{url}", None, split)
    assert (remote.class_names, remote.unlabelled) == (mine.class_names, mine.unlabelled)
    n = mine.num_examples
    assert remote.num_examples == n and n in (8, 3)
    described = [remote.describe(i) for i in range(n)]
    assert all(d.startswith(f"{url}/{split}/") for d in described)
    assert ([d[len(url):] for d in described]
            == [mine.describe(i)[len(str(local)):] for i in range(n)])
    assert remote.file_names() == mine.file_names()
    # Paths relative to the root, the same under a URL.
    assert remote.paths() == mine.paths()
    assert mine.paths()[0] == ("train/n01/images/a.png" if n == 8 else "unlabelled/0.png")
    paths, labels = remote.load_batch(tf_indices(range(n)))
    assert labels.numpy().tolist() == mine.load_batch(tf_indices(range(n)))[1].numpy().tolist()
    # The bytes come through epath (TensorFlow has no gs:// file system here).
    for i in range(n):
      assert remote.load_example(paths[i]).numpy() == (local / described[i][
          len(url) + 1:]).read_bytes()


def test_gs_folder_errors_are_one_line_naming_the_url(tmp_path, monkeypatch):
  import pytest  # pylint: disable=g-import-not-at-top
  local = tmp_path / "local"
  (local / "train").mkdir(parents=True)
  (local / "train" / "README").write_text("no images\n")
  url = _same_tree_in_a_stand_in_bucket(tmp_path, monkeypatch, local)
  for dataset, split, message in [
      (f"folder:{url}/nope", "train",
       r"^Image folder root 'gs://bucket/data/nope' does not exist; gs://bucket/data "
       r"holds: train\.$"),
      (f"folder:{url}", "test",
       r"^Image folder 'gs://bucket/data' has no split 'test'; splits found: \['train'\]"),
      (f"folder:{url}", "train",
       r"^Split 'gs://bucket/data/train' has no \.jpg/\.jpeg/\.png images .* it holds: "
       r"README\.")]:
    with pytest.raises(ValueError, match=message) as raised:
      sources.get_source(dataset, None, split)
    assert "\n" not in str(raised.value)


def test_an_image_removed_from_the_bucket_after_listing_is_named(tmp_path, monkeypatch):
  import os  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  local = tmp_path / "local"
  for i in range(4):
    _png(local / "train" / "a" / f"{i}.png", 50 * i)
  url = _same_tree_in_a_stand_in_bucket(tmp_path, monkeypatch, local)
  source = sources.get_source(f"folder:{url}", None, "train")
  os.remove(tmp_path / "store" / "bucket" / "data" / "train" / "a" / "2.png")
  batches = pipeline.eval_batches(source, pipeline.BatchSpec(4, 8, process_index=0,
                                                             process_count=1))
  with pytest.raises(ValueError, match=r"^Cannot read image gs://bucket/data/train/a/2\.png: "
                     r"FileNotFoundError") as raised:
    list(batches)
  assert "\n" not in str(raised.value)
