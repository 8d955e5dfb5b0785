"""The start-up sequence every mode shares, so that every user error surfaces before work.

  with workdir_lock.WorkdirLock(workdir, mode) as lock:     # modes that write checkpoints
    run, mesh = startup.begin(config, workdir, batch_sizes=..., create_workdir=...,
                              lock=lock)
    state = startup.backbone_state(run, model, mesh, workdir)   # evaluating modes

`begin` checks the whole configuration (settings.resolve), enables JAX's x64 mode if
the method's statistics are float64, then checks that each global batch divides over the
devices and processes, then the workdir, then takes the workdir's lock (writing modes),
and only then builds the mesh. The workdir also keeps the label index of a class subset
(`data.labels`), so a start reads a split's labels only when the workdir has none.
"""
from __future__ import annotations

import jax
from absl import logging

from corinfomax_jax import files
from corinfomax_jax.errors import ConfigError
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.data import labels as labels_lib
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir as workdir_lib
from corinfomax_jax.run import workdir_lock
from corinfomax_jax.run import writers


def begin(config, workdir: str, *, batch_sizes: dict[str, int] | None = None,
          create_workdir: bool = True, checks=(),
          lock: workdir_lock.WorkdirLock | None = None) -> tuple[settings_lib.Settings,
                                                                 jax.sharding.Mesh]:
  """(settings, mesh) of a mode, after every check that needs no data.

  batch_sizes: {config key: global batch} that must divide over the devices, e.g.
  {"batch_size": run.train.batch_size}; a function of the settings may be given to
  name them once the configuration is checked. checks: functions of the settings that
  raise ConfigError (a mode's own keys), run before the workdir is touched. lock: the
  workdir lock of a mode that writes checkpoints, taken once the workdir is checked
  (WorkdirBusyError when another run holds it); the mode's `with` block releases it.
  """
  run = settings_lib.resolve(config)
  enable_x64_for(run)
  if callable(batch_sizes):
    batch_sizes = batch_sizes(run)
  for check in checks:
    check(run)
  for key, size in (batch_sizes or {}).items():
    mesh_lib.check_batch_divides(size, jax.device_count(), jax.process_count(), key=key)
  workdir_lib.check_workdir(workdir, create=create_workdir)
  labels_lib.use_workdir(workdir)  # a class subset's labels are read once per workdir
  if lock is not None:
    lock.acquire()
  return run, mesh_lib.make_mesh()


def enable_x64_for(run: settings_lib.Settings) -> None:
  """Turns on JAX's x64 mode when the method keeps float64 statistics
  (config.corinfomax.stats_dtype = "float64"), before anything is traced.

  x64 changes only the default dtypes of new arrays: every array of the train state is
  created with an explicit dtype (int32 step, uint32 keys, float32 parameters), so only
  the method's state is float64. The mode is process-wide and stays on.
  """
  if getattr(run.method, "stats_dtype", "float32") != "float64":
    return
  if jax.default_backend() == "tpu":
    raise ConfigError(f"config.{run.method.name}.stats_dtype = 'float64' is not available "
                      "on TPU: TPUs have no float64; use 'float32'")
  if not jax.config.jax_enable_x64:
    jax.config.update("jax_enable_x64", True)
    logging.info("config.%s.stats_dtype = 'float64': enabled JAX's x64 mode.",
                 run.method.name)


def backbone_state(run: settings_lib.Settings, model, mesh, workdir: str,
                   random_init: bool | None = None) -> train_state_lib.TrainState:
  """The network an evaluating mode reads: the workdir's latest pretraining checkpoint,
  or the seeded random initialisation when `eval.random_init` (the baseline)."""
  if run.eval.random_init if random_init is None else random_init:
    return train_state_lib.initial_state(run, model, mesh)
  return train_state_lib.load_pretrained(
      run, model, mesh, workdir,
      ", or set config.eval.random_init=True to evaluate the random initialisation")


def write_result(workdir: str, name: str, result: dict) -> str:
  """Writes a mode's result JSON to <workdir>/<name> (process 0) and returns its path."""
  path = files.as_path(workdir) / name
  writers.write_json(path, result)
  logging.info("Results written to %s.", path)
  return str(path)
