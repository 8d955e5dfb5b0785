"""Two-view pretraining pairs per second of the input pipeline on an image folder.

  python bench/input_pipeline.py --threads 1
  python bench/input_pipeline.py --threads 2 --image_size 224

The last line is `pairs_per_s=<number>`. `--threads N` caps TensorFlow at N
threads (tf.data's private pool and TF's intra/inter-op pools); pin the process
with `taskset -c 0` to hold it to one core.
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
  args = parser.parse_args()

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if args.threads:
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  from corinfomax_jax import pipeline  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import sources  # pylint: disable=g-import-not-at-top

  dataset = "folder:" + args.data_dir
  source = sources.get_source(dataset, None, args.split)
  batches = pipeline.pretrain_batches(
      source, global_batch_size=args.batch_size, image_size=args.image_size,
      seed=0, process_index=0, process_count=1,
      num_threads=args.threads or None)
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


if __name__ == "__main__":
  main()
