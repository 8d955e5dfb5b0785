"""tools/prepare_tiny_imagenet.py on a miniature archive in the official layout."""
import hashlib
import importlib.util
import io
import os

import numpy as np
from PIL import Image
import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "tools",
                       "prepare_tiny_imagenet.py")
_spec = importlib.util.spec_from_file_location("prepare_tiny_imagenet", _SCRIPT)
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)

WNIDS = ("n01443537", "n01629819", "n02058221")
TRAIN_PER_CLASS = 4
SMALL = ["--expect_classes", "3", "--expect_train_per_class", "4"]


def _jpeg(value: int) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (8, 8), (value % 256, 7, 200)).save(out, "JPEG")
  return out.getvalue()


@pytest.fixture
def archive(tmp_path):
  """tiny-imagenet-200 with 3 classes; returns (root, wnid -> val file names)."""
  root = tmp_path / "tiny-imagenet-200"
  (root / "wnids.txt").parent.mkdir()
  (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
  (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
  for w in WNIDS:
    images = root / "train" / w / "images"
    images.mkdir(parents=True)
    for i in range(TRAIN_PER_CLASS):
      (images / f"{w}_{i}.JPEG").write_bytes(_jpeg(i))
    (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t8\t8\n")
  # 150 val images, classes interleaved in a random order as in the archive.
  owner = np.random.default_rng(0).permutation(np.repeat(np.arange(3), 50))
  (root / "val" / "images").mkdir(parents=True)
  lines, by_class = [], {w: [] for w in WNIDS}
  for i, c in enumerate(owner):
    name = f"val_{i}.JPEG"
    (root / "val" / "images" / name).write_bytes(_jpeg(i))
    lines.append(f"{name}\t{WNIDS[c]}\t0\t1\t62\t63\n")
    by_class[WNIDS[c]].append(name)
  (root / "val" / "val_annotations.txt").write_text("".join(lines))
  (root / "test" / "images").mkdir(parents=True)
  (root / "test" / "images" / "test_0.JPEG").write_bytes(_jpeg(0))
  return root, by_class


def _listing(root) -> dict[str, list[str]]:
  """'split/wnid' -> sorted file names."""
  return {f"{s}/{w}": sorted(os.listdir(root / s / w))
          for s in sorted(os.listdir(root)) for w in sorted(os.listdir(root / s))}


def _snapshot(root) -> dict[str, tuple]:
  result = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
      result[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, digest)
  return result


def _error_line(capsys) -> str:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  return err


def test_split_is_first_25_by_name_to_val_last_25_to_test(archive, tmp_path):
  src, by_class = archive
  before = _snapshot(src)
  dst = tmp_path / "out"
  assert prep.main([str(src), str(dst)] + SMALL) == 0
  got = _listing(dst)
  assert sorted(got) == sorted(f"{s}/{w}" for s in prep.SPLITS for w in WNIDS)
  for w in WNIDS:
    names = sorted(by_class[w])  # string order: val_1 < val_10 < val_100 < val_11
    assert got[f"val/{w}"] == names[:25] and got[f"test/{w}"] == names[25:]
    assert got[f"train/{w}"] == [f"{w}_{i}.JPEG" for i in range(TRAIN_PER_CLASS)]
  # String order, not numeric: a class owning val_1x files puts them before val_2.
  w = WNIDS[0]
  numeric = sorted(by_class[w], key=lambda n: int(n[4:-5]))
  assert got[f"val/{w}"] != numeric[:25]
  # Hard links to the originals; nothing of SRC changed, nothing else written.
  a = dst / "test" / w / got[f"test/{w}"][0]
  assert os.path.samefile(a, src / "val" / "images" / a.name)
  assert _snapshot(src) == before
  # Determinism: a second run gives the same folder.
  assert prep.main([str(src), str(tmp_path / "again")] + SMALL) == 0
  assert _listing(tmp_path / "again") == got


def test_summary_and_copy_mode_give_the_same_folder(archive, tmp_path, capsys):
  src, _ = archive
  assert prep.main([str(src), str(tmp_path / "a")] + SMALL) == 0
  out = capsys.readouterr().out
  assert ("train 12 images in 3 classes, val 75 images in 3 classes, "
          "test 75 images in 3 classes; hard-linked") in out
  assert prep.main([str(src), str(tmp_path / "b"), "--copy"] + SMALL) == 0
  assert _listing(tmp_path / "a") == _listing(tmp_path / "b")
  copied = tmp_path / "b" / "val" / WNIDS[1]
  first = sorted(os.listdir(copied))[0]
  assert not os.path.samefile(copied / first, src / "val" / "images" / first)
  assert (copied / first).read_bytes() == (src / "val" / "images" / first).read_bytes()


def test_project_reads_the_prepared_folder(archive, tmp_path):
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  src, _ = archive
  assert prep.main([str(src), str(tmp_path / "out")] + SMALL) == 0
  for split, n in (("train", 12), ("val", 75), ("test", 75)):
    source = sources.get_source(f"folder:{tmp_path / 'out'}", None, split)
    assert (source.num_examples, source.class_names) == (n, WNIDS)


def test_the_unpacked_archive_is_refused_in_one_line_naming_the_tool(archive):
  from configs import tiny_imagenet  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  src, _ = archive
  for split in ("train", "val"):  # its val/ would read as one unlabelled split
    with pytest.raises(ValueError) as e:
      sources.get_source(f"folder:{src}", None, split)
    assert str(e.value) == (
        f"Image folder {str(src)!r} is the unpacked Tiny ImageNet archive, whose val/ "
        "holds its images without class folders (labels in val/val_annotations.txt): "
        f"prepare it first, python tools/prepare_tiny_imagenet.py {src} "
        "data/tiny-imagenet, and read folder:data/tiny-imagenet.")
  # The config reads the folder the tool writes, as docs/data.md prepares it.
  assert tiny_imagenet.get_config().dataset == "folder:data/tiny-imagenet"


def test_refuses_non_empty_destination(archive, tmp_path, capsys):
  src, _ = archive
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("x")
  assert prep.main([str(src), str(dst)] + SMALL) == 1
  assert str(dst) in _error_line(capsys)
  assert os.listdir(dst) == ["keep.txt"]


def test_empty_destination_is_used(archive, tmp_path):
  src, _ = archive
  (tmp_path / "out").mkdir()
  assert prep.main([str(src), str(tmp_path / "out")] + SMALL) == 0


@pytest.mark.parametrize("case", ["no_src", "no_wnids", "unknown_wnid",
                                  "missing_file", "official_counts"])
def test_user_errors_name_the_path_and_write_nothing(archive, tmp_path, capsys,
                                                     case):
  src, _ = archive
  annotations = src / "val" / "val_annotations.txt"
  lines = annotations.read_text().splitlines(keepends=True)
  argv_extra = SMALL
  if case == "no_src":
    src, expect = tmp_path / "nowhere", str(tmp_path / "nowhere")
  elif case == "no_wnids":
    (src / "wnids.txt").unlink()
    expect = f"no wnids.txt in {src}"
  elif case == "unknown_wnid":
    lines[6] = lines[6].replace(lines[6].split("\t")[1], "n99999999")
    annotations.write_text("".join(lines))
    expect = f"{annotations}:7: wnid 'n99999999'"
  elif case == "missing_file":
    (src / "val" / "images" / "val_3.JPEG").unlink()
    expect = f"missing file {src / 'val' / 'images' / 'val_3.JPEG'}"
  else:  # the official 200 x 500 expected by default
    argv_extra = []
    expect = "expected 200 (--expect_classes)"
  dst = tmp_path / "out"
  assert prep.main([str(src), str(dst)] + argv_extra) == 1
  assert expect in _error_line(capsys)
  assert not dst.exists()
