"""Throughput of the train step on the accelerator JAX finds (GPU, TPU; a CPU with --smoke).

  python bench/accelerator.py            # a GPU or TPU: under 8 minutes on one H100
  python bench/accelerator.py --smoke    # every size shrunk: about a minute on a CPU

Needs jax, flax, optax and numpy only: no TensorFlow and no ml_collections. The settings
are plain dicts (`base_config`, a copy of configs/default.py that
tests/bench/test_accelerator.py holds equal to it) handed to `settings.resolve`.
Synthetic uint8 batches with draws, as bench/train_step.py feeds the step (device
augmentation of both views, network, loss, optimizer), on `--devices` devices (default
one: the figures are one chip's). Three variants, smallest memory first:

  r18_bf16  configs/cifar10.py's network (ResNet-18, CIFAR stem, width 64, projector
            2048-2048-64), 32 px, global batch 512, bfloat16
  r18_fp32  the same in float32 (XLA's default precision: TF32 tensor cores on an
            A100/H100, one bf16 pass on a TPU)
  r50_bf16  configs/imagenet1k.py's network (ResNet-50, projector 8192-8192-512 with
            BatchNorm), 224 px, bfloat16, 256 pairs per device, halved on out-of-memory

For each: ms/step (fastest of --rounds rounds of --steps steps) and pairs/s; FLOPs per
pair from the compiled step's cost analysis and the FLOP/s reached, as a fraction of the
device's peak where its kind is in PEAKS; the device augmentation alone (both views, as
bench/train_step.py times it) and its share of a step; peak memory
(`device.memory_stats()["peak_bytes_in_use"]`, the process's peak so far, hence the
order; the compiled step's memory_analysis where the device has no memory_stats).
With torch and CUDA, the PyTorch reference step (bench/reference_step.py, ResNet-18 only)
is timed beside r18_fp32. The last line is
`accelerator=<device kind> r18_fp32_pairs_per_s=... r18_bf16_pairs_per_s=...
r50_bf16_pairs_per_s=...` (spaces of the device kind as underscores).
"""
import argparse
import copy
import gc
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import jax  # noqa: E402
import train_step as bench_step  # noqa: E402
from corinfomax_jax import mesh as mesh_lib  # noqa: E402
from corinfomax_jax import models  # noqa: E402
from corinfomax_jax.data import recipe  # noqa: E402
from corinfomax_jax.modes import pretrain  # noqa: E402
from corinfomax_jax.run import settings  # noqa: E402
from corinfomax_jax.run import train_state as train_state_lib  # noqa: E402

# Dense peak FLOP/s of one device by a substring of its `device_kind`, first match wins:
# (bfloat16, float32 at XLA's default precision). NVIDIA's datasheets print tensor-core
# rates with 2:4 sparsity; the dense rate is half (H100/H200:
# https://www.nvidia.com/en-us/data-center/h100/, per data type in
# https://glennklockwood.com/garden/processors/h100; A100:
# https://glennklockwood.com/garden/processors/A100 after NVIDIA's A100 datasheet).
# float32 runs on TF32 tensor cores there. TPU: Google's per-chip bf16 peaks
# (https://cloud.google.com/tpu/docs/v4, v5e, v5p, v6e); float32 dots and convolutions
# take one bf16 pass at the default precision
# (https://docs.jax.dev/en/latest/201/precision.html), so the bf16 peak applies.
PEAKS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.5e12),  # SXM
    ("H200", 989e12, 494.5e12),
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v5", 459e12, 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12, 918e12),  # v6e
    ("TPU v6e", 918e12, 918e12),
)

