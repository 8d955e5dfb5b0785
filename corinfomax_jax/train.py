"""Pretraining: the train state, the jitted step, and the loop that owns them.

Data flows one way: input pipeline -> global batch sharded over the mesh's "data" axis ->
train_step(state, batch) -> new state -> checkpoint / metrics. The train state is one
pytree; a checkpoint is that pytree plus a small JSON record of the run.

This module imports TensorFlow only inside `train_and_evaluate` (through the input
pipeline and the TensorBoard writer), so `create_train_state` and `train_step` run on a
machine without it (bench/train_step.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corinfomax_jax import models
from corinfomax_jax import objective

DATA_AXIS = "data"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("sgd", "lars")
# Config keys that decide the shapes of the train state: a checkpoint written with other
# values cannot be resumed.
MODEL_KEYS = ("model", "cifar_stem", "width", "projector", "projector_bn", "optimizer")


class ConfigError(ValueError):
  """A configuration value that cannot work; raised before any work is done."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step; a checkpoint is exactly this pytree."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_state: objective.CorInfoMaxState
  rng: jax.Array  # raw uint32 key, split every step, for stochastic layers


# ---------------------------------------------------------------------------------
# Configuration checks.
# ---------------------------------------------------------------------------------
def validate_config(config) -> None:
  """Raises ConfigError naming the first value that cannot work."""

  def need(ok, key, accepted):
    if not ok:
      raise ConfigError(
          f"config.{key} = {config[key]!r} is invalid: expected {accepted}")

  def number(key):
    return isinstance(config[key], (int, float)) and not isinstance(config[key], bool)

  try:
    models.create_model(config.model, projector=config.projector,
                        projector_bn=config.projector_bn, cifar_stem=config.cifar_stem,
                        width=config.width)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  need(config.dtype in DTYPES, "dtype", f"one of {sorted(DTYPES)}")
  need(config.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
  for key in ("batch_size", "base_batch_size", "num_epochs", "image_size",
              "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
              "spectrum_every_steps"):
    need(isinstance(config[key], int) and config[key] > 0, key, "a positive integer")
  need(isinstance(config.max_steps, int) and (config.max_steps == -1 or config.max_steps > 0),
       "max_steps", "a positive integer, or -1 for no limit")
  for key in ("learning_rate",):
    need(number(key) and math.isfinite(config[key]) and config[key] > 0, key,
         "a positive number")
  for key in ("min_learning_rate", "warmup_start_lr", "weight_decay", "alpha", "eps",
              "warmup_epochs", "lars_eta"):
    need(number(key) and math.isfinite(config[key]) and config[key] >= 0, key,
         "a number >= 0")
  for key in ("momentum", "la_R", "la_mu"):
    need(number(key) and 0 <= config[key] < 1, key, "a number in [0, 1)")
  need(number("r_init") and config.r_init > 0, "r_init", "a positive number")
  need(isinstance(config.dataset, str) and config.dataset, "dataset",
       "a TFDS name, 'imagenet100', or 'folder:<root>'")


def check_batch_divides(batch_size: int, num_devices: int, num_processes: int,
                        key: str = "batch_size") -> None:
  """The global batch `config.<key>` must split evenly over processes and devices."""
  for count, what in ((num_devices, "devices"), (num_processes, "processes")):
    if batch_size % count:
      raise ConfigError(
          f"config.{key} = {batch_size} does not divide over the {count} {what}: "
          f"use a multiple of {count} (e.g. {max(count, batch_size // count * count)})")


# ---------------------------------------------------------------------------------
# Model, schedule, optimizer, state.
# ---------------------------------------------------------------------------------
def aug_overrides(config) -> dict | None:
  """config.aug: overrides of the paper's augmentation numbers (None: the paper's)."""
  return config.aug.to_dict() or None


def create_model(config) -> models.CorInfoMaxModel:
  return models.create_model(config.model, projector=config.projector,
                             projector_bn=config.projector_bn, cifar_stem=config.cifar_stem,
                             width=config.width, dtype=DTYPES[config.dtype])


def peak_learning_rate(config) -> float:
  """The paper's learning rate, scaled linearly from its batch size to ours."""
  return config.learning_rate * config.batch_size / config.base_batch_size


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from warmup_start_lr to the peak, then cosine to min_learning_rate."""
  peak = peak_learning_rate(config)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  decay_steps = max(config.num_epochs * steps_per_epoch - warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(peak, decay_steps,
                                       alpha=min(config.min_learning_rate / peak, 1.0))
  if warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(config.warmup_start_lr, peak, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def _is_matrix(params):
  """True for weights, False for biases and normalisation parameters (1-D)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  if config.optimizer == "sgd":
    # torch.optim.SGD(weight_decay=wd): decay joins the gradient before momentum, on all
    # parameters, as in the reference.
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(learning_rate_fn, momentum=config.momentum))
  return optax.lars(learning_rate_fn, weight_decay=config.weight_decay,
                    weight_decay_mask=_is_matrix, trust_coefficient=config.lars_eta,
                    trust_ratio_mask=_is_matrix, momentum=config.momentum)


