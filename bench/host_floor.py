"""What one two-view pair costs the host, part by part: the floor under the pipeline.

  taskset -c 0 python bench/host_floor.py --data_dir DIR        # ImageNet-sized JPEGs
  taskset -c 0 python bench/host_floor.py --image_size 32       # ../shared/data/cifar10

The pipeline's per-image host work is a decode and one random-resized crop per view
(PIL's resize, as the reference's). This times each part alone over the same files, one
thread, the encoded bytes already in memory:
  * `decode_tf_ms`: `sources.decode_image` (libjpeg's accurate IDCT) in a one-thread
    tf.data map, as the pipeline runs it;
  * `decode_pil_ms`: the reference's `Image.open(f).convert("RGB")`, same pixels;
  * `crops_ms`: both views' `random_resized_crop_np` on the decoded arrays;
  * `loop_ms`: PIL decode plus both crops in a bare Python loop, no tf.data at all.
The last line is `floor_pairs_per_s=<1000 / (decode_tf_ms + crops_ms)>`: what a core
can give whatever the pipeline around this work does; compare it with
`bench/input_pipeline.py --threads 1` on the same files in the same session.
For 224 px files: `python ../shared/tools/make_imagenet_sized_jpegs.py DIR`.
"""
import argparse
import io
import os
import random
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def image_files(data_dir: str, split: str, count: int) -> list[str]:
  root = os.path.join(data_dir, split)
  if not os.path.isdir(root):
    raise SystemExit(f"error: no image folder at {root} (expected {root}/<class>/<image>)")
  paths = sorted(os.path.join(root, c, f) for c in os.listdir(root)
                 for f in os.listdir(os.path.join(root, c)))
  random.Random(0).shuffle(paths)
  return paths[:count]


def per_item_ms(fn, items, repeats: int) -> float:
  """Milliseconds per item of fn over all items, the best of `repeats` passes."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn(items)
    best = min(best, time.perf_counter() - start)
  return best / len(items) * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"),
                      help="image folder root/<split>/<class>/<image>")
  parser.add_argument("--split", default="train")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  from corinfomax_jax.data import crops  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top

  paths = image_files(args.data_dir, args.split, args.num_images)
  encoded = []
  for path in paths:
    with open(path, "rb") as f:
      encoded.append(f.read())
  # The pretraining views' crops: scale (0.08, 1), ratio (3/4, 4/3), bicubic, flip 0.5.
  spec = (args.image_size, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, "bicubic")
  draws = np.random.default_rng(0).random((len(paths), 2, crops.HOST_DRAWS))

  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  decoding = (tf.data.Dataset.from_tensor_slices(tf.constant(encoded, tf.string))
              .map(sources.decode_image).with_options(options))

  def decode_tf(_):
    for _ in decoding.as_numpy_iterator():
      pass

  def pil_rgb(data):
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"))

  def decode_pil(items):
    for data in items:
      pil_rgb(data)

  images = [pil_rgb(data) for data in encoded]

  def crop_pairs(items):
    for image, u in items:
      crops.random_resized_crop_np(image, u[0], *spec)
      crops.random_resized_crop_np(image, u[1], *spec)

  def bare_loop(items):
    for data, u in items:
      image = pil_rgb(data)
      crops.random_resized_crop_np(image, u[0], *spec)
      crops.random_resized_crop_np(image, u[1], *spec)

  decode_tf_ms = per_item_ms(decode_tf, encoded, args.repeats)
  decode_pil_ms = per_item_ms(decode_pil, encoded, args.repeats)
  crops_ms = per_item_ms(crop_pairs, list(zip(images, draws)), args.repeats)
  loop_ms = per_item_ms(bare_loop, list(zip(encoded, draws)), args.repeats)
  sizes = np.array([image.shape[:2] for image in images])
  print(f"{len(paths)} images from {args.data_dir}/{args.split} (median "
        f"{int(np.median(sizes[:, 0]))}x{int(np.median(sizes[:, 1]))}), two "
        f"{args.image_size}px crops each, one thread, best of {args.repeats} passes")
  print(f"decode_tf_ms={decode_tf_ms:.3f} decode_pil_ms={decode_pil_ms:.3f} "
        f"crops_ms={crops_ms:.3f} loop_ms={loop_ms:.3f}")
  print(f"floor_pairs_per_s={1e3 / (decode_tf_ms + crops_ms):.1f}")


if __name__ == "__main__":
  main()
