"""Throughput of the jitted CorInfoMax train step on synthetic batches.

  python bench/train_step.py --config=configs/cifar10.py --batch_size=512 --dtype=bfloat16

Imports no TensorFlow, so it runs on an accelerator machine that has none (the config
files need ml_collections, a pure-Python wheel). "images" are training examples, each
a pair of views through the network. The last line is `images_per_s=<number>`.

  --reference: also times the PyTorch reference's step (bench/reference_step.py; needs
  torch) with the same network width, projector and batch, round by round with ours, and
  prints ours / reference; the last line is then `ours_vs_reference=<ratio>`.

  --against=configs/cifar10_cpu.py: also times that config's step (its own network,
  batch and views, on the same devices), round by round with --config's, and prints its
  images/s and the ratio; the last line stays --config's rate. A ViT against the ResNet:
    python bench/train_step.py --config=configs/cifar10_cpu_vit_ti4.py \
        --against=configs/cifar10_cpu.py --steps 2 --warmup 1 --rounds 3

  --online_probe: times the step without and with the online linear probe
  (config.eval.online_probe.enabled, 1000 classes unless --num_classes) in one process and
  prints the probe's share of the step; the last line is then the rate with the probe.
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from corinfomax_jax.data import augment  # noqa: E402
from corinfomax_jax.run import settings  # noqa: E402
from corinfomax_jax import mesh as mesh_lib  # noqa: E402
from corinfomax_jax import models  # noqa: E402
from corinfomax_jax.modes import pretrain  # noqa: E402
from corinfomax_jax.run import train_state as train_state_lib  # noqa: E402


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def add_config_flags(parser):
  """The flags that pick and override the config (shared with bench/profile_step.py)."""
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--batch_size", type=int, default=None, help="global batch")
  parser.add_argument("--dtype", choices=sorted(models.DTYPES), default=None)
  parser.add_argument("--width", type=int, default=None, help="ResNet width override")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--method", default=None, help="corinfomax | vicreg | barlow_twins")


def config_from_flags(args) -> settings.Settings:
  """The settings of --config with the overrides of add_config_flags, checked."""
  config = load_config(args.config)
  for key in ("batch_size", "image_size", "method"):
    if getattr(args, key) is not None:
      config[key] = getattr(args, key)
  for key in ("dtype", "width"):
    if getattr(args, key) is not None:
      config.model[key] = getattr(args, key)
  return settings.resolve(config)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_config_flags(parser)
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compile)")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
  parser.add_argument("--online_probe", action="store_true",
                      help="time without and with the online linear probe")
  parser.add_argument("--num_classes", type=int, default=1000,
                      help="classes of the online probe")
  parser.add_argument("--reference", action="store_true",
                      help="also time the PyTorch reference step (needs torch)")
  parser.add_argument("--against", default=None,
                      help="another config file whose step is timed alongside")
  args = parser.parse_args()
  config = config_from_flags(args)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_divides(config.train.batch_size, jax.device_count(),
                               jax.process_count())
  runs = [False, True] if args.online_probe else [False]
  steppers = {probe: prepare_step(config, mesh, probe, args) for probe in runs}
  steppers["augment"] = prepare_views(config, mesh, args)
  if args.reference:
    steppers["reference"] = prepare_reference(config, args)
  if args.against:
    against = settings.resolve(load_config(args.against))
    steppers["against"] = prepare_step(against, mesh, False, args)
  # Rounds alternate between the variants and each keeps its fastest round, so a
  # shared machine's load hits both alike.
  ms = {k: f() for k, f in steppers.items()}
  for _ in range(args.rounds - 1):
    for k, f in steppers.items():
      ms[k] = min(ms[k], f())
  for probe in runs:
    print(describe(config, probe, ms[probe], args))
  print(f"device augmentation of both views: {ms['augment']:.1f} ms "
        f"({100 * ms['augment'] / ms[False]:.1f}% of a step)")
  if args.online_probe:
    print(f"online probe ({args.num_classes} classes): {ms[True] - ms[False]:+.2f} ms/step, "
          f"{100 * (ms[True] - ms[False]) / ms[True]:.1f}% of the step with it")
  if args.against:
    ours = config.train.batch_size / ms[runs[-1]] * 1e3
    theirs = against.train.batch_size / ms["against"] * 1e3
    print(describe(against, False, ms["against"], args) + f" [{args.against}]")
    print(f"{args.against}: {theirs:.1f} images/s; {args.config}: {ours:.1f} images/s "
          f"({ours / theirs:.3f} of it)")
  print(f"images_per_s={config.train.batch_size / ms[runs[-1]] * 1e3:.1f}")
  if args.reference:
    import reference_step  # pylint: disable=import-outside-toplevel
    print(f"PyTorch {reference_step.torch.__version__} reference step on "
          f"{reference_step.torch.get_num_threads()} thread(s): {ms['reference']:.1f} ms/step "
          f"({config.train.batch_size / ms['reference'] * 1e3:.1f} images/s)")
    print(f"ours_vs_reference={ms['reference'] / ms[runs[-1]]:.2f}")


def prepare_reference(config, args):
  """The PyTorch reference step at this config's settings (`reference_run`); returns a
  function that times `args.steps` of it."""
  run = reference_run(config, args)

  def timed():
    t0 = time.perf_counter()
    run(args.steps)
    return (time.perf_counter() - t0) / args.steps * 1e3

  return timed


def reference_run(config, args):
  """The PyTorch reference step (bench/reference_step.py) at this config's network width,
  projector, batch, image size, lr, weight decay and loss weights, after `args.warmup`
  steps: `run(n)` takes n more."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  try:
    import reference_step  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"--reference needs torch ({e}); pip install torch") from e
  m = config.model.kwargs
  if m["backbone"] != "resnet18" or m.get("projector_bn"):
    raise SystemExit(f"--reference has the reference's ResNet-18 and BN-free projector "
                     f"only; this config has {m['backbone']} projector_bn "
                     f"{m.get('projector_bn')}")
  if config.method.name != "corinfomax":
    raise SystemExit(f"--reference times the CorInfoMax loss; this config's method is "
                     f"{config.method.name}")
  reference_step.use_affinity_threads()
  method = config.method
  run = reference_step.make_step(
      m.get("width") or 64, tuple(m["projector"]), config.train.batch_size,
      config.data.image_size, momentum=config.optimizer.momentum,
      weight_decay=config.optimizer.weight_decay, alpha=method.alpha,
      la_r=method.la_R, la_mu=method.la_mu, r_ini=method.r_init, eps=method.eps,
      normalize=method.normalize)
  run(args.warmup)
  return run