def create_train_state(config, model, tx, mesh) -> TrainState:
  """The initial state, created directly with its (replicated) sharding."""
  dim = models.parse_projector(config.projector)[-1]

  def init(rng):
    rng, init_rng = jax.random.split(rng)
    image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init({"params": init_rng}, image, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params),
                      loss_state=objective.init_state(dim, config.r_init), rng=rng)

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(
      jax.random.PRNGKey(config.seed))


def loss_kwargs(config) -> dict:
  return dict(alpha=config.alpha, la_R=config.la_R, la_mu=config.la_mu, eps=config.eps,
              normalize=config.normalize)


def train_step(state: TrainState, batch, *, model, tx, learning_rate_fn, loss_kw):
  """One CorInfoMax step on the global batch {"view1", "view2"}: (new state, metrics)."""

  def loss_fn(params):
    # Each view passes separately, so BatchNorm statistics are per view (the reference).
    (_, z1), updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   batch["view1"], train=True, mutable=["batch_stats"])
    (_, z2), updates = model.apply({"params": params, **updates}, batch["view2"],
                                   train=True, mutable=["batch_stats"])
    loss, loss_state, metrics = objective.corinfomax_loss(z1, z2, state.loss_state,
                                                          **loss_kw)
    return loss, (updates["batch_stats"], loss_state, metrics)

  grads, (batch_stats, loss_state, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, loss_state=loss_state,
                            rng=jax.random.split(state.rng)[0])
  return new_state, metrics


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over all devices of all processes."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def jit_train_step(config, model, tx, learning_rate_fn, mesh):
  """train_step jitted over `mesh`: batch sharded on "data", state replicated, donated."""
  replicated = NamedSharding(mesh, P())
  step = functools.partial(train_step, model=model, tx=tx,
                           learning_rate_fn=learning_rate_fn, loss_kw=loss_kwargs(config))
  return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------
def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_checkpoint_manager(workdir: str, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Async saves overlap training; a save cut short by a crash leaves a temporary
  # directory that the next run removes.
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "run"))


def save_checkpoint(manager, state: TrainState, run: dict) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run)))


def run_record(config) -> dict:
  """What a checkpoint says about the run that wrote it."""
  return {"config": {k: config[k] for k in MODEL_KEYS}}


