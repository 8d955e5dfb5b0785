"""--mode=compile: a pod run checked before it is paid for, with no TPU and no data.

  python main.py --config=configs/imagenet100.py --workdir=DIR --mode=compile \
      --topology=v5litepod-256

The TPU compiler (libtpu: `pip install "jax[tpu]==<jax version>"`) compiles the steps a
pretraining run on that slice would run, for the slice's devices as
`jax.experimental.topologies` describes them: the train step at the config's global
batch (mesh, device augmentation, method, optimizer, donation, the online probe when it
is on) and the feature extraction of the kNN monitor, --mode=knn_eval and --mode=embed
at `eval.batch_size`. Nothing is allocated, read or run. What each step asks of a chip
(run/tpu_compile.py: HBM against the chip's, GFLOP per pair, pairs/s, collectives before
and after XLA combines them, compile time) goes to stdout as a table and to
<workdir>/compile.json.
"""
from __future__ import annotations

import os
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
from corinfomax_jax.run import tpu_compile
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir as workdir_lib

RESULT = "compile.json"


def check_topology_flag(mode: str, topology: str | None) -> None:
  """--topology is given with --mode=compile, and only with it."""
  if mode == "compile" and topology is None:
    raise ConfigError("--mode=compile needs --topology (e.g. --topology=v5litepod-16)")
  if mode != "compile" and topology is not None:
    raise ConfigError(f"--topology is read by --mode=compile only, not by --mode={mode}: "
                      "drop it, or use --mode=compile.")


def advice(report: dict, run: settings_lib.Settings, chips: int) -> str | None:
  """What would fit, for a step that does not."""
  if report["fits"]:
    return None
  b = tpu_compile.largest_fitting_batch(report)
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
  tpu_slice = tpu_compile.parse_topology(topology)
  run = settings_lib.resolve(config)
  if getattr(run.method, "stats_dtype", "float32") == "float64":
    raise ConfigError(f"config.{run.method.name}.stats_dtype = 'float64' is not available "
                      "on TPU: TPUs have no float64; use 'float32'")
  devices = tpu_compile.slice_devices(tpu_slice)
  processes = len({d.process_index for d in devices})
  for key, size in (("batch_size", run.train.batch_size),
                    ("eval.batch_size", run.eval.batch_size)):
    mesh_lib.check_batch_divides(size, len(devices), processes, key=key)
  workdir_lib.check_workdir(workdir, create=True)
  probe_classes, probe_note = probe_classes_of(run)
  logging.info("Compiling for %s (%s): %d chips, %d hosts.", topology, tpu_slice.topology,
               len(devices), processes)
  steps = compiled_steps(run, tpu_slice, devices, probe_classes)
  chip = tpu_slice.chip
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
  print(tpu_compile.table(result), flush=True)
  return result


def compiled_steps(run: settings_lib.Settings, tpu_slice: tpu_compile.Slice, devices,
                   probe_classes: int) -> list[dict]:
  """The step reports of the train step and of the feature extraction, each with what
  would fit where it does not."""
  mesh = mesh_lib.make_mesh(devices)
  chips = len(devices)
  steps = []
  with tempfile.TemporaryDirectory() as dump:
    t0 = time.perf_counter()
    lowered, state = lowered_train_step(run, mesh, run.train.batch_size, probe_classes)
    compiled, before = tpu_compile.compile_lowered(lowered, os.path.join(dump, "train"))
    steps.append(tpu_compile.step_report(
        "train", compiled, before, chips=chips, global_batch=run.train.batch_size,
        unit="pair", chip=tpu_slice.chip, seconds=time.perf_counter() - t0))
    del compiled
    t0 = time.perf_counter()
    lowered = lowered_features(run, mesh, state, run.eval.batch_size)
    compiled, before = tpu_compile.compile_lowered(lowered,
                                                   os.path.join(dump, "features"))
    steps.append(tpu_compile.step_report(
        "features", compiled, before, chips=chips, global_batch=run.eval.batch_size,
        unit="image", chip=tpu_slice.chip, seconds=time.perf_counter() - t0))
  for s in steps:
    s["would_fit"] = advice(s, run, chips)
  return steps
