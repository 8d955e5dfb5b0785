"""Tests of corinfomax_jax.input_pipeline: tiny image folders, mocked TFDS."""
import inspect
import logging
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from corinfomax_jax.data import augment
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax import errors
from corinfomax_jax.data import pipeline
from corinfomax_jax.data import recipe
from corinfomax_jax.data import sources

NUM_UNIQUE = 10  # examples of the `unique` folder


def _texture(height, width, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, size=(1, 4, 4, 3)).astype(np.float32)
  image = tf.image.resize(small, [height, width], method="bilinear")[0]
  return np.round(image.numpy()).astype(np.uint8)


@pytest.fixture(scope="module")
def unique(tmp_path_factory):
  """NUM_UNIQUE classes of one identical image each: label == index, and any
  difference between two outputs comes from augmentation."""
  root = tmp_path_factory.mktemp("unique")
  image = Image.fromarray(_texture(20, 24))
  for i in range(NUM_UNIQUE):
    os.makedirs(root / "train" / f"c{i:02d}")
    image.save(root / "train" / f"c{i:02d}" / "x.png")
  return sources.get_source(f"folder:{root}", None, "train")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """Classes in unsorted creation order, images of every mode and size."""
  root = tmp_path_factory.mktemp("mixed")
  rgb = _texture(18, 26, seed=1)
  images = {
      "b_dog/1.jpg": Image.fromarray(rgb),
      "b_dog/2.JPEG": Image.fromarray(_texture(30, 12, seed=2)),
      "a_cat/gray.png": Image.fromarray(rgb[..., 0]),  # mode L
      "a_cat/rgba.png": Image.fromarray(
          np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])),
      "a_cat/palette.png": Image.fromarray(rgb).convert("P"),
      "c_eel/la.png": Image.fromarray(rgb).convert("LA"),
  }
  for name, image in images.items():
    os.makedirs(root / "train" / os.path.dirname(name), exist_ok=True)
    image.save(root / "train" / name)
  (root / "train" / "a_cat" / "notes.txt").write_text("not an image")
  os.makedirs(root / "test" / "a_cat")
  Image.fromarray(rgb).save(root / "test" / "a_cat" / "1.png")
  os.makedirs(root / "empty" / "a_cat")
  return root


def _bad_folder(root):
  os.makedirs(root / "train" / "a", exist_ok=True)
  os.makedirs(root / "train" / "b", exist_ok=True)
  for i in range(3):
    Image.fromarray(_texture(16, 16, seed=i)).save(root / "train" / "a" /
                                                   f"{i}.png")
  (root / "train" / "b" / "bad.jpg").write_bytes(b"\xff\xd8 truncated junk")
  return f"folder:{root}"


def _spec(global_batch_size, image_size, seed=0, process_index=0, process_count=1):
  return pipeline.BatchSpec(global_batch_size, image_size, seed, process_index,
                            process_count)