VARIANTS = ("r18_bf16", "r18_fp32", "r50_bf16")  # run in this order (memory ascending)
REPORTED = ("r18_fp32", "r18_bf16", "r50_bf16")  # the last line's order


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak FLOP/s for `dtype`; None for a kind not in PEAKS."""
  for kind, bf16, fp32 in PEAKS:
    if kind.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def base_config() -> dict:
  """configs/default.py's ConfigDict as a plain dict (its `to_dict()`): every key
  `settings.resolve` reads, with unset placeholders as None."""
  aug = recipe.paper_config(mean=(), std=())
  aug.update(mean=None, std=None)
  return {
      "dataset": "cifar10", "data_dir": None, "train_split": "train",
      "eval_split": "test", "image_size": 32, "skip_bad_images": False, "aug": aug,
      "model": {"backbone": "resnet18", "cifar_stem": True, "width": 64,
                "projector": (2048, 2048, 64), "projector_bn": False,
                "dtype": "float32"},
      "method": "corinfomax",
      "corinfomax": {"alpha": 250.0, "la_R": 0.01, "la_mu": 0.01, "eps": 1e-8,
                     "r_init": 1.0, "normalize": True, "stats_dtype": "float32"},
      "vicreg": {"sim_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0,
                 "eps": 1e-4},
      "barlow_twins": {"lambd": 0.0051, "scale": 1.0},
      "batch_size": 512, "num_epochs": 1000, "max_steps": -1, "optimizer": "sgd",
      "momentum": 0.9, "weight_decay": 1e-4, "learning_rate": 0.5,
      "base_batch_size": 512, "min_learning_rate": 1e-6, "warmup_epochs": 10.0,
      "warmup_start_lr": 3e-3, "lars_eta": 0.02, "adam_b1": 0.9, "adam_b2": 0.999,
      "grad_clip_norm": 0.0,
      "seed": 0, "log_every_steps": 50, "checkpoint_every_steps": 1000,
      "keep_checkpoints": 3, "spectrum_every_steps": 1000, "profile_steps": 0,
      "divergence": {"enabled": True, "max_norm_ratio": 1e3, "floor_factor": 10.0},
      "eval": {
          "batch_size": 512, "monitors": ("knn",), "random_init": False,
          "embed_split": None,
          "knn": {"every_epochs": 0.0, "k": (10, 20, 100, 200), "temperature": (0.07,),
                  "max_train_examples": -1, "monitor_max_train_examples": -1,
                  "monitor_max_test_examples": -1},
          "online_probe": {"enabled": False, "lr": 0.1, "every_epochs": 1.0},
          "linear": {"epochs": 100, "batch_size": 256, "lr": 0.2, "min_lr": 2e-3,
                     "schedule": "cosine", "step_epochs": 20, "weight_decay": 0.0,
                     "momentum": 0.9, "precomputed": False, "max_steps": -1},
          "finetune": {"label_fraction": 0.1, "label_file": None, "epochs": 30,
                       "batch_size": 256, "backbone_lr": 0.01, "head_lr": 0.1,
                       "weight_decay": 0.0, "momentum": 0.9, "schedule": "cosine",
                       "step_epochs": 5, "backbone_step_factor": 0.2,
                       "head_step_factor": 0.1, "head_init": "zeros",
                       "crop_interpolation": "bicubic", "evaluate_every_epoch": False,
                       "max_steps": -1, "subdir": "finetune"},
      },
  }


def cifar10_config() -> dict:
  """configs/cifar10.py (the defaults are that setting)."""
  return base_config()


def imagenet1k_config() -> dict:
  """What configs/imagenet1k.py changes that the train step reads: data, network,
  method, optimizer."""
  c = base_config()
  c.update(dataset="imagenet2012", eval_split="validation", image_size=224,
           batch_size=1536, base_batch_size=1536, num_epochs=100, learning_rate=0.2,
           min_learning_rate=1e-6)
  c["model"].update(backbone="resnet50", cifar_stem=False, projector=(8192, 8192, 512),
                    projector_bn=True)
  c["corinfomax"].update(alpha=2000.0, la_R=0.1, la_mu=0.1)
  return c


def variant_config(name: str, num_devices: int, smoke: bool, per_device: int) -> dict:
  """The plain config dict of variant `name` (VARIANTS) on `num_devices` devices;
  `per_device`: ResNet-50's pairs per device."""
  if name.startswith("r18"):
    c = copy.deepcopy(cifar10_config())
    c["batch_size"] = 512
  else:
    c = copy.deepcopy(imagenet1k_config())
    c["batch_size"] = per_device * num_devices
  c["model"]["dtype"] = "bfloat16" if name.endswith("bf16") else "float32"
  if smoke:  # the same code paths at sizes a CPU compiles and runs in seconds
    c["model"].update(width=8, projector=(64, 16))
    c["image_size"] = 32
    if name.startswith("r18"):
      c["batch_size"] = 16 * num_devices
  return c


class Unfit(Exception):
  """The step does not fit in the device's memory at this batch."""


