"""A TPU slice described without a TPU, and what one compiled step asks of its chips.

The TPU compiler (libtpu) sees a slice's devices through `jax.experimental.topologies`;
this module names slices the way gcloud and jax do (`parse_topology`), gets their
devices (`slice_devices`), compiles a lowered step keeping the collectives it asked for
before XLA combines them (`compile_lowered`), and reads the executable: HBM against the
chip's, FLOPs, a step time from the compiler's `optimal_seconds` or, where that is not
positive (as libtpu 0.0.42 gives for the training steps), the roofline of FLOPs and
bytes accessed, and the collectives in its HLO text (`step_report`, `collectives`).
`table` prints a report. Which steps a run compiles is --mode=compile's business
(modes/compile.py).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re

import jax

from corinfomax_jax.errors import ConfigError

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


def compile_lowered(lowered, dump_dir: str):
  """`lowered` compiled, and the collectives of its HLO right after SPMD partitioning
  (None where the dump holds no such file); `dump_dir` receives that dump."""
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
