"""Tiny ImageNet archive -> image folder DST/{train,val,test}/<wnid>/<file>.

  python tools/prepare_tiny_imagenet.py SRC DST [--copy]

SRC is the unpacked official archive (tiny-imagenet-200/: wnids.txt,
train/<wnid>/images/*.JPEG, val/images/*.JPEG with val/val_annotations.txt).
Then train with --config=configs/tiny_imagenet.py --config.dataset=folder:DST.

Splits, as the CorInfoMax reference prepares them
(github.com/serdarozsoy/corinfomax-ssl, cifars-tiny/rearrange_folders_tiny.py):
  train/  the 500 official training images per class (flat, no images/ level;
          the *_boxes.txt files are left out);
  val/    25 of the 50 official validation images per class;
  test/   the other 25.
The official test/ images are unlabelled and not used.

Which 25: the reference moves the files in `glob` order (the directory's order,
which depends on the file system) and fills val/<wnid> first, so its split
cannot be reproduced exactly. Here each class's validation files are sorted by
name (plain string order: val_0 < val_1 < val_10 < ...); the first 25 go to
val/, the last 25 to test/. The split is a function of the archive alone.

Files are hard links by default (no extra space; DST shares the files' data
with SRC, so edit neither in place); --copy copies them. SRC is never written.
Every check on SRC runs before DST is touched; a non-empty DST is refused.
Counts are verified at the end against the official archive (200 classes,
500 train / 25 val / 25 test images each); --expect_classes and
--expect_train_per_class change them for a subset.
"""
import argparse
import errno
import os
import shutil
import sys
import time

SPLITS = ("train", "val", "test")
VAL_PER_CLASS = 25  # of the official 50; the other 25 are test
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # as the project's folder source


class UserError(Exception):
  """A problem with the arguments or the archive; printed as one line."""


def _read_wnids(src: str) -> list[str]:
  path = os.path.join(src, "wnids.txt")
  if not os.path.isfile(path):
    raise UserError(f"no wnids.txt in {src} (expected the unpacked "
                    "tiny-imagenet-200 folder)")
  with open(path) as f:
    wnids = [line.strip() for line in f if line.strip()]
  if not wnids:
    raise UserError(f"{path} lists no wnids")
  if len(set(wnids)) != len(wnids):
    twice = next(w for i, w in enumerate(wnids) if w in wnids[:i])
    raise UserError(f"{path} lists {twice} more than once")
  return wnids