def _global(make, process_count, steps):
  """Per-step global batches: the P per-process batches concatenated."""
  iterators = [make(p, process_count) for p in range(process_count)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in iterators]
    out.append({k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
  return out


# ---------------------------------------------------------------- sources


def test_folder_labels_from_sorted_class_names(mixed):
  source = sources.get_source(f"folder:{mixed}", None, "train")
  assert source.class_names == ("a_cat", "b_dog", "c_eel")
  assert source.num_examples == 6 and source.num_classes == 3
  assert source.random_access
  assert source.describe(0).endswith(os.path.join("a_cat", "gray.png"))
  batch = next(pipeline.eval_batches(source, _spec(6, 8)))
  assert batch["label"].tolist() == [0, 0, 0, 1, 1, 2]
  assert batch["image"].shape == (6, 8, 8, 3)
  assert batch["image"].dtype == np.uint8


def test_eval_view_resizes_with_the_interpolation_asked_for(tmp_path):
  root = tmp_path / "sized"
  (root / "train" / "a").mkdir(parents=True)
  image = _texture(30, 40, seed=3)
  Image.fromarray(image).save(root / "train" / "a" / "0.png")
  source = sources.get_source(f"folder:{root}", None, "train")
  for interpolation, pil in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
    batch = next(pipeline.eval_batches(source, _spec(1, 16),
                                       interpolation=interpolation))
    # int(16 * 8 / 7) = 18: 30x40 -> 18x24, centre 16x16 at (1, 4).
    ref = np.asarray(Image.fromarray(image).resize((24, 18), pil))[1:17, 4:20]
    np.testing.assert_array_equal(batch["image"][0], ref)


def test_broken_symlinks_are_counted_with_the_ignored_files(tmp_path, caplog):
  root = tmp_path / "links"
  for i in range(3):
    (root / "train" / "a").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_texture(8, 8, seed=i)).save(root / "train" / "a" / f"{i}.png")
  (root / "train" / "a" / "notes.txt").write_text("not an image")
  os.symlink(root / "gone.png", root / "train" / "a" / "lost.png")
  os.symlink(root / "gone2.jpg", root / "train" / "a" / "lost2.jpg")
  os.symlink(root / "train" / "a" / "0.png", root / "train" / "a" / "alias.png")  # works
  with caplog.at_level("INFO", logger="absl"):
    source = sources.get_source(f"folder:{root}", None, "train")
  assert source.num_examples == 4  # three images and the working link
  lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
  assert len(lines) == 1 and "ignored 3 files" in lines[0], lines
  assert "2 broken links" in lines[0] and "1 without an image extension" in lines[0]
  assert [r.levelname for r in caplog.records if "ignored" in r.getMessage()] == ["WARNING"]


def test_every_image_mode_decodes_to_rgb(mixed):
  files = sorted((mixed / "train").glob("*/*.*"))
  checked = 0
  for path in files:
    if path.suffix == ".txt":
      continue
    image = sources.decode_image(tf.io.read_file(str(path))).numpy()
    want = np.asarray(Image.open(path).convert("RGB"))
    assert image.dtype == np.uint8
    assert np.array_equal(image, want), path  # PNG and JPEG: exactly PIL's pixels
    checked += 1
  assert checked == 6


def test_corrupt_file_raises_naming_it(tmp_path):
  source = sources.get_source(_bad_folder(tmp_path), None, "train")
  batches = pipeline.eval_batches(source, _spec(4, 8))
  with pytest.raises(errors.ConfigError, match=r"b/bad\.jpg.*skip_bad_images") as raised:
    list(batches)
  # TensorFlow's own words, without the graph's names around them.
  message = str(raised.value)
  assert "InvalidArgumentError: " in message, message
  assert "{{" not in message and "[Op:" not in message and "name:" not in message, message


def test_tensorflow_op_noise_is_cut_from_an_op_error():
  text = ("{{function_node __wrapped__DecodeImage_device_/job:localhost/replica:0/task:0/"
          "device:CPU:0}} Unknown image file format. One of JPEG, PNG required. "
          "[Op:DecodeImage] name: ")
  assert sources.op_message(text) == "Unknown image file format. One of JPEG, PNG required"
  assert sources.op_message("Invalid PNG data, size 300\n\t [[{{node cond/DecodeImage}}]]"
                            ) == "Invalid PNG data, size 300"


def test_skip_mode_logs_and_counts(tmp_path, caplog):
  source = sources.get_source(_bad_folder(tmp_path), None, "train",
                         skip_bad_images=True)
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.eval_batches(source, _spec(4, 8)))
    pretrain = next(pipeline.pretrain_batches(source, _spec(4, 8)))
  assert len(batches) == 1
  assert batches[0]["mask"].tolist() == [1, 1, 1, 0]  # the bad file counts 0
  assert source.skipped == [str(tmp_path / "train" / "b" / "bad.jpg")]
  assert "bad.jpg" in caplog.text and "1 skipped" in caplog.text
  assert pretrain["view1"].dtype == np.uint8
  assert np.isfinite(pretrain["view1_draws"]).all()


