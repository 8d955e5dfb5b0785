"""What opening a class subset (`imagenet100`) costs at start-up, before and after the
workdir's label index, and with and without the label-only parse.

  python bench/startup_labels.py --data_dir /tmp/corinfomax_startup_labels

Prepares, once, a local ArrayRecord copy of `imagenet2012` in the TFDS layout (its
builder, features and 1000 classes) whose --num_records train records hold JPEGs of
about 100 KB, as ImageNet's do (a few distinct noise images, so the set costs disk, not
CPU, to make), record i of class i % 1000. Then, in one process, with the data's folder
treated as read-only (no cache beside the data, a bucket's usual case), it times
`sources.get_source("imagenet100", data_dir, "train")`:
  before     no workdir, each record deserialized whole (TFDS's own parse): the cost of
             every start before the label index;
  scan       no workdir, only the label parsed from each record (`labels.scan_labels`);
  first      a fresh workdir: the label-only scan, and its index written;
  later      the same workdir again: the index read, no scan;
and the open of the whole `imagenet2012` split, which reads no labels, for reference.
The files are read from the page cache (a pass over them first), so the times are the
parse and the bookkeeping, not the disk: a cold bucket adds its read time to `before`,
`scan` and `first` alike. The last line is `later_start_speedup=<before / later>x`.
"""
import argparse
import io
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGENET_TRAIN_RECORDS = 1_281_167


def prepare(data_dir: str, num_records: int, side: int) -> None:
  """A local imagenet2012 of `num_records` train records as ArrayRecord (once)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if tfds.builder("imagenet2012", data_dir=data_dir).is_prepared():
    return
  rng = np.random.default_rng(0)
  payloads = []
  for _ in range(8):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(
        buffer, "JPEG", quality=90)
    payloads.append(buffer.getvalue())

  class LocalImagenet(tfds.builder_cls("imagenet2012"), skip_registration=True):
    """imagenet2012's builder and features, with generated train records."""
    name = "imagenet2012"

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(None)}

    def _generate_examples(self, archive, validation_labels=None, labels_exist=True):
      del archive, validation_labels, labels_exist
      names = self.info.features["label"].names
      for i in range(num_records):
        yield i, {"image": io.BytesIO(payloads[i % len(payloads)]),
                  "label": names[i % 1000], "file_name": f"{names[i % 1000]}_{i}.JPEG"}

  start = time.perf_counter()
  LocalImagenet(data_dir=data_dir, file_format="array_record").download_and_prepare()
  print(f"prepared {num_records} records in {time.perf_counter() - start:.0f} s",
        flush=True)


def read_through(data_dir: str) -> int:
  """Reads every file of the data set once (into the page cache); their bytes."""
  total = 0
  for folder, _, names in os.walk(data_dir):
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        while chunk := f.read(16 << 20):
          total += len(chunk)
  return total


def timed(fn, repeats: int) -> tuple[float, object]:
  """(the least wall seconds of `repeats` calls, the last call's result)."""
  best, result = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/corinfomax_startup_labels")
  parser.add_argument("--num_records", type=int, default=30_000)
  parser.add_argument("--side", type=int, default=336,
                      help="noise JPEG side in pixels (336: about 100 KB at quality 90)")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  prepare(args.data_dir, args.num_records, args.side)
  from corinfomax_jax.data import labels  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  labels._write_beside_data = lambda *a: None  # pylint: disable=protected-access
  beside = labels.beside_data_path(
      sources.tfds.builder("imagenet2012", data_dir=args.data_dir), "train")
  if beside and os.path.exists(beside):  # a cache an older version of this left there
    os.remove(beside)
  size = read_through(args.data_dir)
  scan = labels.scan_labels

  def open_subset(label_only=True):
    labels.scan_labels = lambda source: scan(source, label_only=label_only)
    try:
      return sources.get_source("imagenet100", args.data_dir, "train")
    finally:
      labels.scan_labels = scan

  times = {}
  labels.use_workdir(None)
  times["whole split"], _ = timed(
      lambda: sources.get_source("imagenet2012", args.data_dir, "train"), args.repeats)
  times["before"], old = timed(lambda: open_subset(label_only=False), args.repeats)
  times["scan"], new = timed(open_subset, args.repeats)
  assert old.num_examples == new.num_examples == args.num_records // 10, (
      old.num_examples, new.num_examples)
  workdir = tempfile.mkdtemp(prefix="corinfomax_startup_labels_workdir_")
  try:
    labels.use_workdir(workdir)
    times["first"], _ = timed(open_subset, 1)
    times["later"], later = timed(open_subset, args.repeats)
    assert later.num_examples == new.num_examples
  finally:
    labels.use_workdir(None)
    shutil.rmtree(workdir)

  report(times, args.num_records, size, args.repeats)


def report(times: dict[str, float], n: int, size: int, repeats: int) -> None:
  """Prints the times, ImageNet's scan by extrapolation, and the figure."""
  print(f"{n} records, {size / n / 1e3:.0f} KB each ({size / 1e9:.2f} GB), page cache "
        f"warm, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, best "
        f"of {repeats}")
  for key, what in [("whole split", "open imagenet2012 train (no labels read)"),
                    ("before", "open imagenet100, records deserialized whole"),
                    ("scan", "open imagenet100, label-only parse"),
                    ("first", "open imagenet100, fresh workdir: scan + index written"),
                    ("later", "open imagenet100, workdir index read")]:
    print(f"{key:>11}: {times[key]:7.3f} s  {what}")
  for key in ("before", "scan"):
    per = (times[key] - times["whole split"]) / n
    print(f"{key}: {per * 1e6:.1f} us a record, so {per * IMAGENET_TRAIN_RECORDS:,.0f} s "
          f"for ImageNet's {IMAGENET_TRAIN_RECORDS:,} train records (page cache warm)")
  print(f"label-only parse / whole records: {times['before'] / times['scan']:.1f}x "
        f"faster")
  print(f"later_start_speedup={times['before'] / times['later']:.1f}x")


if __name__ == "__main__":
  main()