def _train_files(src: str, wnids: list[str]) -> dict[str, list[str]]:
  """wnid -> sorted source paths of its training images."""
  files = {}
  for wnid in wnids:
    folder = os.path.join(src, "train", wnid, "images")
    if not os.path.isdir(folder):
      raise UserError(f"missing training folder {folder}")
    files[wnid] = sorted(
        os.path.join(folder, e.name) for e in os.scandir(folder)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
  return files


def _val_files(src: str, wnids: list[str]) -> dict[str, list[str]]:
  """wnid -> its validation image paths, sorted by file name."""
  path = os.path.join(src, "val", "val_annotations.txt")
  if not os.path.isfile(path):
    raise UserError(f"missing {path}")
  image_dir = os.path.join(src, "val", "images")
  known = set(wnids)
  files = {w: [] for w in wnids}
  seen = set()
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 2:
        raise UserError(f"{path}:{number}: expected tab-separated file and "
                        f"wnid, got {line.strip()!r}")
      name, wnid = fields[0], fields[1]
      if wnid not in known:
        raise UserError(f"{path}:{number}: wnid {wnid!r} is not in wnids.txt")
      if name in seen:
        raise UserError(f"{path}:{number}: {name} is annotated twice")
      seen.add(name)
      image = os.path.join(image_dir, name)
      if not os.path.isfile(image):
        raise UserError(f"{path}:{number}: missing file {image}")
      files[wnid].append(image)
  for wnid, paths in files.items():
    if len(paths) != 2 * VAL_PER_CLASS:
      raise UserError(f"{path}: {wnid} has {len(paths)} validation images, "
                      f"the 25/25 val/test split needs {2 * VAL_PER_CLASS}")
    paths.sort(key=os.path.basename)
  return files


def split_plan(src: str) -> dict[str, dict[str, list[str]]]:
  """split -> wnid -> source paths, checked; raises UserError."""
  if not os.path.isdir(src):
    raise UserError(f"source folder {src} does not exist")
  wnids = _read_wnids(src)
  val = _val_files(src, wnids)
  return {"train": _train_files(src, wnids),
          "val": {w: p[:VAL_PER_CLASS] for w, p in val.items()},
          "test": {w: p[VAL_PER_CLASS:] for w, p in val.items()}}


def _check_expected(plan, classes: int, train_per_class: int) -> None:
  for split in SPLITS:
    if len(plan[split]) != classes:
      raise UserError(f"{split} has {len(plan[split])} classes, expected "
                      f"{classes} (--expect_classes)")
  for wnid, paths in plan["train"].items():
    if len(paths) != train_per_class:
      raise UserError(f"train/{wnid}/images has {len(paths)} images, expected "
                      f"{train_per_class} (--expect_train_per_class)")


def _check_dst(src: str, dst: str) -> None:
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise UserError(f"destination {dst} exists and is not an empty folder")
  src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
  if os.path.commonpath([src_real, dst_real]) == src_real:
    raise UserError(f"destination {dst} is inside the source {src}")


def _check_can_link(sample: str, dst: str) -> None:
  """Raises UserError, leaving dst as it was, if hard links fail there."""
  made = not os.path.exists(dst)
  os.makedirs(dst, exist_ok=True)
  probe = os.path.join(dst, ".link_probe")
  try:
    os.link(sample, probe)
    os.remove(probe)
  except OSError as e:
    if made:
      os.rmdir(dst)
    reason = errno.errorcode.get(e.errno, str(e.errno))
    raise UserError(f"cannot hard-link {sample} into {dst} ({reason}: "
                    f"{e.strerror}); rerun with --copy") from None


def write_folder(plan, dst: str, copy: bool) -> None:
  for split, classes in plan.items():
    for wnid, paths in classes.items():
      folder = os.path.join(dst, split, wnid)
      os.makedirs(folder)
      for path in paths:
        target = os.path.join(folder, os.path.basename(path))
        try:
          if copy:
            shutil.copy2(path, target)
          else:
            os.link(path, target)
        except OSError as e:
          raise UserError(f"cannot write {target}: {e.strerror}") from None


def counts(dst: str) -> dict[str, dict[str, int]]:
  """split -> wnid -> number of files, read back from dst."""
  result = {}
  for split in SPLITS:
    root = os.path.join(dst, split)
    result[split] = {e.name: len(os.listdir(e.path))
                     for e in os.scandir(root) if e.is_dir()}
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", metavar="SRC",
                      help="the unpacked tiny-imagenet-200 folder")
  parser.add_argument("dst", metavar="DST", help="new (or empty) folder")
  parser.add_argument("--copy", action="store_true",
                      help="copy the images instead of hard-linking them")
  parser.add_argument("--expect_classes", type=int, default=200,
                      help="classes the archive must have (official: 200)")
  parser.add_argument("--expect_train_per_class", type=int, default=500,
                      help="training images per class (official: 500)")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    plan = split_plan(args.src)
    _check_expected(plan, args.expect_classes, args.expect_train_per_class)
    _check_dst(args.src, args.dst)
    if not args.copy:
      _check_can_link(next(iter(plan["val"].values()))[0], args.dst)
    write_folder(plan, args.dst, args.copy)
    written = counts(args.dst)
    planned = {s: {w: len(p) for w, p in c.items()} for s, c in plan.items()}
    for split in SPLITS:
      if written[split] != planned[split]:
        wrong = sorted(w for w in set(planned[split]) | set(written[split])
                       if written[split].get(w) != planned[split].get(w))
        raise UserError(f"{os.path.join(args.dst, split, wrong[0])} holds "
                        f"{written[split].get(wrong[0], 0)} files, expected "
                        f"{planned[split].get(wrong[0], 0)}")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  how = "copied" if args.copy else "hard-linked"
  print(f"{args.dst}: " + ", ".join(
      f"{split} {sum(written[split].values())} images in "
      f"{len(written[split])} classes" for split in SPLITS)
        + f"; {how} in {time.time() - start:.1f} s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
