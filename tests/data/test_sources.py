"""sources: TensorFlow kept off the accelerators, recursive and unlabelled image folders,
JPEGs decoded to PIL's pixels."""
import io
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from corinfomax_jax import tensorflow_setup
from corinfomax_jax.data import sources

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAKE_JPEGS = ROOT.parent / "shared" / "tools" / "make_imagenet_sized_jpegs.py"


class _RecordingTfConfig:
  """A stand-in for tf.config with a GPU and a TPU, recording what is hidden."""

  def __init__(self, devices=("GPU", "TPU"), initialised=False):
    self.visible = {kind: [f"/physical_device:{kind}:0"] for kind in devices}
    self.initialised = initialised
    self.calls = []

  def list_physical_devices(self, kind):
    return list(self.visible.get(kind, []))

  def get_visible_devices(self, kind):
    return list(self.visible.get(kind, []))

  def set_visible_devices(self, devices, kind):
    self.calls.append((list(devices), kind))
    if self.initialised:
      raise RuntimeError("Visible devices cannot be modified after being initialized")
    self.visible[kind] = list(devices)


def test_helper_hides_gpus_and_tpus():
  config = _RecordingTfConfig()
  tensorflow_setup.hide_accelerators_from_tensorflow(config)
  assert config.calls == [([], "GPU"), ([], "TPU")]
  assert config.visible == {"GPU": [], "TPU": []}
  tensorflow_setup.hide_accelerators_from_tensorflow(config)  # already hidden: no second call
  assert len(config.calls) == 2


def test_helper_leaves_absent_kinds_alone_and_survives_initialised_tf(caplog):
  config = _RecordingTfConfig(devices=("GPU",), initialised=True)
  tensorflow_setup.hide_accelerators_from_tensorflow(config)
  assert config.calls == [([], "GPU")]  # no TPU listed: not touched
  assert config.visible["GPU"]  # too late, and said so
  assert "GPU devices" in caplog.text


def test_importing_the_pipeline_leaves_tensorflow_no_gpu():
  code = ("import corinfomax_jax.data.pipeline, tensorflow as tf; "
          "assert tf.config.get_visible_devices('GPU') == [], "
          "tf.config.get_visible_devices('GPU')")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


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
  assert sources._images_below(str(tmp_path / "train" / "n01")) == (below, 1, 0)


def tf_indices(values):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.constant(list(values), tf.int64)


def test_an_unlabelled_folder_pretrains_and_refuses_evaluation(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import errors  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.modes import knn_eval  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.modes import linear_eval as linear_probe  # pylint: disable=g-import-not-at-top
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
              lambda c: linear_probe.linear_eval(c, str(tmp_path / "run"))):
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
  assert sources._images_below(f"{url}/train/n01") == sources._images_below(
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
  batches = pipeline.eval_batches(source, global_batch_size=4, image_size=8,
                                  process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"^Cannot read image gs://bucket/data/train/a/2\.png: "
                     r"FileNotFoundError") as raised:
    list(batches)
  assert "\n" not in str(raised.value)


@pytest.fixture(scope="session")
def imagenet_sized_jpegs(tmp_path_factory):
  """12 photograph-like JPEGs at ImageNet's sizes (quality 90, 4:2:0), sorted paths."""
  if not MAKE_JPEGS.exists():
    pytest.skip(f"{MAKE_JPEGS} not found")
  out = tmp_path_factory.mktemp("imagenet_sized")
  subprocess.run([sys.executable, str(MAKE_JPEGS), str(out), "--n", "12"], check=True,
                 capture_output=True)
  paths = sorted(out.glob("train/*/*.jpg"))
  assert len(paths) == 12
  return paths


def _pil_rgb(data: bytes) -> np.ndarray:
  """The reference's loader: Image.open(f).convert("RGB")."""
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **options)
  return out.getvalue()


def _without_adobe_marker(jpeg: bytes) -> bytes:
  """The JPEG less its APP14 (Adobe) segment: a CMYK file PIL reads as not inverted."""
  at = jpeg.index(b"\xff\xee")
  return jpeg[:at] + jpeg[at + 2 + int.from_bytes(jpeg[at + 2:at + 4], "big"):]


def test_real_jpegs_decode_to_pils_pixels_where_tf_decode_image_does_not(
    imagenet_sized_jpegs):
  paths = [str(p) for p in imagenet_sized_jpegs]
  # As the pipeline decodes: inside tf.data, from the file.
  decoded = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda p: sources.decode_image(tf.io.read_file(p)))
  fast_idct_off = []
  for path, image in zip(paths, decoded.as_numpy_iterator()):
    with open(path, "rb") as f:
      data = f.read()
    want = _pil_rgb(data)
    assert image.dtype == np.uint8 and np.array_equal(image, want), path
    plain = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    fast_idct_off.append(int(np.abs(plain.astype(int) - want).max()))
  # libjpeg's fast IDCT (tf.io.decode_image's) is off somewhere in every file.
  assert min(fast_idct_off) >= 1, fast_idct_off


