"""Where the train step's time goes: a profiler trace of a few steps, summed per XLA op.

  python bench/profile_step.py --config=configs/cifar10.py --batch_size=64

Compiles the step of bench/train_step.py (synthetic uint8 batches with draws), runs
`--warmup` steps, then traces `--steps` steps with jax.profiler into `--trace_dir`
(open it in TensorBoard's Profile tab or Perfetto) and prints the time per kind of XLA
op (the op name without its number) and the slowest ops, each with the model op it
comes from (HLO metadata; `transpose(jvp(...))` marks the backward pass). Imports no
TensorFlow. The last line is `top_op_kind=<kind> share=<percent>`.

  taskset -c 1 python bench/profile_step.py --config=configs/cifar10_cpu.py --reference

`--reference` profiles the PyTorch reference's step instead (bench/reference_step.py at
the config's width, projector and batch; needs torch) with torch.profiler and prints
its ops the same way (self time per aten op, summed over threads), so the two can be
compared op kind by op kind on the same core.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import jax  # noqa: E402
import train_step as bench_step  # noqa: E402
from corinfomax_jax import mesh as mesh_lib  # noqa: E402
from corinfomax_jax.modes import pretrain  # noqa: E402
from corinfomax_jax.run import train_state as train_state_lib  # noqa: E402

_NOT_OPS = ("$", "ThunkExecutor", "PjitFunction", "CommonPjRt", "ParseArguments", "end: ")


def op_times(trace_dir: str) -> dict[str, float]:
  """Total milliseconds per XLA op name in the newest trace under `trace_dir`."""
  files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                        "*.trace.json.gz")))
  if not files:
    raise FileNotFoundError(f"no trace written under {trace_dir}")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
      totals[e["name"]] += e["dur"] / 1e3
  return dict(totals)


def op_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the model op it was lowered from (metadata op_name)."""
  found = re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text)
  return {m.group(1): m.group(2) for m in found}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench_step.add_config_flags(parser)
  parser.add_argument("--steps", type=int, default=2, help="traced steps")
  parser.add_argument("--warmup", type=int, default=1, help="untraced steps (compile)")
  parser.add_argument("--top", type=int, default=10, help="slowest ops to list")
  parser.add_argument("--trace_dir", default=None, help="default: a new temporary folder")
  parser.add_argument("--reference", action="store_true",
                      help="profile the PyTorch reference step instead (needs torch)")
  args = parser.parse_args()
  config = bench_step.config_from_flags(args)
  if args.reference:
    return profile_reference(config, args)
  mesh = mesh_lib.make_mesh()

  model = config.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(config.optimizer, steps_per_epoch=100)
  tx = train_state_lib.create_optimizer(config.optimizer, lr_fn)
  state = train_state_lib.create_train_state(config, model, tx, mesh, probe_classes=0)
  step = pretrain.jit_train_step(config, model, tx, lr_fn, mesh)
  batch = bench_step.two_view_batch(config, mesh, num_classes=10)
  sources = op_sources(step.lower(state, batch).compile().as_text())
  for _ in range(args.warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)

  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="corinfomax_trace_")
  with jax.profiler.trace(trace_dir):
    for _ in range(args.steps):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
  times = op_times(trace_dir)
  total = sum(times.values())
  kinds, counts = collections.Counter(), collections.Counter()
  for name, ms in times.items():
    kind = re.sub(r"\.\d+$", "", name)
    kinds[kind] += ms / args.steps
    counts[kind] += 1
  m = config.model.kwargs
  print(f"{config.method.name} {m['backbone']} width {m.get('width')} "
        f"{config.data.image_size}px batch {config.train.batch_size} "
        f"{m['dtype']} on {jax.devices()[0].device_kind}: {total / args.steps:.0f} ms of "
        f"XLA ops per step (summed over threads); trace in {trace_dir}")
  for kind, ms in kinds.most_common(8):
    print(f"  {ms:10.1f} ms {100 * ms * args.steps / total:5.1f}%  "
          f"{counts[kind]:4d} ops  {kind}")
  print(f"slowest {args.top} ops (ms per step):")
  for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {ms / args.steps:10.1f}  {name:28s} {sources.get(name, '?')}")
  kind, ms = kinds.most_common(1)[0]
  print(f"top_op_kind={kind} share={100 * ms * args.steps / total:.1f}")


def profile_reference(config, args):
  """torch.profiler over `args.steps` reference steps: self time per aten op."""
  run = bench_step.reference_run(config, args)
  from torch import profiler  # pylint: disable=import-outside-toplevel
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    run(args.steps)
  ops = [(e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count // args.steps)
         for e in prof.key_averages()]
  ops.sort(key=lambda op: -op[1])
  total = sum(ms for _, ms, _ in ops)
  m = config.model.kwargs
  print(f"PyTorch reference step, resnet18 width {m.get('width')} "
        f"{config.data.image_size}px batch {config.train.batch_size}: {total:.0f} ms of "
        f"aten ops per step (self time, summed over threads)")
  for name, ms, count in ops[:args.top]:
    print(f"  {ms:10.1f} ms {100 * ms / total:5.1f}%  {count:4d} calls  {name}")
  name, ms, _ = ops[0]
  print(f"top_op_kind={name} share={100 * ms / total:.1f}")


if __name__ == "__main__":
  main()