def _out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure(name: str, raw: dict, mesh, args) -> dict:
  """Compiles, warms up and times variant `name`'s train step; raises Unfit when it does
  not fit in memory."""
  config = settings.resolve(raw)
  n = config.train.batch_size
  holder = {}
  try:
    model = config.model.create()
    lr_fn = train_state_lib.create_learning_rate_fn(config.optimizer, steps_per_epoch=100)
    tx = train_state_lib.create_optimizer(config.optimizer, lr_fn)
    holder["state"] = train_state_lib.create_train_state(config, model, tx, mesh)
    batch = bench_step.two_view_batch(config, mesh, args.num_classes)
    lowered = pretrain.jit_train_step(config, model, tx, lr_fn, mesh).lower(
        holder["state"], batch)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    run = bench_step.warmed_up(compiled, holder, batch, args.warmup, name)
    best = float("inf")
    for _ in range(args.rounds):
      t0 = time.perf_counter()
      run(args.steps)
      best = min(best, (time.perf_counter() - t0) / args.steps)
    views = bench_step.prepare_views(config, mesh, args)
    views_s = min(views() for _ in range(args.rounds)) / 1e3
  except Exception as e:  # pylint: disable=broad-except
    holder.clear()
    gc.collect()
    if _out_of_memory(e):
      raise Unfit(str(e).splitlines()[0]) from e
    raise
  flops, flops_source = step_flops(compiled, lowered, len(mesh.devices.flat))
  memory = peak_memory(compiled, mesh)
  holder.clear()
  del batch, compiled, lowered
  gc.collect()
  return {"name": name, "config": config, "batch": n, "step_s": best,
          "compile_s": compile_s, "flops": flops, "flops_source": flops_source,
          "views_s": views_s, "memory": memory, "timing": (args.rounds, args.steps)}


