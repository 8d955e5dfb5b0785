"""How the host pipeline scales with threads, and the share of a pair that holds the GIL.

  python bench/host_threads.py --data_dir /tmp/inet224 --image_size 224

Runs bench/input_pipeline.py's pipeline (decode, two random-resized crops, flips, uint8
batches) in a child process per thread count (`--threads 1` pinned to one core by
taskset, `--threads 2` to two), and in the one-thread child takes the CPU time of every
Python callback of the pipeline (`tf.numpy_function`: the crops) and, inside them, of
PIL's work: its resize alone, which releases the GIL, and the whole numpy -> PIL ->
resize -> numpy round trip (`crops._pil_resize`), whose copies Pillow's C code may also
make without the GIL. The GIL share of a pair lies between
  (CPU in callbacks - CPU in the round trip) / (the process's CPU per pair)   (lower)
  (CPU in callbacks - CPU in the resize) / (the process's CPU per pair)       (upper);
TensorFlow's conversion of a callback's tensors to and from numpy holds the GIL too and
is in neither. CPU time, not wall time, so that a busy machine (a core taken by another
process) changes the figures less. With share s and c CPU seconds a pair, Amdahl's law
gives what n free cores reach: 1 / (c * (s + (1 - s) / n)), at most 1 / (c * s).

For 224 px use ImageNet-sized files: `python ../shared/tools/make_imagenet_sized_jpegs.py
/tmp/inet224`. The last line is `gil_share=<lower>..<upper>`.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _Clock:
  """CPU seconds the calling threads spent inside wrapped functions (thread time, so a
  thread that waits for a core or for the GIL adds nothing), summed over threads."""

  def __init__(self):
    self.seconds = 0.0
    self._lock = threading.Lock()

  def wrap(self, fn):
    def timed(*args, **kwargs):
      start = time.thread_time()
      try:
        return fn(*args, **kwargs)
      finally:
        with self._lock:
          self.seconds += time.thread_time() - start
    return timed


def child(args) -> dict:
  """One measurement: pairs/s at args.threads, and the callbacks' and resizes' seconds."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  from corinfomax_jax.data import crops  # pylint: disable=g-import-not-at-top
  callbacks, resizes, round_trips = _Clock(), _Clock(), _Clock()
  numpy_function = tf.numpy_function
  tf.numpy_function = lambda func, *a, **k: numpy_function(callbacks.wrap(func), *a, **k)
  Image.Image.resize = resizes.wrap(Image.Image.resize)
  crops._pil_resize = round_trips.wrap(crops._pil_resize)  # pylint: disable=protected-access
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.get_source("folder:" + args.data_dir, None, "train")
  batches = pipeline.pretrain_batches(
      source, pipeline.BatchSpec(args.batch_size, args.image_size, seed=0,
                                 process_index=0, process_count=1,
                                 num_threads=args.threads))
  for _ in range(args.warmup_batches):
    next(batches)
  c0, r0, t0 = callbacks.seconds, resizes.seconds, round_trips.seconds
  start, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(args.num_batches):
    next(batches)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
  pairs = args.num_batches * args.batch_size
  return {"threads": args.threads, "pairs": pairs, "seconds": seconds,
          "cpu_seconds": cpu, "pairs_per_s": pairs / seconds,
          "callback_seconds": callbacks.seconds - c0, "resize_seconds": resizes.seconds - r0,
          "round_trip_seconds": round_trips.seconds - t0}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/inet224",
                      help="image folder root/train/<class>/<image>")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_batches", type=int, default=15)
  parser.add_argument("--warmup_batches", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0,
                      help="(internal) measure this many threads and print JSON")
  args = parser.parse_args()
  if args.threads:
    print(json.dumps(child(args)))
    return
  runs = {}
  for threads in (1, 2):
    cores = ",".join(str(i) for i in range(threads))
    cmd = ["taskset", "-c", cores, sys.executable, os.path.abspath(__file__),
           f"--threads={threads}", f"--data_dir={args.data_dir}",
           f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
           f"--num_batches={args.num_batches}", f"--warmup_batches={args.warmup_batches}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    runs[threads] = json.loads(out.stdout.strip().splitlines()[-1])
  one, two = runs[1], runs[2]
  per_pair = one["cpu_seconds"] / one["pairs"]
  gil = {"lower": (one["callback_seconds"] - one["round_trip_seconds"]) / one["pairs"],
         "upper": (one["callback_seconds"] - one["resize_seconds"]) / one["pairs"]}
  print(f"{args.image_size} px, batch {args.batch_size}, {args.num_batches} batches, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
  for r in (one, two):
    print(f"threads {r['threads']}: {r['pairs_per_s']:.1f} pairs/s "
          f"(process CPU {r['cpu_seconds'] / r['seconds']:.2f} cores)")
  print(f"2 threads / 1 thread: {two['pairs_per_s'] / one['pairs_per_s']:.2f}x")
  ms = lambda key: one[key] / one["pairs"] * 1e3
  print(f"one thread, per pair: {per_pair * 1e3:.2f} ms CPU "
        f"({one['seconds'] / one['pairs'] * 1e3:.2f} ms wall), "
        f"{ms('callback_seconds'):.2f} ms in Python callbacks, of which "
        f"{ms('round_trip_seconds'):.2f} ms in PIL's round trip and "
        f"{ms('resize_seconds'):.2f} ms in its resize: {gil['lower'] * 1e3:.2f} to "
        f"{gil['upper'] * 1e3:.2f} ms holding the GIL")
  rate = 1 / per_pair  # pairs/s of one free core
  print(f"one free core: {rate:.1f} pairs/s (1 / CPU per pair)")
  share = {k: g / per_pair for k, g in gil.items()}
  for n in (2, 8, 96, 224):
    reach = [rate / (share[k] + (1 - share[k]) / n) for k in ("upper", "lower")]
    print(f"Amdahl, {n} cores: {reach[0]:,.0f} to {reach[1]:,.0f} pairs/s "
          f"(linear: {rate * n:,.0f})")
  print(f"GIL ceiling (any number of cores): {rate / share['upper']:,.0f} to "
        f"{rate / share['lower']:,.0f} pairs/s")
  print(f"gil_share={share['lower']:.3f}..{share['upper']:.3f}")


if __name__ == "__main__":
  main()