def test_missing_and_empty_and_unknown_say_what_exists(mixed, tmp_path):
  with pytest.raises(ValueError, match=r"no split 'val'.*empty.*test.*train"):
    sources.get_source(f"folder:{mixed}", None, "val")
  with pytest.raises(ValueError, match=r"no .* images.*a_cat"):
    sources.get_source(f"folder:{mixed}", None, "empty")
  with pytest.raises(ValueError,
                     match=r"does not exist; .*mixed\d* holds: empty, test, train"):
    sources.get_source(f"folder:{mixed}/nope", None, "train")
  with pytest.raises(ValueError, match=r"Unknown data set 'cifar1O'.*cifar10"):
    sources.get_source("cifar1O", None, "train")
  with pytest.raises(ValueError, match=r"data_dir .*nowhere.* does not exist"):
    sources.get_source("cifar10", str(tmp_path / "nowhere"), "train")
  with pytest.raises(ValueError, match=r"mnist .*not prepared.*data sets"):
    sources.get_source("mnist", str(tmp_path), "train")  # not downloaded on first use


def test_imagenet100_class_list():
  with open(sources.IMAGENET100_CLASSES_FILE) as f:
    lines = [line.strip() for line in f if line.strip()]
  assert len(lines) == 100 == len(set(lines))
  assert lines[:2] == ["n02869837", "n01749939"]  # CMC's order
  assert sources.imagenet100_classes() == sorted(lines)


# ---------------------------------------------------------------- order


def test_epochs_cover_each_example_once():
  for n, batch in [(10, 4), (10, 3), (7, 7)]:
    spe = pipeline.steps_per_epoch(n, batch)
    assert spe == n // batch
    epochs = []
    for epoch in range(3):
      rows = np.concatenate([pipeline.batch_indices(n, batch, 5, epoch * spe + s)
                             for s in range(spe)])
      assert len(set(rows.tolist())) == spe * batch  # no repeats
      assert rows.min() >= 0 and rows.max() < n
      epochs.append(rows.tolist())
    if n > batch:
      assert epochs[0] != epochs[1]
  with pytest.raises(ValueError, match="exceeds"):
    pipeline.steps_per_epoch(3, 4)


def test_pretrain_reads_batch_indices_and_augments(unique):
  batches = pipeline.pretrain_batches(unique, _spec(4, 16, 5))
  first = [next(batches) for _ in range(3)]
  assert batches.step == 3
  for step, batch in enumerate(first):
    assert batch["label"].tolist() == pipeline.batch_indices(NUM_UNIQUE, 4, 5,
                                                       step).tolist()
    assert batch["view1"].shape == batch["view2"].shape == (4, 16, 16, 3)
    assert batch["view1"].dtype == batch["view2"].dtype == np.uint8
    assert batch["view1_draws"].shape == (4, augment.NUM_DRAWS)
    assert batch["view1_draws"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    # Same source image everywhere: views, rows and steps differ by
    # augmentation alone.
    assert not np.allclose(batch["view1"], batch["view2"])
    assert not np.allclose(batch["view1"][0], batch["view1"][1])
  assert not np.allclose(first[0]["view1"], first[1]["view1"])
  again = next(pipeline.pretrain_batches(unique, _spec(4, 16, 5)))
  for key in first[0]:
    assert np.array_equal(first[0][key], again[key])
  other = next(pipeline.pretrain_batches(unique, _spec(4, 16, 6)))
  assert not np.allclose(first[0]["view1"], other["view1"])


def test_aug_config_overrides_the_paper_defaults(unique):
  config = {"view1": {"blur_p": 0.0}, "grayscale_p": 1.0}
  resolved = recipe.resolve(unique.name, config)
  batch = next(pipeline.pretrain_batches(unique, _spec(4, 8), recipe.views(resolved)))
  mean, std = resolved["mean"], resolved["std"]
  for view in ("view1", "view2"):  # grayscale p=1 on the device: the channels agree
    out = augment.view(batch[view], batch[f"{view}_draws"],
                       recipe.view_config(resolved, view), mean=mean, std=std)
    rgb = np.asarray(out) * np.array(std) + np.array(mean)
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-5)


