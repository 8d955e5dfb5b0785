"""Throughput of the jitted CorInfoMax train step on synthetic batches.

  python bench/train_step.py --config=configs/cifar10.py --batch_size=512 --dtype=bfloat16

Imports no TensorFlow, so it runs on an accelerator machine that has none (the config
files need ml_collections, a pure-Python wheel). "images" are training examples, each
a pair of views through the network. The last line is `images_per_s=<number>`.
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from corinfomax_jax import augment  # noqa: E402
from corinfomax_jax import configuration  # noqa: E402
from corinfomax_jax import mesh as mesh_lib  # noqa: E402
from corinfomax_jax import models  # noqa: E402
from corinfomax_jax import pretrain  # noqa: E402
from corinfomax_jax import train_state as train_state_lib  # noqa: E402


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--batch_size", type=int, default=None, help="global batch")
  parser.add_argument("--dtype", choices=sorted(models.DTYPES), default=None)
  parser.add_argument("--width", type=int, default=None, help="ResNet width override")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compile)")
  args = parser.parse_args()

  config = load_config(args.config)
  for key in ("batch_size", "image_size"):
    if getattr(args, key) is not None:
      config[key] = getattr(args, key)
  for key in ("dtype", "width"):
    if getattr(args, key) is not None:
      config.model[key] = getattr(args, key)
  configuration.validate_config(config)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_divides(config.batch_size, jax.device_count(), jax.process_count())
  model = configuration.create_model(config)
  lr_fn = train_state_lib.create_learning_rate_fn(config, steps_per_epoch=100)
  tx = train_state_lib.create_optimizer(config, lr_fn)
  state = train_state_lib.create_train_state(config, model, tx, mesh)
  step = pretrain.jit_train_step(config, model, tx, lr_fn, mesh)

  # What the host pipeline sends: uint8 crops and each example's draws, per view.
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  rng = np.random.default_rng(0)
  batch = {}
  for k in ("view1", "view2"):
    batch[k] = rng.integers(0, 256, size=shape, dtype=np.uint8)
    batch[f"{k}_draws"] = rng.uniform(size=(config.batch_size, augment.NUM_DRAWS)
                                      ).astype(np.float32)
  batch = jax.device_put(batch, mesh_lib.batch_sharded(mesh))

  t0 = time.perf_counter()
  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - t0
  # The device augmentation alone (both views), on the same batch and sharding.
  views = jax.jit(pretrain.make_views(config))
  jax.block_until_ready(views(batch))
  t0 = time.perf_counter()
  for _ in range(args.steps):
    out = views(batch)
  jax.block_until_ready(out)
  augment_s = time.perf_counter() - t0
  m = config.model
  print(f"{m.backbone} width {m.width} {config.image_size}px projector "
        f"{m.projector} batch {config.batch_size} {m.dtype} on "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}: warmup {compile_s:.1f} s, "
        f"{elapsed / args.steps * 1e3:.1f} ms/step, loss {float(metrics['loss']):.4f}; "
        f"device augmentation {augment_s / args.steps * 1e3:.1f} ms "
        f"({100 * augment_s / elapsed:.1f}% of a step)")
  print(f"images_per_s={config.batch_size * args.steps / elapsed:.1f}")


if __name__ == "__main__":
  main()
