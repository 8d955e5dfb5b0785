"""The label index: read once per workdir, checked on read, written by process 0 only."""
import json
import os
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from corinfomax_jax import files
from corinfomax_jax.data import labels
from corinfomax_jax.data import sources

NUM_RECORDS = 40
WRITE_BESIDE_DATA = labels._write_beside_data  # pylint: disable=protected-access


class CorinfomaxLabelImages(tfds.core.GeneratorBasedBuilder):
  """Record i: a 4x4 image, label (7 * i) % 5."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_RECORDS):
      yield i, {"image": np.full((4, 4, 3), i, np.uint8), "label": (7 * i) % 5}


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  CorinfomaxLabelImages(data_dir=data_dir,
                        file_format="array_record").download_and_prepare()
  return tfds.builder("corinfomax_label_images", data_dir=data_dir)


@pytest.fixture(scope="module")
def expected(builder):
  """The split's labels in index order (TFDS shuffles the records when it writes them),
  from each record's image: label (7 * i) % 5 for image value i."""
  source = builder.as_data_source(split="train")
  return [(7 * int(source[i]["image"][0, 0, 0])) % 5 for i in range(NUM_RECORDS)]


@pytest.fixture(autouse=True)
def read_only_data(monkeypatch):
  """The data's folder as a read-only bucket (no cache beside it); no workdir yet."""
  monkeypatch.setattr(labels, "_write_beside_data", lambda *args: None)
  monkeypatch.setattr(labels, "_labels_dir", None)


class Scans:
  """A `compute` that counts its calls and returns the split's labels."""

  def __init__(self, builder, fail_on=()):
    self.source = builder.as_data_source(split="train")
    self.calls, self.fail_on = [], fail_on

  def __call__(self, who=0):
    self.calls.append(who)
    if who in self.fail_on:
      raise OSError("disk gone")
    return labels.scan_labels(self.source)


def test_the_label_only_scan_equals_the_records_labels(builder, expected):
  source = builder.as_data_source(split="train")
  direct = [int(source[i]["label"]) for i in range(NUM_RECORDS)]
  assert direct == expected and expected != sorted(expected)
  assert labels.scan_labels(source).tolist() == direct
  assert labels.scan_labels(source, label_only=False).tolist() == direct


def test_the_index_is_written_once_and_read_without_a_scan(builder, tmp_path, expected):
  labels.use_workdir(str(tmp_path / "workdir"))
  scans = Scans(builder)
  first = labels.all_labels(builder, "train", scans, NUM_RECORDS)
  again = labels.all_labels(builder, "train", scans, NUM_RECORDS)
  assert len(scans.calls) == 1
  assert again.tolist() == first.tolist() == expected
  path = tmp_path / "workdir" / "labels" / "corinfomax_label_images-1.0.0-train.json"
  meta = json.loads(path.read_text())
  assert {k: meta[k] for k in ("builder", "version", "split", "num_examples")} == {
      "builder": "corinfomax_label_images", "version": "1.0.0", "split": "train",
      "num_examples": NUM_RECORDS}
  # No workdir: every open scans, as before.
  labels.use_workdir(None)
  labels.all_labels(builder, "train", scans, NUM_RECORDS)
  assert len(scans.calls) == 2


def test_a_writable_data_folder_keeps_the_labels_and_a_read_only_one_is_no_error(
    builder, tmp_path, monkeypatch, expected):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(labels, "_write_beside_data", WRITE_BESIDE_DATA)
  beside = labels.beside_data_path(builder, "train")
  path_type = type(files.as_path(beside))
  write_bytes = path_type.write_bytes

  def read_only_data(path, data):
    if os.fspath(path) == beside:  # as TensorFlow's gfile refuses a read-only bucket
      raise tf.errors.PermissionDeniedError(None, None, "read-only bucket")
    return write_bytes(path, data)
  monkeypatch.setattr(path_type, "write_bytes", read_only_data)
  labels.use_workdir(str(tmp_path))
  scans = Scans(builder)
  assert labels.all_labels(builder, "train", scans, NUM_RECORDS).tolist() == expected
  assert not os.path.exists(beside) and len(scans.calls) == 1
  monkeypatch.setattr(path_type, "write_bytes", write_bytes)  # now writable
  labels.use_workdir(str(tmp_path / "another"))
  labels.all_labels(builder, "train", scans, NUM_RECORDS)
  labels.use_workdir(None)
  assert labels.all_labels(builder, "train", scans, NUM_RECORDS).tolist() == expected
  assert os.path.exists(beside) and len(scans.calls) == 2  # read from beside the data
  os.remove(beside)


@pytest.mark.parametrize("key,value", [("version", "0.9.0"), ("num_examples", 39),
                                       ("split", "test"), ("builder", "other")])