def step_flops(compiled, lowered, num_devices: int) -> tuple[float, str]:
  """FLOPs of one step over all devices, and where the figure comes from.

  The compiled executable's cost analysis counts one device's program (x devices); an
  executable whose convolutions became library calls the analysis may not see into is
  caught by comparing with the lowered (unoptimised, whole-batch) module's figure.
  """
  def flops_of(cost):
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))

  per_device = flops_of(compiled.cost_analysis()) * num_devices
  try:
    whole = flops_of(lowered.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    whole = 0.0
  if per_device >= 0.5 * whole:
    return per_device, "compiled cost_analysis"
  return whole, (f"lowered cost_analysis (the compiled one counts "
                 f"{per_device / max(whole, 1):.0%} of it)")


def peak_memory(compiled, mesh) -> tuple[int, str]:
  """Bytes at the peak of the first device, and which reading they are."""
  stats = mesh.devices.flat[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "peak_bytes_in_use, process peak so far"
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes), "memory_analysis: argument + output - alias + temp"


def describe(r: dict, device_kind: str, num_devices: int) -> str:
  m = r["config"].model.kwargs
  dtype = m["dtype"]
  pairs_s = r["batch"] / r["step_s"]
  per_device_flops = r["flops"] / num_devices / r["step_s"]
  peak = peak_flops(device_kind, dtype)
  rate = (f"{per_device_flops / 1e12:.1f} TFLOP/s per device" if per_device_flops >= 1e12
          else f"{per_device_flops / 1e9:.1f} GFLOP/s per device")
  if peak:
    rate += f" = {100 * per_device_flops / peak:.1f}% of its {peak / 1e12:g} peak"
  else:
    rate += f" (no peak known for {device_kind!r})"
  memory, how = r["memory"]
  projector = "-".join(str(s) for s in models.parse_projector(m["projector"]))
  return (f"{r['name']}: {m['backbone']} width {m['width']} "
          f"{r['config'].data.image_size}px projector {projector} {dtype} batch "
          f"{r['batch']} on {num_devices} x {device_kind}: {r['step_s'] * 1e3:.1f} ms/step "
          f"(fastest of {r['timing'][0]} rounds of {r['timing'][1]} steps; compiled in "
          f"{r['compile_s']:.0f} s), {pairs_s:,.1f} pairs/s; "
          f"{r['flops'] / r['batch'] / 1e9:.3g} GFLOP/pair ({r['flops_source']}), {rate}; "
          f"device augmentation {r['views_s'] * 1e3:.1f} ms "
          f"({100 * r['views_s'] / r['step_s']:.1f}% of a step); peak memory "
          f"{memory / 2**30:.2f} GiB ({how})")


def reference(raw: dict, args):
  """ms per step of the PyTorch reference on CUDA at r18_fp32's network and batch, or
  None (and why) without torch or CUDA."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, "torch is not importable"
  if not torch.cuda.is_available():
    return None, "torch has no CUDA device"
  import reference_step  # pylint: disable=import-outside-toplevel
  c = settings.resolve(raw)
  m, method, opt = c.model.kwargs, c.method, c.optimizer
  run = reference_step.make_step(
      m["width"], tuple(models.parse_projector(m["projector"])), c.train.batch_size,
      c.data.image_size, momentum=opt.momentum, weight_decay=opt.weight_decay,
      alpha=method.alpha, la_r=method.la_R, la_mu=method.la_mu, r_ini=method.r_init,
      eps=method.eps, normalize=method.normalize, device="cuda")
  run(args.warmup)
  best = float("inf")
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    run(args.steps)  # returns the loss as a float: waits for the GPU
    best = min(best, (time.perf_counter() - t0) / args.steps)
  return best, (f"PyTorch {torch.__version__} reference step on "
                f"{torch.cuda.get_device_name(0)} (float32; cuDNN's TF32 default for "
                f"convolutions)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="shrink every size (width 8, 32 px, few steps): a CPU check")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices the step runs on; 0: all that JAX finds")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, of {VARIANTS}")
  parser.add_argument("--r50_per_device", type=int, default=256,
                      help="ResNet-50 pairs per device to try first (halved until it fits)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
  parser.add_argument("--no_reference", action="store_true",
                      help="skip the PyTorch reference step even with torch and CUDA")
  args = parser.parse_args()
  defaults = (2, 1, 1) if args.smoke else (20, 3, 3)
  for key, value in zip(("steps", "warmup", "rounds"), defaults):
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.num_classes = 10
  variants = args.variants.split(",")
  if set(variants) - set(VARIANTS):
    raise SystemExit(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; "
                     f"accepted {VARIANTS}")

  start = time.perf_counter()
  devices = jax.devices() if args.devices == 0 else jax.devices()[:args.devices]
  mesh = mesh_lib.make_mesh(devices)
  kind = devices[0].device_kind
  print(f"jax {jax.__version__} on {len(devices)} x {kind} ({devices[0].platform})"
        f"{'; --smoke: shrunk sizes, not the figures' if args.smoke else ''}", flush=True)
  per_device = 4 if args.smoke else args.r50_per_device
  results = {}
  for name in [v for v in VARIANTS if v in variants]:
    while True:
      raw = variant_config(name, len(devices), args.smoke, per_device)
      try:
        results[name] = measure(name, raw, mesh, args)
        break
      except Unfit as e:
        if not name.startswith("r50") or per_device == 1:
          raise SystemExit(f"{name}: out of memory at batch {raw['batch_size']}: {e}")
        print(f"{name}: out of memory at {per_device} pairs per device ({e}); halving",
              flush=True)
        per_device //= 2
    print(describe(results[name], kind, len(devices)), flush=True)

  if "r18_fp32" in results and not args.no_reference:
    raw = variant_config("r18_fp32", 1, args.smoke, per_device)
    ms, why = reference(raw, args)
    if ms is None:
      print(f"reference step: not timed ({why})")
    else:
      ours, batch = results["r18_fp32"], raw["batch_size"]
      print(f"{why}: {ms * 1e3:.1f} ms/step, {batch / ms:,.1f} pairs/s (one device)")
      print(f"r18_fp32 ours / reference: "
            f"{(ours['batch'] / ours['step_s']) / len(devices) / (batch / ms):.2f}x "
            f"pairs/s per device")
      if "r18_bf16" in results:
        bf16 = results["r18_bf16"]
        print(f"r18_bf16 ours / reference (float32): "
              f"{(bf16['batch'] / bf16['step_s']) / len(devices) / (batch / ms):.2f}x")
  print(f"total {time.perf_counter() - start:.0f} s")
  figures = " ".join(
      f"{name}_pairs_per_s={results[name]['batch'] / results[name]['step_s']:.1f}"
      for name in REPORTED if name in results)
  print(f"accelerator={kind.replace(' ', '_')} {figures}")


if __name__ == "__main__":
  main()