def restore_checkpoint(manager, template: TrainState, config, set_aside: bool = True):
  """The latest usable checkpoint: (state, run record), or (None, None) when there is none.

  A checkpoint that cannot be read (a file truncated by a crash) is skipped with a
  warning in favour of the one before it and, when `set_aside` (the trainer, which will
  write new checkpoints), renamed `<step>.unreadable`: nothing is deleted and no good
  checkpoint is overwritten. A checkpoint written by a run with a different model is
  refused with the mismatch named.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  unreadable = []
  found = None, None
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      run = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
      _check_same_model(run, config, step, manager.directory)
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint step %d in %s is unreadable (%s: %s); trying an older one.",
                      step, manager.directory, type(e).__name__, str(e)[:300])
      unreadable.append(step)
      continue
    found = state, run
    break
  if unreadable and set_aside:
    _set_aside(manager, unreadable)
    if found[0] is None:
      logging.warning("No readable checkpoint in %s: starting from scratch.", manager.directory)
  return found


def _check_same_model(run, config, step, directory):
  saved = (run or {}).get("config", {})
  mismatched = {k: (saved[k], config[k]) for k in MODEL_KEYS
                if k in saved and saved[k] != config[k]}
  if mismatched:
    detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}"
                       for k, (a, b) in mismatched.items())
    raise ConfigError(
        f"The workdir's checkpoint (step {step} in {directory}) was written by a different "
        f"configuration ({detail}). Use another --workdir, or the original configuration.")


def _set_aside(manager, steps):
  """Renames unreadable step directories so that new saves never collide with them."""
  if jax.process_index() == 0:
    for step in steps:
      path = os.path.join(str(manager.directory), str(step))
      target = f"{path}.unreadable"
      suffix = 1
      while os.path.exists(target):
        target, suffix = f"{path}.unreadable{suffix}", suffix + 1
      os.rename(path, target)
      logging.warning("Moved unreadable checkpoint %s to %s.", path, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("corinfomax_set_aside_unreadable_checkpoints")
  manager.reload()


# ---------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------
class MetricWriter:
  """Scalars to TensorBoard event files in the workdir, from process 0 only."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: dict) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in values.items():
        self._tf.summary.scalar(name, float(value), step=step)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def spectrum_summary(spectrum: objective.Spectrum, branch: int) -> dict:
  return {
      f"spectrum/effective_rank{branch}": spectrum.effective_rank,
      f"spectrum/max_eigenvalue{branch}": spectrum.max_eigenvalue,
      f"spectrum/min_eigenvalue{branch}": spectrum.min_eigenvalue,
      f"spectrum/num_below_1e-8_{branch}": spectrum.num_below,
      f"spectrum/num_above_1e-1_{branch}": spectrum.num_above,
  }


