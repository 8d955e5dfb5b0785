"""The accelerator on paper: each config's train step compiled, its FLOPs and memory read.

  python bench/accelerator_table.py                          # every config in configs/
  python bench/accelerator_table.py --configs cifar10,imagenet1k --dtype bfloat16

COMPUTED, NOT MEASURED. For each config the jitted train step (bench/train_step.py's:
device augmentation of both views, network, loss, optimizer) is compiled with XLA:CPU
for `--devices` simulated devices at the config's global batch, from abstract shapes
(nothing is allocated or run), and the compiled executable is read:

  GFLOP/pair   `compiled.cost_analysis()["flops"]` x devices / global batch. An SPMD
               executable is the program of ONE device, so its cost analysis counts the
               FLOPs of one device's share: the total is that times the device count
               (`--verify_config` checks it against a one-device compile). XLA counts a
               multiply-add as 2 FLOPs and also counts elementwise work.
  MiB/device   `compiled.memory_analysis()`: argument + output - alias + temp bytes, the
               buffers one device holds at once (state, its batch shard, the buffer
               assignment's temporaries; the donated state is the alias). XLA:CPU's
               buffer assignment: a GPU or TPU compile fuses differently and adds
               convolution workspace, so read it as an estimate. For a TPU slice,
               `main.py --mode=compile --topology=...` gives the TPU compiler's own.

From those, what one chip would reach at `--utilization` (default 40%) of its peak, and
the host cores its input pipeline would need at the per-core host rates of
docs/benchmarks.md (bench/input_pipeline.py). Imports no TensorFlow (the config files
need ml_collections). The last line is `configs=<number of rows>`.
"""
import argparse
import glob
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

# Simulated devices must be asked for before jax is first imported.
_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _want_devices(argv) -> int:
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" {_DEVICES_FLAG}={_want_devices(sys.argv)}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import train_step as bench_step  # noqa: E402
from corinfomax_jax import mesh as mesh_lib  # noqa: E402
from corinfomax_jax import models  # noqa: E402
from corinfomax_jax.modes import compile as compile_mode  # noqa: E402
from corinfomax_jax.run import settings  # noqa: E402

# Peak dense FLOP/s of one chip (vendor figures; NVIDIA's datasheets print the tensor
# core rates with 2:4 sparsity, the dense rate is half):
#   H100 SXM: 989 TFLOP/s bf16, 494.5 TF32 tensor core, 67 fp32 without tensor cores
#     (H100 datasheet, https://www.nvidia.com/en-us/data-center/h100/: 1,979 bf16 and
#     989 TF32 "with sparsity", 67 fp32; dense per data type in
#     https://glennklockwood.com/garden/processors/h100: 989.4 bf16, 494.7 TF32).
#   TPU v5e: 197 TFLOP/s bf16 per chip (https://cloud.google.com/tpu/docs/v5e). The MXUs
#     multiply bf16 only; float32 dots and convolutions at JAX's default precision take
#     one bf16 pass (https://docs.jax.dev/en/latest/201/precision.html), so the bf16
#     peak applies to a float32 config too.
# XLA on an H100 runs float32 convolutions and dots at the default precision on TF32
# tensor cores (same page), so a float32 config is rated against 494.5, not 67.
H100_PEAK = {"bfloat16": 989e12, "float32": 494.5e12}
V5E_PEAK = {"bfloat16": 197e12, "float32": 197e12}

SKIP = ("default", "recipes", "__init__")


def config_names() -> list[str]:
  """The training configs in configs/ (not default, recipes or __init__)."""
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  return [n for n in names if n not in SKIP]


def load_settings(name: str, dtype: str | None) -> settings.Settings:
  config = bench_step.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  if dtype is not None:
    config.model.dtype = dtype
  return settings.resolve(config)


def compiled_step(config: settings.Settings, devices, batch_size: int):
  """The train step compiled for `devices` at global batch `batch_size`, built as
  --mode=compile builds it (modes/compile.py: pretraining's own jitted step)."""
  lowered, _ = compile_mode.lowered_train_step(config, mesh_lib.make_mesh(devices),
                                               batch_size)
  return lowered.compile()


def step_flops(compiled) -> float:
  """FLOPs of one device's program (what cost_analysis reports for an SPMD executable)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per module
  return float(cost["flops"])


def peak_bytes(compiled) -> int:
  """argument + output - alias + temp bytes of one device (memory_analysis)."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def verify_per_device(name: str, devices: int) -> str:
  """Per-pair FLOPs of config `name` compiled for `devices` devices and for one, at the
  same global batch: a line stating both and their ratio."""
  config = load_settings(name, None)
  n = config.train.batch_size
  sharded = step_flops(compiled_step(config, jax.devices()[:devices], n)) * devices / n
  single = step_flops(compiled_step(config, jax.devices()[:1], n)) / n
  return (f"check ({name}, global batch {n}): cost_analysis x {devices} / batch on "
          f"{devices} devices = {sharded / 1e9:.4f} GFLOP/pair; on 1 device "
          f"{single / 1e9:.4f} GFLOP/pair (ratio {sharded / single:.4f}: cost_analysis "
          f"of a sharded executable counts one device's FLOPs)")


