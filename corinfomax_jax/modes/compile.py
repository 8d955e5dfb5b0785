"""--mode=compile: a pod run checked before it is paid for, with no TPU and no data.

  python main.py --config=configs/imagenet100.py --workdir=DIR --mode=compile \
      --topology=v5litepod-256

The TPU compiler (libtpu: `pip install "jax[tpu]==<jax version>"`) compiles the steps a
pretraining run on that slice would run, for the slice's devices as
`jax.experimental.topologies` describes them: the train step at the config's global
batch (mesh, device augmentation, method, optimizer, donation, the online probe when it
is on) and the feature extraction of the kNN monitor, --mode=knn_eval and --mode=embed
at `eval.batch_size`. Nothing is allocated, read or run. Per step and per chip it
reports the HBM the executable needs against the chip's (`fits`), GFLOP per pair, a
step time as pairs/s (the compiler's `optimal_seconds`, or the roofline of FLOPs and
bytes accessed where that is not positive, as libtpu 0.0.42 gives for these steps), the
collectives (before and after XLA combines them) and the compile time, as a table on
stdout and as <workdir>/compile.json.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
import time

import jax
import numpy as np
from absl import logging

from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.data import augment
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.modes import pretrain
from corinfomax_jax.modes import startup
from corinfomax_jax.run import encoder
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir as workdir_lib

RESULT = "compile.json"
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's chip: vendor figures (cloud.google.com/tpu/docs/<generation>)."""
  kind: str  # jax's device_kind of its devices
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s; float32 dots take one bf16 pass by default
  hbm_bandwidth: float  # bytes/s
  cores_per_chip: int  # what gcloud's accelerator type counts: TensorCores on v4 and v5p
  dims: int  # torus dimensions of jax's topology name


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9, 2, 3),
    "v5e": Chip("TPU v5 lite", 16 * GIB, 197e12, 819e9, 1, 2),
    "v5p": Chip("TPU v5", 95 * GIB, 459e12, 2765e9, 2, 3),
    "v6e": Chip("TPU v6 lite", 32 * GIB, 918e12, 1640e9, 1, 2),
}
GCLOUD_NAMES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
ACCEPTED = ("a gcloud accelerator type (v4-32, v5p-128: TensorCores; v5litepod-16 or "
            "v5e-16, v6e-64: chips) or jax's topology name (v5e:4x4, v4:2x2x4)")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its generation, jax's topology name and its chip count."""
  generation: str
  topology: str  # jax's name, e.g. "v5e:16x16"
  chips: int

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The shape gcloud gives a slice of `chips` chips (a power of two): 2-D slices grow
  1x1, 1x2, 2x2, 2x4, ...; 3-D ones from 2x2x1 to 2x2x2, 2x2x4, 2x4x4, 4x4x4, ..."""
  shape = [1, 1] if dims == 2 else [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str) -> Slice:
  """The Slice of --topology `name`; ConfigError naming it and the accepted forms."""
  name = (name or "").strip()
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", name)
  if m:
    generation, shape = m.group(1), tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != CHIPS[generation].dims or not all(shape):
      raise ConfigError(f"--topology={name!r}: a {generation} slice has "
                        f"{CHIPS[generation].dims} torus dimensions, e.g. "
                        f"{generation}:{'x'.join(['2'] * CHIPS[generation].dims)}")
    return Slice(generation, name, math.prod(shape))
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
  if not m:
    raise ConfigError(f"--topology={name!r} is not known: expected {ACCEPTED}")
  generation, count = GCLOUD_NAMES[m.group(1)], int(m.group(2))
  chip = CHIPS[generation]
  chips = count // chip.cores_per_chip
  smallest = 4 if chip.dims == 3 else 1
  if count % chip.cores_per_chip or chips < smallest or chips & (chips - 1):
    unit = "TensorCores, 2 per chip" if chip.cores_per_chip == 2 else "chips"
    raise ConfigError(f"--topology={name!r}: {m.group(1)}-N counts {unit}; expected a "
                      f"power of two from {smallest * chip.cores_per_chip}, e.g. "
                      f"{m.group(1)}-{16 * chip.cores_per_chip}")
  shape = torus_shape(chips, chip.dims)
  return Slice(generation, f"{generation}:{'x'.join(map(str, shape))}", chips)


def check_topology_flag(mode: str, topology: str | None) -> None:
  """--topology is given with --mode=compile, and only with it."""
  if mode == "compile" and topology is None:
    raise ConfigError("--mode=compile needs --topology (e.g. --topology=v5litepod-16)")
  if mode != "compile" and topology is not None:
    raise ConfigError(f"--topology is read by --mode=compile only, not by --mode={mode}: "
                      "drop it, or use --mode=compile.")


def slice_devices(tpu_slice: Slice) -> list:
  """The devices of the slice as the TPU compiler sees them (no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(platform="tpu",
                                             topology_name=tpu_slice.topology).devices)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).splitlines() or [type(e).__name__])[0][:300]
    raise ConfigError(
        f"--mode=compile could not describe TPU slice {tpu_slice.topology} ({first}): it "
        f"needs libtpu, pip install \"jax[tpu]=={jax.__version__}\"; only one process per "
        "machine may hold libtpu at a time") from e