def test_an_index_of_another_version_or_size_is_recomputed(builder, tmp_path, key,
                                                           value, caplog, expected):
  labels.use_workdir(str(tmp_path))
  scans = Scans(builder)
  labels.all_labels(builder, "train", scans, NUM_RECORDS)
  sidecar = tmp_path / "labels" / "corinfomax_label_images-1.0.0-train.json"
  meta = json.loads(sidecar.read_text())
  sidecar.write_text(json.dumps(dict(meta, **{key: value})))
  got = labels.all_labels(builder, "train", scans, NUM_RECORDS)
  assert len(scans.calls) == 2
  assert got.tolist() == expected
  assert any("reading the labels again" in r.getMessage() for r in caplog.records)
  assert json.loads(sidecar.read_text())[key] == meta[key]  # rewritten
  labels.all_labels(builder, "train", scans, NUM_RECORDS)
  assert len(scans.calls) == 2


def test_an_index_of_another_length_than_the_split_is_recomputed(builder, tmp_path):
  labels.use_workdir(str(tmp_path))
  scans = Scans(builder)
  labels.all_labels(builder, "train", scans, NUM_RECORDS)
  labels.all_labels(builder, "train", scans, NUM_RECORDS + 1)  # the split has grown
  assert len(scans.calls) == 2


class Processes:
  """Stand-ins for jax.process_index/process_count and a broadcast from process 0,
  for processes simulated by threads."""

  def __init__(self, count):
    self.count, self.local = count, threading.local()
    self.barrier = threading.Barrier(count, timeout=60)
    self.value = None

  def index(self):
    return self.local.index

  def broadcast(self, flag):
    if self.local.index == 0:
      self.value = bool(flag)
    self.barrier.wait()
    value = self.value
    self.barrier.wait()
    return value

  def run(self, fn):
    """fn(process index) on every process at once -> [result or exception]."""
    results = [None] * self.count

    def one(index):
      self.local.index = index
      try:
        results[index] = fn(index)
      except Exception as e:  # pylint: disable=broad-except
        results[index] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(self.count)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    return results


@pytest.fixture
def processes(monkeypatch):
  fake = Processes(3)
  monkeypatch.setattr(labels, "_process_count", lambda: fake.count)
  monkeypatch.setattr(labels, "_process_index", fake.index)
  monkeypatch.setattr(labels, "_broadcast_from_0", fake.broadcast)
  return fake


def test_process_0_scans_and_the_others_read_its_index(builder, tmp_path, expected,
                                                       processes):
  labels.use_workdir(str(tmp_path))
  scans = Scans(builder)
  results = processes.run(
      lambda p: labels.all_labels(builder, "train", lambda: scans(p), NUM_RECORDS))
  assert scans.calls == [0]
  assert [r.tolist() for r in results] == [expected] * 3
  # The next start: nobody scans.
  results = processes.run(
      lambda p: labels.all_labels(builder, "train", lambda: scans(p), NUM_RECORDS))
  assert scans.calls == [0] and [r.tolist() for r in results] == [expected] * 3


def test_a_failed_scan_on_process_0_leaves_no_process_waiting(builder, tmp_path, expected,
                                                              processes):
  labels.use_workdir(str(tmp_path))
  scans = Scans(builder, fail_on=(0,))
  results = processes.run(
      lambda p: labels.all_labels(builder, "train", lambda: scans(p), NUM_RECORDS))
  assert isinstance(results[0], OSError)
  assert sorted(scans.calls) == [0, 1, 2]  # the others scanned for themselves
  assert results[1].tolist() == results[2].tolist() == expected


def _bench_prepare():
  """bench/startup_labels.py's `prepare`: a local imagenet2012 in the TFDS layout."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "startup_labels.py")
  spec = importlib.util.spec_from_file_location("bench_startup_labels", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.prepare


def test_imagenet100_reads_the_workdir_index_on_its_second_open(tmp_path, monkeypatch):
  """The class subset's source, on the benchmark's local imagenet2012 of 300 records
  (record i of class i % 1000, so records 0..299 span classes 0..299)."""
  data_dir = str(tmp_path / "tfds")
  _bench_prepare()(data_dir, 300, side=4)
  scan = labels.scan_labels
  scanned = []
  monkeypatch.setattr(labels, "scan_labels", lambda s: scanned.append(1) or scan(s))
  labels.use_workdir(str(tmp_path / "workdir"))
  first = sources.get_source("imagenet100", data_dir, "train")
  second = sources.get_source("imagenet100", data_dir, "train")
  assert len(scanned) == 1
  names = tfds.builder("imagenet2012", data_dir=data_dir).info.features["label"].names
  in_subset = [i for i in range(300) if names[i % 1000] in set(first.class_names)]
  assert first.num_examples == second.num_examples == len(in_subset) > 0
  assert os.path.exists(tmp_path / "workdir" / "labels" / "imagenet2012-5.1.0-train.npy")
