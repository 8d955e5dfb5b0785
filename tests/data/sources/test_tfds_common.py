"""sources.tfds_common: the small public sets prepared on first use, or one line why not."""
import numpy as np
import pytest
import tensorflow as tf

from corinfomax_jax.data import sources
from corinfomax_jax.data.sources import tfds_common


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

  monkeypatch.setattr(tfds_common, "_unreachable", lambda host: None)
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
  monkeypatch.setitem(tfds_common.DOWNLOADED_ON_FIRST_USE, "cifar10", "example.invalid")
  monkeypatch.setattr(tfds_common, "DOWNLOAD_PROBE_TIMEOUT_S", 2.0)
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

  monkeypatch.setattr(tfds_common, "_unreachable", lambda host: None)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      download_and_extract)
  with pytest.raises(ValueError) as raised:
    sources.get_source("cifar10", str(tmp_path), "train")
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"Downloading and preparing cifar10 into {tmp_path} failed: "
                            "OSError: connection reset while reading https://")
  assert message.endswith("--file_format=array_record` and pass --config.data_dir=DIR.")