def test_grayscale_and_cmyk_jpegs_and_pngs_decode_to_pils_pixels():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (37, 29, 3), np.uint8)
  cmyk = _encoded(Image.fromarray(rng.integers(0, 256, (37, 29, 4), np.uint8), "CMYK"),
                  "JPEG", quality=95)
  cases = {
      "grayscale JPEG": _encoded(Image.fromarray(rgb[..., 0]), "JPEG", quality=90),
      "progressive 4:4:4 JPEG": _encoded(Image.fromarray(rgb), "JPEG", quality=90,
                                         subsampling=0, progressive=True),
      "CMYK JPEG (Adobe marker, inverted)": cmyk,
      "CMYK JPEG without the Adobe marker": _without_adobe_marker(cmyk),
      "RGB PNG": _encoded(Image.fromarray(rgb), "PNG"),
      "palette PNG": _encoded(Image.fromarray(rgb).convert("P"), "PNG"),
  }
  for name, data in cases.items():
    image = sources.decode_image(tf.constant(data)).numpy()
    assert image.dtype == np.uint8 and np.array_equal(image, _pil_rgb(data)), name
  assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
  for name in ("CMYK JPEG (Adobe marker, inverted)", "CMYK JPEG without the Adobe marker"):
    # TensorFlow's own CMYK -> RGB is not PIL's: what the detour through PIL is for.
    tf_rgb = tf.io.decode_jpeg(cases[name], channels=3,
                               dct_method="INTEGER_ACCURATE").numpy()
    assert not np.array_equal(tf_rgb, _pil_rgb(cases[name])), name


def test_unreadable_jpeg_bytes_raise_a_tensorflow_error():
  cmyk = _encoded(Image.new("CMYK", (16, 16), (1, 2, 3, 4)), "JPEG")
  for data in (b"\xff\xd8\xff junk after a JPEG's magic", cmyk[:200], b"not an image"):
    with pytest.raises(tf.errors.InvalidArgumentError):
      sources.decode_image(tf.constant(data))


def _fake_cifar10_download(root, per_file=3):
  """The layout of cifar-10-binary.tar.gz, extracted: a label byte + 3072 image bytes per
  record (channel-major), five train files and one test file."""
  batches = root / "cifar-10-batches-bin"
  batches.mkdir(parents=True)
  names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
           "ship", "truck"]
  (batches / "batches.meta.txt").write_text("\n".join(names) + "\n")
  rng = np.random.default_rng(0)
  files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
  for k, name in enumerate(files):
    labels = (np.arange(per_file) + k) % 10
    records = [np.concatenate([[label], rng.integers(0, 256, 3072)]).astype(np.uint8)
               for label in labels]
    (batches / name).write_bytes(b"".join(r.tobytes() for r in records))
  return root


def test_small_public_set_is_prepared_on_first_use(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  extracted = _fake_cifar10_download(tmp_path / "download")
  urls = []

  def download_and_extract(self, url):
    urls.append(url)
    return str(extracted)

  monkeypatch.setattr(sources, "_unreachable", lambda host: None)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      download_and_extract)
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  train = sources.get_source("cifar10", str(data_dir), "train")
  assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
  assert train.num_examples == 15 and train.random_access  # prepared as ArrayRecord
  assert train.class_names[:2] == ("airplane", "automobile")
  data, labels = train.load_batch(tf.range(15, dtype=tf.int64))
  written = [(i + k) % 10 for k in range(5) for i in range(3)]  # TFDS shuffles the order
  assert sorted(labels.numpy().tolist()) == sorted(written)
  assert sources.decode_image(train.load_example(data[0])).shape == (32, 32, 3)
  assert list((data_dir / "cifar10").iterdir())[0].name == "3.0.2"
  # Prepared once: the next open reads it without downloading again.
  assert sources.get_source("cifar10", str(data_dir), "test").num_examples == 3
  assert len(urls) == 1


def test_offline_first_use_fails_at_once_in_one_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sources.DOWNLOADED_ON_FIRST_USE, "cifar10", "example.invalid")
  monkeypatch.setattr(sources, "DOWNLOAD_PROBE_TIMEOUT_S", 2.0)
  with pytest.raises(ValueError) as raised:
    sources.get_source("cifar10", str(tmp_path), "train")
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"cifar10 is not prepared in {tmp_path} and cannot be "
                            "downloaded (example.invalid unreachable")
  assert "tfds build cifar10 --data_dir=DIR --file_format=array_record" in message
  assert "--config.dataset=folder:<root>" in message
  assert not (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").exists()


def test_a_failed_download_is_one_line_naming_the_set_and_the_cause(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def download_and_extract(self, url):
    raise OSError(f"connection reset while reading {url}\nsecond line")

  monkeypatch.setattr(sources, "_unreachable", lambda host: None)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      download_and_extract)
  with pytest.raises(ValueError) as raised:
    sources.get_source("cifar10", str(tmp_path), "train")
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"Downloading and preparing cifar10 into {tmp_path} failed: "
                            "OSError: connection reset while reading https://")
  assert message.endswith("--file_format=array_record` and pass --config.data_dir=DIR.")