def test_process_count_invariance_and_resume(unique):
  def make(start):
    return lambda p, count: pipeline.pretrain_batches(unique, _spec(4, 12, 3, p, count),
                                                      start_step=start)
  reference = _global(make(0), 1, 6)  # 6 steps: 3 epochs of 2
  for count in (2, 4):
    resumed = _global(make(3), count, 3)  # resume at step 3
    for step, batch in enumerate(resumed, start=3):
      for key in ("view1", "view1_draws", "view2", "view2_draws", "label"):
        assert np.array_equal(batch[key], reference[step][key]), (count, step)


def test_eval_covers_each_example_once(unique):
  for train_augment in (False, True):
    def make(p, count, epoch=0):
      return pipeline.eval_batches(unique, _spec(4, 8, 1, p, count),
                                   train_augment=train_augment,
                                   epoch=epoch)
    steps = pipeline.eval_steps(NUM_UNIQUE, 4)
    assert steps == 3
    parts = [list(make(p, 2)) for p in range(2)]  # finite: one pass
    assert [len(part) for part in parts] == [steps, steps]
    batches = [{k: np.concatenate([parts[0][s][k], parts[1][s][k]])
                for k in parts[0][s]} for s in range(steps)]
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [1.0] * NUM_UNIQUE + [0.0] * 2
    real = labels[mask == 1]
    if train_augment:
      assert sorted(real.tolist()) == list(range(NUM_UNIQUE))
      assert real.tolist() != list(range(NUM_UNIQUE))  # shuffled
      next_epoch = np.concatenate([b["label"] for b in _global(
          lambda p, c: make(p, c, epoch=1), 2, steps)])[mask == 1]
      assert next_epoch.tolist() != real.tolist()
    else:
      assert real.tolist() == list(range(NUM_UNIQUE))
      # Deterministic test view: identical images give identical outputs.
      images = np.concatenate([b["image"] for b in batches])
      assert np.array_equal(images[0], images[NUM_UNIQUE - 1])


def test_probe_train_batches(unique):
  batches = pipeline.probe_train_batches(unique, _spec(4, 8, 5, 1, 2))
  batch = next(batches)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (2, 8, 8, 3)
  assert batch["label"].tolist() == pipeline.batch_indices(NUM_UNIQUE, 4, 5,
                                                     0)[2:].tolist()


# ---------------------------------------------------------------- TFDS


def test_tfds_sources_with_mock_data():
  with tfds.testing.mock_data(num_examples=12):
    source = sources.get_source("cifar10", None, "train")
    assert source.random_access and source.num_examples == 12
    assert source.num_classes == 10
    batch = next(pipeline.pretrain_batches(source, _spec(4, 16, 0, 1, 2)))
    assert batch["view1"].shape == (2, 16, 16, 3)
    assert batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 10

    streamed = sources.get_source("cifar10", None, "train", random_access=False)
    assert not streamed.random_access and streamed.num_examples == 12
    with pytest.raises(ValueError, match="is streamed: its examples have no fixed index"):
      streamed.subset(np.arange(2))
    batch = next(pipeline.pretrain_batches(streamed, _spec(4, 16, 0, 0, 2)))
    assert batch["view2"].shape == (2, 16, 16, 3)
    evals = list(pipeline.eval_batches(streamed, _spec(8, 16, 0, 0, 2)))
    assert len(evals) == 2 and evals[0]["image"].shape == (4, 16, 16, 3)

  with tfds.testing.mock_data(num_examples=100):
    subset = sources.get_source("imagenet100", None, "train")
    assert subset.num_classes == 100
    assert list(subset.class_names) == sources.imagenet100_classes()
    assert 0 < subset.num_examples < 100  # mock labels span 1000 classes
    batch = next(pipeline.eval_batches(subset, _spec(4, 8)))
    assert 0 <= batch["label"].min() and batch["label"].max() < 100


class CorinfomaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Record i: a constant image of value 20 * i (its identity), label i % 3."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(10)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((8 + i, 10, 3), 20 * i, np.uint8),
                "label": i % 3}