def describe(config, online_probe, ms, args):
  m = config.model.kwargs
  return (f"{config.method.name} {m['backbone']} width {m.get('width')} "
          f"{config.data.image_size}px projector {m['projector']} "
          f"batch {config.train.batch_size} {m['dtype']} online_probe {online_probe} on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}: {ms:.1f} ms/step "
          f"(fastest of {args.rounds} rounds of {args.steps} steps)")


def two_view_batch(config, mesh, num_classes):
  """What the host pipeline sends: uint8 crops and each example's draws, per view."""
  n, size = config.train.batch_size, config.data.image_size
  rng = np.random.default_rng(0)
  batch = {"label": rng.integers(0, num_classes, n).astype(np.int32)}
  for k in ("view1", "view2"):
    batch[k] = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    batch[f"{k}_draws"] = rng.uniform(size=(n, augment.NUM_DRAWS)).astype(np.float32)
  return jax.device_put(batch, mesh_lib.batch_sharded(mesh))


def prepare_views(config, mesh, args):
  """Times the device augmentation alone (both views) on the step's batch and sharding."""
  views = jax.jit(pretrain.make_views(config.data))
  batch = two_view_batch(config, mesh, args.num_classes)
  jax.block_until_ready(views(batch))

  def timed():
    t0 = time.perf_counter()
    for _ in range(args.steps):
      out = views(batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / args.steps * 1e3

  return timed


def warmed_up(step, holder: dict, batch, warmup: int, what: str = "train step"):
  """`run(n)`: n steps of `step` on `batch` from `holder["state"]`, which it advances;
  returns the last metrics. `warmup` steps have run, their loss finite. The state lives in
  `holder` so that a caller can drop it (`holder.clear()`) while an error is handled."""

  def run(n):
    s = holder["state"]
    for _ in range(n):
      s, metrics = step(s, batch)
    jax.block_until_ready(s)
    holder["state"] = s
    return metrics

  metrics = run(warmup)
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"{what}: loss {float(metrics['loss'])} in warm-up")
  return run


def prepare_step(config, mesh, online_probe, args):
  """Compiles and warms up the train step; returns a function that times `args.steps`
  steps and returns ms per step."""
  config = dataclasses.replace(config, eval=dataclasses.replace(
      config.eval, online_probe=dataclasses.replace(config.eval.online_probe,
                                                    enabled=online_probe)))
  model = config.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(config.optimizer, steps_per_epoch=100)
  tx = train_state_lib.create_optimizer(config.optimizer, lr_fn)
  state = train_state_lib.create_train_state(
      config, model, tx, mesh, probe_classes=train_state_lib.online_probe_classes(
          config.eval.online_probe, args.num_classes))
  step = pretrain.jit_train_step(config, model, tx, lr_fn, mesh)

  batch = two_view_batch(config, mesh, args.num_classes)
  run = warmed_up(step, {"state": state}, batch, args.warmup)

  def timed():
    t0 = time.perf_counter()
    run(args.steps)
    return (time.perf_counter() - t0) / args.steps * 1e3

  return timed


if __name__ == "__main__":
  main()