def host_rate(image_size: int, args) -> tuple[float, str]:
  """Pairs/s one host core makes for this image size, and a note when it is a bound."""
  if image_size <= 32:
    return args.host_pairs_per_core_32px, ""
  if image_size < 224:
    return args.host_pairs_per_core_224px, (
        f"{image_size} px: host cores from the 224 px rate, an upper bound of the cost")
  return args.host_pairs_per_core_224px, ""


def row(name: str, args) -> dict:
  config = load_settings(name, args.dtype)
  m = config.model.kwargs
  batch = config.train.batch_size
  notes = []
  if batch % args.devices:
    compiled_batch = -(-batch // args.devices) * args.devices
    notes.append(f"batch {batch} does not divide by {args.devices}: compiled at "
                 f"{compiled_batch}")
    batch = compiled_batch
  t0 = time.perf_counter()
  compiled = compiled_step(config, jax.devices()[:args.devices], batch)
  seconds = time.perf_counter() - t0
  flops_per_pair = step_flops(compiled) * args.devices / batch
  dtype = m["dtype"]
  h100 = args.utilization * H100_PEAK[dtype] / flops_per_pair
  v5e = args.utilization * V5E_PEAK[dtype] / flops_per_pair
  rate, note = host_rate(config.data.image_size, args)
  if note:
    notes.append(note)
  return {
      "config": name, "method": config.method.name, "backbone": m["backbone"],
      "width": m.get("width"), "patch": m.get("patch_size"), "projector": "-".join(
          str(s) for s in models.parse_projector(m["projector"])),
      "px": config.data.image_size, "dtype": dtype, "batch": batch,
      "per_device": batch // args.devices, "gflop": flops_per_pair / 1e9,
      "mib": peak_bytes(compiled) / 2**20, "h100": h100, "v5e": v5e,
      "cores_h100": h100 / rate, "cores_v5e": v5e / rate, "compile_s": seconds,
      "notes": "; ".join(notes)}


HEADER = ("| config | method | network | px | dtype | global batch (per device) | "
          "GFLOP/pair | peak MiB/device | H100 pairs/s | v5e pairs/s | host cores "
          "per H100 | host cores per v5e | notes |")


def markdown(r: dict) -> str:
  shape = f"w{r['width']}" if r["width"] is not None else f"/{r['patch']}"
  network = f"{r['backbone']} {shape} {r['projector']}"
  return (f"| {r['config']} | {r['method']} | {network} | {r['px']} | {r['dtype']} | "
          f"{r['batch']} ({r['per_device']}) | {r['gflop']:.3g} | {r['mib']:,.0f} | "
          f"{r['h100']:,.0f} | {r['v5e']:,.0f} | {r['cores_h100']:.1f} | "
          f"{r['cores_v5e']:.1f} | {r['notes']} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=None,
                      help="comma-separated config names (default: all in configs/)")
  parser.add_argument("--dtype", choices=sorted(models.DTYPES), default=None,
                      help="override every config's model.dtype")
  parser.add_argument("--devices", type=int, default=8,
                      help="simulated CPU devices the step is compiled for")
  parser.add_argument("--utilization", type=float, default=0.4,
                      help="fraction of the chip's peak FLOP/s assumed reached")
  parser.add_argument("--host_pairs_per_core_32px", type=float, default=4533,
                      help="host pipeline pairs/s per core at 32 px (docs/benchmarks.md)")
  parser.add_argument("--host_pairs_per_core_224px", type=float, default=347,
                      help="host pipeline pairs/s per core at 224 px (docs/benchmarks.md)")
  parser.add_argument("--verify_config", default="cifar10_cpu",
                      help="config whose per-pair FLOPs are also compiled on one device "
                           "to check the per-device reading; empty: skip")
  args = parser.parse_args()
  if jax.device_count() < args.devices:
    raise SystemExit(f"--devices {args.devices}, but jax has {jax.device_count()} "
                     f"devices: set XLA_FLAGS={_DEVICES_FLAG}={args.devices} before jax "
                     f"starts, or leave XLA_FLAGS unset")
  names = args.configs.split(",") if args.configs else config_names()
  unknown = sorted(set(names) - set(config_names()))
  if unknown:
    raise SystemExit(f"--configs: no training config {unknown}; known: {config_names()}")
  print(f"jax {jax.__version__}, compiled by XLA:{jax.devices()[0].platform.upper()} "
        f"for {args.devices} simulated devices; COMPUTED, NOT MEASURED; chips at "
        f"{args.utilization:.0%} of peak: H100 SXM {H100_PEAK['bfloat16'] / 1e12:g} "
        f"TFLOP/s bf16 / {H100_PEAK['float32'] / 1e12:g} TF32 (float32 configs), TPU v5e "
        f"{V5E_PEAK['bfloat16'] / 1e12:g} bf16 (float32 at the default one-pass bf16 "
        f"precision); host {args.host_pairs_per_core_32px:g} pairs/s/core at 32 px, "
        f"{args.host_pairs_per_core_224px:g} at 224 px", flush=True)
  if args.verify_config:
    print(verify_per_device(args.verify_config, args.devices), flush=True)
  print(HEADER)
  print("|" + "---|" * HEADER.count(" | ") + "---|", flush=True)
  for name in names:
    r = row(name, args)
    print(markdown(r), flush=True)
    print(f"  ({name}: compiled in {r['compile_s']:.0f} s)", file=sys.stderr, flush=True)
  print(f"configs={len(names)}")


if __name__ == "__main__":
  main()