def _identities(batches, name):
  del name
  ids = []
  for batch in batches:
    value = batch["image"][:, 0, 0, 0] / 20
    ids += np.round(value[batch["mask"] > 0]).astype(int).tolist()
  return ids


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_prepared_tfds_random_access_and_streaming(tmp_path, file_format):
  CorinfomaxTinyImages(data_dir=str(tmp_path),
                       file_format=file_format).download_and_prepare()
  source = sources.get_source("corinfomax_tiny_images", str(tmp_path), "train")
  assert source.random_access == (file_format == "array_record")
  assert (source.num_examples, source.class_names) == (10, ("a", "b", "c"))
  # Two processes, one padded pass: every record exactly once.
  parts = [list(pipeline.eval_batches(source, _spec(4, 8, 0, p, 2)))
           for p in range(2)]
  assert [len(part) for part in parts] == [3, 3]
  ids = _identities(parts[0] + parts[1], source.name)
  assert sorted(ids) == list(range(10))
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in parts[0] + parts[1]])
  assert sorted(labels.tolist()) == sorted(i % 3 for i in range(10))
  batch = next(pipeline.pretrain_batches(source, _spec(4, 8, 0, 1, 2)))
  assert batch["view1"].shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match=r"has no split 'test'.*\['train'\]"):
    sources.get_source("corinfomax_tiny_images", str(tmp_path), "test")


# ---------------------------------------------------------------- devices


def test_global_batches_shard_over_mesh(unique):
  devices = jax.devices()
  assert len(devices) == 8
  sharding = NamedSharding(Mesh(np.array(devices), ("data",)),
                           PartitionSpec("data"))
  local = pipeline.pretrain_batches(unique, _spec(8, 8))
  kept = []

  def recorded():
    for batch in local:
      kept.append(batch)
      yield batch

  arrays = pipeline.global_batches(recorded(), sharding, prefetch=2)
  for step in range(3):
    batch = next(arrays)
    assert len(kept) == step + 3  # two batches ahead
    assert batch["view1"].shape == (8, 8, 8, 3)
    assert batch["label"].shape == (8,)
    for key, value in batch.items():
      assert value.sharding == sharding
      for shard in value.addressable_shards:
        assert np.array_equal(np.asarray(shard.data), kept[step][key][
            shard.index])


def test_non_dividing_batch_raises(unique):
  with pytest.raises(ValueError, match=r"12 does not divide over the 8 devices"):
    mesh_lib.check_batch_divides(12, 8, 1)
  with pytest.raises(ValueError, match=r"6 does not divide over the 4 processes"):
    mesh_lib.check_batch_divides(6, 8, 4)
  mesh_lib.check_batch_divides(16, 8, 2)
  with pytest.raises(ValueError, match=r"6 does not divide over the 4 processes"):
    pipeline.pretrain_batches(unique, _spec(6, 8, 0, 0, 4))
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)),
                           PartitionSpec("data"))
  local = pipeline.pretrain_batches(unique, _spec(4, 8))
  with pytest.raises(ValueError, match=r"4 does not divide over the 8 devices"):
    next(pipeline.global_batches(local, sharding))


def test_pipelines_are_built_without_reading_the_packages_source(unique, monkeypatch):
  """tf.data's AutoGraph would read and convert each data function's source for every
  pipeline built (most of the time to build one), from the files as they are now, which
  after an upgrade under a running job are not the code that runs; the data functions
  are traced as written (`sources.as_written`)."""
  package = os.path.dirname(os.path.dirname(os.path.dirname(sources.__file__)))
  read = []
  findsource = inspect.findsource

  def recorded(obj):
    path = inspect.getsourcefile(obj) or ""
    if path.startswith(package):
      read.append(f"{path}: {getattr(obj, '__name__', obj)}")
    return findsource(obj)

  monkeypatch.setattr(inspect, "findsource", recorded)
  batch = next(pipeline.pretrain_batches(unique, _spec(4, 8)))
  evaluated = next(iter(pipeline.eval_batches(unique, _spec(4, 8))))
  assert batch["view1"].shape == evaluated["image"].shape == (4, 8, 8, 3)
  assert not read, read