# --- Collectives in HLO text. ---------------------------------------------------------
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY_RE = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|f8\w*|bf16|f16|f32|f64|c64|c128)"
                       r"\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "s32": 4, "u32": 4, "s64": 8, "u64": 8, "bf16": 2, "f16": 2, "f32": 4,
                "f64": 8, "c64": 8, "c128": 16}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collective instructions in HLO text (the async
  `-start` form counted once, `-done` not); bytes are the results' sizes on one device."""
  out = {}
  for line in hlo_text.splitlines():
    if " = " not in line:
      continue
    rhs = line.split(" = ", 1)[1]
    m = _COLLECTIVE_RE.search(" " + rhs)
    if not m:
      continue
    arrays = _ARRAY_RE.findall(rhs[:m.start()])
    if m.group(2) and m.group(1) != "all-reduce" and len(arrays) % 2 == 0:
      arrays = arrays[len(arrays) // 2:]  # an async start's tuple: (operands, results)
    size = sum(_DTYPE_BYTES.get(t, 1) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in arrays)
    entry = out.setdefault(m.group(1), {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += size
  return out


# The HLO right after SPMD partitioning holds the collectives the program asks for,
# before the combiners merge them.
_PARTITIONED_PASS = "tpu-spmd-partitioning"


def _compile(lowered, dump_dir: str):
  options = {"xla_dump_to": dump_dir, "xla_dump_hlo_pass_re": _PARTITIONED_PASS}
  compiled = lowered.compile(options)
  partitioned = sorted(glob.glob(os.path.join(dump_dir,
                                              f"*after_{_PARTITIONED_PASS}*.txt")))
  before = None
  if partitioned:
    with open(partitioned[-1]) as f:
      before = collectives(f.read())
  return compiled, before


# --- One compiled step, read. ---------------------------------------------------------
def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def step_report(name: str, compiled, before: dict | None, *, chips: int,
                global_batch: int, unit: str, chip: Chip, seconds: float) -> dict:
  """What one compiled step needs of a chip and of the slice; see the module docstring."""
  m = compiled.memory_analysis()
  memory = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
            "code": m.generated_code_size_in_bytes}
  # Donated (aliased) outputs reuse their arguments' buffers.
  total = (memory["arguments"] + memory["outputs"] - memory["aliased"]
           + memory["temporaries"] + memory["code"])
  cost = _cost(compiled)
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  optimal = float(cost.get("optimal_seconds", -1.0))
  roofline = max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth)
  if optimal > 0:
    step_seconds, source = optimal, "optimal_seconds"
  else:
    step_seconds = roofline
    source = (f"roofline: max(FLOPs / peak, bytes accessed / HBM bandwidth), as the "
              f"compiler's optimal_seconds was {optimal:g}")
  per_chip = global_batch // chips
  after = collectives(compiled.as_text())
  return {
      "step": name, "global_batch": global_batch, "per_chip_batch": per_chip,
      "unit": unit, "memory_bytes": memory, "hbm_needed_bytes": total,
      "hbm_bytes": chip.hbm_bytes, "fits": total <= chip.hbm_bytes,
      "flops_per_chip": flops, "bytes_accessed_per_chip": accessed,
      "gflop_per_unit": flops * chips / global_batch / 1e9,
      "optimal_seconds": optimal, "roofline_seconds": roofline,
      "step_seconds": step_seconds, "step_seconds_source": source,
      "per_second_per_chip": per_chip / step_seconds if step_seconds > 0 else None,
      "per_second_per_slice": global_batch / step_seconds if step_seconds > 0 else None,
      "fraction_of_peak": (flops / step_seconds / chip.peak_flops
                           if step_seconds > 0 else None),
      "collectives": after, "collectives_before_combining": before,
      "compile_seconds": seconds}


def largest_fitting_batch(report: dict, multiple: int = 8) -> int:
  """The per-chip batch whose HBM fits, by linear extrapolation of the temporaries
  (the buffers that grow with the batch; state and code stay), rounded down to
  `multiple`."""
  mem = report["memory_bytes"]
  fixed = report["hbm_needed_bytes"] - mem["temporaries"]
  per_example = mem["temporaries"] / max(report["per_chip_batch"], 1)
  if per_example <= 0:
    return report["per_chip_batch"]
  room = (report["hbm_bytes"] - fixed) / per_example
  return max(int(room) // multiple * multiple, 0)


def advice(report: dict, run: settings_lib.Settings, chips: int) -> str | None:
  """What would fit, for a step that does not."""
  if report["fits"]:
    return None
  b = largest_fitting_batch(report)
  parts = [f"per-chip batch {b} (global {b * chips}) by linear extrapolation of the "
           "temporaries, not compiled"]
  if run.model.kwargs.get("dtype", "float32") == "float32":
    parts.append("or --config.model.dtype=bfloat16")
  return "; ".join(parts)


# --- The steps of a pretraining run. --------------------------------------------------
def abstract_train_inputs(run: settings_lib.Settings, model, tx, mesh, batch_size: int,
                          probe_classes: int = 0):
  """ShapeDtypeStructs of the train state (replicated) and of a two-view batch of
  `batch_size` (sharded), as pretraining feeds its step."""
  state = jax.eval_shape(lambda: train_state_lib.create_train_state(
      run, model, tx, mesh, probe_classes=probe_classes))
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  state = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
  size = run.data.image_size
  batch = {"label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=sharded)}
  for k in ("view1", "view2"):
    batch[k] = jax.ShapeDtypeStruct((batch_size, size, size, 3), np.uint8, sharding=sharded)
    batch[f"{k}_draws"] = jax.ShapeDtypeStruct((batch_size, augment.NUM_DRAWS), np.float32,
                                               sharding=sharded)
  return state, batch


def lowered_train_step(run: settings_lib.Settings, mesh, batch_size: int,
                       probe_classes: int = 0):
  """pretrain.jit_train_step lowered for `mesh` at global batch `batch_size`, and the
  abstract state (steps_per_epoch only places the schedule's corners: a nominal 100)."""
  model = run.model.create()
  lr_fn = train_state_lib.create_learning_rate_fn(run.optimizer, steps_per_epoch=100)
  tx = train_state_lib.create_optimizer(run.optimizer, lr_fn)
  state, batch = abstract_train_inputs(run, model, tx, mesh, batch_size, probe_classes)
  step = pretrain.jit_train_step(run, model, tx, lr_fn, mesh)
  return step.lower(state, batch), state


def lowered_features(run: settings_lib.Settings, mesh, state, batch_size: int):
  """The feature extraction (encoder.features_fn, uint8 centre crops) at `batch_size`."""
  model = run.model.create()
  size = run.data.image_size
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), np.uint8,
                                sharding=mesh_lib.batch_sharded(mesh))
  fn = encoder.features_fn(model, mesh, (run.data.mean, run.data.std))
  return fn.lower(train_state_lib.backbone_variables(state), images)


KNOWN_CLASSES = {"imagenet100": 100, "imagenet2012": 1000, "cifar10": 10, "cifar100": 100}


def probe_classes_of(run: settings_lib.Settings) -> tuple[int, str | None]:
  """The online probe's class count without reading data, and a note when it is a
  stand-in."""
  if not run.eval.online_probe.enabled:
    return 0, None
  dataset = run.data.dataset
  if dataset in KNOWN_CLASSES:
    return KNOWN_CLASSES[dataset], None
  if dataset.startswith("folder:"):
    split = os.path.join(dataset[len("folder:"):], run.data.train_split)
    if os.path.isdir(split):
      return len([d for d in os.listdir(split)
                  if os.path.isdir(os.path.join(split, d))]) or 1, None
  return 1000, f"online probe compiled for 1000 classes ({dataset!r} not read)"


def compile_for_slice(config, workdir: str, topology: str) -> dict:
  """Compiles the run's steps for slice `topology`; writes <workdir>/compile.json and
  prints the table. Returns the JSON's dict."""
  tpu_slice = parse_topology(topology)
  run = settings_lib.resolve(config)
  if getattr(run.method, "stats_dtype", "float32") == "float64":
    raise ConfigError(f"config.{run.method.name}.stats_dtype = 'float64' is not available "
                      "on TPU: TPUs have no float64; use 'float32'")
  devices = slice_devices(tpu_slice)
  processes = len({d.process_index for d in devices})
  for key, size in (("batch_size", run.train.batch_size),
                    ("eval.batch_size", run.eval.batch_size)):
    mesh_lib.check_batch_divides(size, len(devices), processes, key=key)
  workdir_lib.check_workdir(workdir, create=True)
  mesh = mesh_lib.make_mesh(devices)
  chip = tpu_slice.chip
  probe_classes, probe_note = probe_classes_of(run)
  logging.info("Compiling for %s (%s): %d chips, %d hosts.", topology, tpu_slice.topology,
               len(devices), processes)
  steps = []
  with tempfile.TemporaryDirectory() as dump:
    t0 = time.perf_counter()
    lowered, state = lowered_train_step(run, mesh, run.train.batch_size, probe_classes)
    compiled, before = _compile(lowered, os.path.join(dump, "train"))
    steps.append(step_report("train", compiled, before, chips=len(devices),
                             global_batch=run.train.batch_size, unit="pair", chip=chip,
                             seconds=time.perf_counter() - t0))
    del compiled
    t0 = time.perf_counter()
    lowered = lowered_features(run, mesh, state, run.eval.batch_size)
    compiled, before = _compile(lowered, os.path.join(dump, "features"))
    steps.append(step_report("features", compiled, before, chips=len(devices),
                             global_batch=run.eval.batch_size, unit="image", chip=chip,
                             seconds=time.perf_counter() - t0))
  for s in steps:
    s["would_fit"] = advice(s, run, len(devices))
  result = {
      "topology": topology, "jax_topology": tpu_slice.topology,
      "device_kind": devices[0].device_kind, "chips": len(devices), "hosts": processes,
      "chip": {"hbm_bytes": chip.hbm_bytes, "peak_bf16_flops": chip.peak_flops,
               "hbm_bandwidth_bytes_per_s": chip.hbm_bandwidth},
      "config": {"method": run.method.name, "model": run.model.record(),
                 "image_size": run.data.image_size, "batch_size": run.train.batch_size,
                 "eval_batch_size": run.eval.batch_size,
                 "online_probe_classes": probe_classes,
                 "monitors": [n for n in run.eval.monitors
                              if getattr(run.eval, n).every_epochs > 0]},
      "notes": [n for n in (probe_note,) if n],
      "fits": all(s["fits"] for s in steps),
      "jax": jax.__version__, "steps": steps}
  startup.write_result(workdir, RESULT, result)
  print(table(result), flush=True)
  return result


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def table(result: dict) -> str:
  """The stdout table of a compile.json dict."""
  lines = [f"{result['topology']} ({result['jax_topology']}, {result['device_kind']}): "
           f"{result['chips']} chips, {result['hosts']} hosts, "
           f"{_gib(result['chip']['hbm_bytes'])} GiB HBM per chip; jax {result['jax']}"]
  head = ("step", "batch/chip", "args GiB", "temp GiB", "out GiB", "alias GiB",
          "HBM GiB", "fits", "GFLOP/unit", "s/step", "per s/chip", "per s/slice",
          "of peak", "all-reduce n (before)", "all-reduce MiB", "other collectives",
          "compile s")
  rows = [head]
  for s in result["steps"]:
    mem = s["memory_bytes"]
    coll = s["collectives"]
    ar = coll.get("all-reduce", {"count": 0, "bytes": 0})
    before = s["collectives_before_combining"]
    ar_before = None if before is None else before.get("all-reduce", {}).get("count", 0)
    others = ", ".join(f"{k} {v['count']}" for k, v in sorted(coll.items())
                       if k != "all-reduce") or "-"
    est = "" if s["step_seconds_source"] == "optimal_seconds" else "*"
    rows.append((
        s["step"], str(s["per_chip_batch"]), _gib(mem["arguments"]),
        _gib(mem["temporaries"]), _gib(mem["outputs"]), _gib(mem["aliased"]),
        _gib(s["hbm_needed_bytes"]), str(s["fits"]).lower(),
        f"{s['gflop_per_unit']:.2f}", f"{s['step_seconds']:.4g}{est}",
        f"{s['per_second_per_chip'] or 0:,.0f}", f"{s['per_second_per_slice'] or 0:,.0f}",
        f"{(s['fraction_of_peak'] or 0):.0%}",
        f"{ar['count']} ({ar_before if ar_before is not None else '?'})",
        f"{ar['bytes'] / 2**20:,.1f}", others, f"{s['compile_seconds']:.0f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
  for s in result["steps"]:
    if s["step_seconds_source"] != "optimal_seconds":
      lines.append(f"* {s['step']}: {s['step_seconds_source']}")
    if s["would_fit"]:
      lines.append(f"{s['step']} does not fit: {s['would_fit']}")
  lines += result["notes"]
  lines.append(f"fits: {str(result['fits']).lower()}")
  return "\n".join(lines)
