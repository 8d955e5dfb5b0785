"""Two-view pretraining pairs per second of the host pipeline on an image folder.

  taskset -c 0 python bench/input_pipeline.py --threads 1
  taskset -c 0 python bench/input_pipeline.py --threads 1 --image_size 224 --data_dir DIR
  taskset -c 0 python bench/input_pipeline.py --reference ...   # needs torch, torchvision

The host's share of each view: decode once, random-resized-crop (bicubic,
antialiased) and flip per view, uint8 out; colour, blur, solarisation and
normalisation run on the accelerator (bench/train_step.py measures them).
`--reference` instead runs the reference recipe, the whole view on the CPU with
torchvision on PIL images in one process, over the same files: compare the two
in the same session. For 224 px use ImageNet-sized files:
`python ../shared/tools/make_imagenet_sized_jpegs.py DIR`.

The last line is `pairs_per_s=<number>`. `--threads N` caps TensorFlow at N
threads (tf.data's private pool and TF's intra/inter-op pools); `taskset -c 0`
holds the process to one core.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"),
                      help="image folder root/<split>/<class>/<image>")
  parser.add_argument("--split", default="train")
  parser.add_argument("--threads", type=int, default=0,
                      help="TensorFlow threads (0: TensorFlow's default)")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--num_batches", type=int, default=40)
  parser.add_argument("--warmup_batches", type=int, default=3)
  parser.add_argument("--reference", action="store_true",
                      help="time the torchvision/PIL recipe on the same files instead")
  args = parser.parse_args()
  if args.reference:
    return reference(args)

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if args.threads:
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top

  dataset = "folder:" + args.data_dir
  source = sources.get_source(dataset, None, args.split)
  batches = pipeline.pretrain_batches(
      source, pipeline.BatchSpec(args.batch_size, args.image_size, seed=0,
                                 process_index=0, process_count=1,
                                 num_threads=args.threads or None))
  for _ in range(args.warmup_batches):
    next(batches)
  start = time.perf_counter()
  for _ in range(args.num_batches):
    batch = next(batches)
  seconds = time.perf_counter() - start
  pairs = args.num_batches * args.batch_size
  print(f"{source.num_examples} images, batch {args.batch_size}, "
        f"{args.image_size}px, threads={args.threads or 'default'}, "
        f"view1 {batch['view1'].shape} {batch['view1'].dtype}, "
        f"{seconds:.2f}s for {pairs} pairs")
  print(f"pairs_per_s={pairs / seconds:.1f}")


def reference(args):
  """The reference recipe: both views made whole on the CPU by torchvision on PIL."""
  import random  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageFilter, ImageOps  # pylint: disable=g-import-not-at-top
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)

  def blur(image):
    return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

  def view(blur_p, solarize_p):
    return T.Compose([
        T.RandomResizedCrop(args.image_size, scale=(0.08, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([blur], p=blur_p),
        T.RandomApply([ImageOps.solarize], p=solarize_p),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])

  view1, view2 = view(1.0, 0.0), view(0.1, 0.2)
  root = os.path.join(args.data_dir, args.split)
  files = sorted(os.path.join(root, c, f) for c in os.listdir(root)
                 for f in os.listdir(os.path.join(root, c)))
  random.Random(0).shuffle(files)

  def pairs(n, offset):
    for i in range(n):
      image = Image.open(files[(offset + i) % len(files)]).convert("RGB")
      yield view1(image), view2(image)

  for _ in pairs(args.warmup_batches * 8, 0):
    pass
  n = args.num_batches * args.batch_size
  start = time.perf_counter()
  for _ in pairs(n, 1000):
    pass
  seconds = time.perf_counter() - start
  print(f"reference recipe (torchvision {__import__('torchvision').__version__}, "
        f"PIL), {len(files)} images, {args.image_size}px, 1 thread, "
        f"{seconds:.2f}s for {n} pairs")
  print(f"pairs_per_s={n / seconds:.1f}")


if __name__ == "__main__":
  main()