class _Preemption:
  """SIGTERM (a preemption notice) asks the loop to checkpoint and stop after a step.

  With one process a Python handler notes the signal. With several, every process must
  stop at the same step: JAX's distributed runtime receives the notice on any host and
  `reached_preemption_sync_point` agrees on the step, so no handler is installed.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: nothing to install or restore
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing this step, checkpointing, and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service in this runtime
      return False


# ---------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------
def total_steps(config, steps_per_epoch: int) -> int:
  steps = config.num_epochs * steps_per_epoch
  return steps if config.max_steps == -1 else min(steps, config.max_steps)


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Pretrains with CorInfoMax, resuming from the latest checkpoint in `workdir`."""
  # --- Configuration and mesh: every user error surfaces here, before any work.
  from corinfomax_jax import evaluate  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  validate_config(config)
  evaluate.validate_eval_config(config)
  mesh = make_mesh()
  check_batch_divides(config.batch_size, jax.device_count(), jax.process_count())

  # --- Input.
  source = input_pipeline.get_source(config.dataset, config.data_dir, config.train_split,
                                     skip_bad_images=config.skip_bad_images)
  steps_per_epoch = input_pipeline.steps_per_epoch(source.num_examples, config.batch_size)
  num_steps = total_steps(config, steps_per_epoch)
  logging.info("Data %s/%s: %d images, %d classes; %d steps of %d (%d per epoch).",
               config.dataset, config.train_split, source.num_examples, source.num_classes,
               num_steps, config.batch_size, steps_per_epoch)

  # --- Model, optimizer, state.
  model = create_model(config)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  tx = create_optimizer(config, learning_rate_fn)
  state = create_train_state(config, model, tx, mesh)

  # --- Checkpoint: resume where the workdir left off.
  os.makedirs(workdir, exist_ok=True)
  manager = create_checkpoint_manager(workdir, config)
  restored, run = restore_checkpoint(manager, state, config)
  spectra = []
  if restored is not None:
    state = restored
    spectra = [(s, np.asarray(e)) for s, e in run.get("spectra", [])]
    logging.info("Resumed from %s at step %d.", manager.directory, int(state.step))
  start_step = int(state.step)

  # --- Step and metrics.
  p_train_step = jit_train_step(config, model, tx, learning_rate_fn, mesh)
  spectrum_fn = jax.jit(lambda s: (objective.covariance_spectrum(s.cov1),
                                   objective.covariance_spectrum(s.cov2)))
  writer = MetricWriter(workdir)
  batches = input_pipeline.global_batches(
      input_pipeline.pretrain_batches(
          source, global_batch_size=config.batch_size, image_size=config.image_size,
          seed=config.seed, start_step=start_step, process_index=jax.process_index(),
          process_count=jax.process_count(), aug_config=aug_overrides(config)),
      NamedSharding(mesh, P(DATA_AXIS)))

  def record():
    return {**run_record(config),
            "spectra": [(s, e.tolist()) for s, e in spectra]}

  pending = []  # (step, metrics on device) since the last check

  def check_and_log(step, last_time):
    """Fetches the pending metrics, stops on a non-finite loss, logs the averages."""
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not np.isfinite(m["loss"]):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"The loss is {m['loss']} at step {s} (cov_loss {m['cov_loss']}, sim_loss "
            f"{m['sim_loss']}); training stopped without saving. The last good checkpoint "
            f"is step {manager.latest_step()} in {manager.directory}. Lower "
            "config.learning_rate or check the data.")
    now = time.time()
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    images_per_s = len(fetched) * config.batch_size / max(now - last_time, 1e-9)
    if jax.process_index() == 0:
      logging.info(
          "step %d/%d epoch %.2f loss %.4f cov_loss %.4f sim_loss %.6f lr %.5f "
          "images/s %.1f", step, num_steps, step / steps_per_epoch, mean["loss"],
          mean["cov_loss"], mean["sim_loss"], mean["learning_rate"], images_per_s)
    writer.scalars(step, {**{f"train/{k}": v for k, v in mean.items()},
                          "train/images_per_s": images_per_s,
                          "train/epoch": step / steps_per_epoch})
    pending.clear()
    return now

  last_time = time.time()
  step = start_step
  with _Preemption() as preemption:
    for step in range(start_step + 1, num_steps + 1):
      state, metrics = p_train_step(state, next(batches))
      pending.append((step, metrics))
      preempted = preemption.reached(step)
      is_last = step == num_steps or preempted
      if step % config.log_every_steps == 0 or is_last:
        last_time = check_and_log(step, last_time)
      if step % config.spectrum_every_steps == 0 or is_last:
        spec1, spec2 = jax.device_get(spectrum_fn(state.loss_state))
        writer.scalars(step, {**spectrum_summary(spec1, 1), **spectrum_summary(spec2, 2)})
        spectra.append((step, np.asarray(spec1.eigenvalues)))
      knn_every = config.eval.knn_every_epochs * steps_per_epoch
      if knn_every and (step % knn_every == 0 or is_last):
        knn = evaluate.knn_monitor(config, model, state, mesh)  # logs its result
        writer.scalars(step, {"knn/top1": knn["top1"], "knn/top5": knn["top5"]})
      if step % config.checkpoint_every_steps == 0 or is_last:
        if pending:
          last_time = check_and_log(step, last_time)
        save_checkpoint(manager, state, record())
      if preempted:
        logging.warning("Preempted: checkpoint at step %d written; exiting.", step)
        break
  manager.wait_until_finished()
  writer.close()
  if jax.process_index() == 0 and spectra:
    shown = [spectra[i] for i in sorted(set(np.linspace(0, len(spectra) - 1, 8).astype(int)))]
    path = evaluate.plot_spectra(shown, os.path.join(workdir, "spectrum.png"),
                                 title=f"{config.dataset}: covariance spectrum, branch 1")
    logging.info("Covariance spectrum plot: %s", path)
  return state
