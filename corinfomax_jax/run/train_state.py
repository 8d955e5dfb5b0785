"""The pretraining state: what it holds, how it is created, and how it is read back.

Pretraining writes it; the evaluation and fine-tuning modes read it. The state is one
pytree and a checkpoint is exactly that pytree (plus a JSON record).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath

from corinfomax_jax import models
from corinfomax_jax.run import checkpoints
from corinfomax_jax.run import optimizers
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax import files
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.errors import ConfigError


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step; a checkpoint is exactly this pytree."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_state: Any  # the method's state (methods.Method.init_state), e.g. CorInfoMaxState
  # The online linear probe {"params", "opt_state"} (eval.online_probe.enabled), or {}
  # when off: no leaves, so a checkpoint without a probe has the same arrays as before.
  probe: Any = flax.struct.field(default_factory=dict)


def peak_learning_rate(opt: settings_lib.Optimizer) -> float:
  """The paper's learning rate, scaled linearly from its batch size to ours."""
  return opt.learning_rate * opt.batch_size / opt.base_batch_size


def create_learning_rate_fn(opt: settings_lib.Optimizer,
                            steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from warmup_start_lr to the peak, then cosine to min_learning_rate."""
  peak = peak_learning_rate(opt)
  warmup_steps = int(opt.warmup_epochs * steps_per_epoch)
  decay_steps = max(opt.num_epochs * steps_per_epoch - warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(peak, decay_steps,
                                       alpha=min(opt.min_learning_rate / peak, 1.0))
  if warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(opt.warmup_start_lr, peak, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def _is_matrix(params):
  """True for weights, False for biases and normalisation parameters (1-D)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


sgd = optimizers.sgd  # the one SGD of every mode

# Checkpoint records name their optimizer; records without "optimizer_version" come from
# versions in which "lars" meant optax.lars, now "lars_optax".
OPTIMIZER_VERSION = 2


def recorded_optimizer(record: dict) -> str | None:
  """The optimizer (a config.optimizer value) that wrote a checkpoint's `record`."""
  name = record.get("optimizer")
  if name == "lars" and record.get("optimizer_version", 1) < OPTIMIZER_VERSION:
    return "lars_optax"
  return name


def create_optimizer(opt: settings_lib.Optimizer, learning_rate_fn,
                     name: str | None = None) -> optax.GradientTransformation:
  """The pretraining optimizer `name` (default `opt.name`): "sgd" (the paper's),
  "lars" (solo-learn's, optimizers.lars), "lars_optax" (optax.lars, with biases and
  normalisation parameters masked out) or "adamw" (optimizers.adamw, for ViTs); its
  gradients clipped to a global norm of opt.grad_clip_norm when that is > 0."""
  name = name or opt.name
  if name == "sgd":
    tx = sgd(learning_rate_fn, momentum=opt.momentum, weight_decay=opt.weight_decay)
  elif name == "lars":
    tx = optimizers.lars(learning_rate_fn, weight_decay=opt.weight_decay,
                         momentum=opt.momentum, eta=opt.lars_eta, clip_lr=True)
  elif name == "adamw":
    tx = optimizers.adamw(learning_rate_fn, weight_decay=opt.weight_decay,
                          b1=opt.adam_b1, b2=opt.adam_b2)
  else:
    tx = optax.lars(learning_rate_fn, weight_decay=opt.weight_decay,
                    weight_decay_mask=_is_matrix, trust_coefficient=opt.lars_eta,
                    trust_ratio_mask=_is_matrix, momentum=opt.momentum)
  return optimizers.clipped(tx, opt.grad_clip_norm) if opt.grad_clip_norm > 0 else tx


def online_probe_optimizer(probe: settings_lib.OnlineProbe) -> optax.GradientTransformation:
  """The online probe's own optimizer: SGD momentum 0.9 at the constant `probe.lr`."""
  return sgd(probe.lr, momentum=0.9)


def online_probe_classes(probe: settings_lib.OnlineProbe, num_classes: int) -> int:
  """The online probe's classes: num_classes when the probe is enabled, else 0."""
  return num_classes if probe.enabled else 0


def create_train_state(run: settings_lib.Settings, model, tx, mesh, *,
                       probe_classes: int = 0) -> TrainState:
  """The initial state, created directly with its (replicated) sharding.

  Reads the seed, the image size, the method (its initial loss state) and the online
  probe's settings of `run`. probe_classes > 0 adds the online probe (a
  zero-initialised Dense on the pooled features, as solo-learn's); 0 leaves `probe`
  empty.
  """
  dim = run.model.output_dim
  size = run.data.image_size
  probe_tx = online_probe_optimizer(run.eval.online_probe)

  def init(rng):
    image = jnp.zeros((1, size, size, 3), jnp.float32)
    _, init_rng = jax.random.split(rng)  # the initialisation of earlier versions
    variables = model.init({"params": init_rng}, image, train=False)
    params = variables["params"]
    probe = {}
    if probe_classes:
      probe_params = models.init_linear_head(models.feature_dim(model, size),
                                             probe_classes, init="zeros")
      probe = {"params": probe_params,
               "opt_state": probe_tx.init(probe_params)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params),
                      loss_state=run.method.init_state(dim), probe=probe)

  return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(
      jax.random.PRNGKey(run.seed))


def initial_state(run: settings_lib.Settings, model, mesh, *,
                  probe_classes: int = 0, optimizer: str | None = None) -> TrainState:
  """The seeded initial state: the random network, and the checkpoint template (with
  the state of `optimizer`, default the configured one)."""
  # Only the optimizer state's structure matters here, not the schedule's length.
  tx = create_optimizer(run.optimizer, create_learning_rate_fn(run.optimizer, 1),
                        optimizer)
  return create_train_state(run, model, tx, mesh, probe_classes=probe_classes)


def backbone_variables(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


# --- Checkpoints of the train state. -------------------------------------------------
def checkpoint_dir(workdir: str) -> epath.Path:
  """workdir/checkpoints as an epath Path (workdir a local path or a URL)."""
  return files.as_path(workdir) / "checkpoints"


def create_checkpoint_manager(workdir: str, keep: int = 3):
  return checkpoints.create_manager(checkpoint_dir(workdir), keep=keep)


# The record's entry naming the file a backbone was imported from (--mode=import):
# {path, sha256, source, keys, read, ignored, left_out, num_batches_tracked}. Every
# later checkpoint of the run carries it on.
IMPORTED = "imported"


def checkpoint_record(run: settings_lib.Settings, probe_classes: int = 0) -> dict:
  """What a checkpoint says about the run that wrote it (load_encoder reads "model").

  "method" names the objective whose state the checkpoint holds (absent in checkpoints
  of earlier versions, which are all CorInfoMax); "online_probe_classes" says whether
  the state holds an online probe (and its size); "data" (the data set, hence its
  normalisation, and the image size) is informative: a resumed run is not checked
  against it.
  """
  return {"model": run.model.record(), "optimizer": run.optimizer.name,
          "optimizer_version": OPTIMIZER_VERSION, "method": run.method.name,
          "online_probe_classes": probe_classes,
          "data": {"dataset": run.data.dataset, "image_size": run.data.image_size}}


def _record_check(run: settings_lib.Settings, directory, probe_classes: int | None):
  """check_record(record, step) for checkpoints.restore_latest: ConfigError for a
  checkpoint of another model, method or online-probe setting, and for a writer
  (probe_classes not None) of another optimizer."""
  expected = checkpoint_record(run, probe_classes or 0)

  def check(record, step):
    checkpoints.check_same(record.get("model", {}), expected["model"], step,
                           directory, "model.")
    checkpoints.check_same({"method": record.get("method", "corinfomax")},
                           {"method": expected["method"]}, step, directory)
    if probe_classes is not None:  # a writer continues the optimizer it finds
      _check_optimizer(record, run.optimizer.name, step, directory)
    if probe_classes is not None and record.get("online_probe_classes", 0) != probe_classes:
      raise ConfigError(
          f"The checkpoint of step {step} in {directory} was written with "
          f"config.eval.online_probe.enabled={bool(record.get('online_probe_classes'))}, this "
          f"run has {bool(probe_classes)}: a resumed run keeps the probe setting. Use "
          "the original setting, or another --workdir.")

  return check


def check_resume(manager, run: settings_lib.Settings, *, probe_classes: int = 0) -> None:
  """ConfigError now, before the state is created (compiled), for a resume that
  `restore` would refuse: a checkpoint of another model, method, optimizer or probe."""
  checkpoints.check_latest_record(manager, _record_check(run, manager.directory,
                                                         probe_classes))


def restore(manager, template, run: settings_lib.Settings, *, set_aside: bool = True,
            probe_classes: int | None = 0, check_state=None):
  """(state, record) of the latest usable checkpoint, or (None, None); see checkpoints.

  `template` is a TrainState or a function of the checkpoint's record that returns
  one. probe_classes None: any online probe and any optimizer (a reader of the
  backbone). check_state: see checkpoints.restore_latest (None: finite parameters).
  """
  check = _record_check(run, manager.directory, probe_classes)

  def template_for(record):
    state = template(record) if callable(template) else template
    if "online_probe_classes" in record:
      return state
    # Written before the online probe existed: the saved tree has no "probe" entry.
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name != "probe"}

  state, record = checkpoints.restore_latest(manager, template_for, check,
                                             set_aside=set_aside, check_state=check_state)
  if isinstance(state, dict):
    state = TrainState(**state)
  return state, record


def _check_optimizer(record: dict, name: str, step: int, directory) -> None:
  """ConfigError when the checkpoint's optimizer is not `name` (config.optimizer)."""
  saved = recorded_optimizer(record)
  if saved is None or saved == name:
    return
  if saved == "lars_optax" and name == "lars":
    raise ConfigError(
        f"The checkpoint of step {step} in {directory} was written with optax's LARS, "
        "which config.optimizer='lars' meant in earlier versions (now solo-learn's LARS). "
        "Resume it with --config.optimizer=lars_optax, or use another --workdir.")
  checkpoints.check_same({"optimizer": saved}, {"optimizer": name}, step, directory)


def load_pretrained(run: settings_lib.Settings, model, mesh, workdir: str,
                    hint: str = "") -> TrainState:
  """The latest readable pretraining checkpoint of `workdir` (checkpoints.restore_latest
  picks it, as for every mode); ConfigError when there is none. Changes nothing there."""
  directory = checkpoint_dir(workdir)
  missing = ConfigError(
      f"No pretraining checkpoint in workdir {workdir!r} (looked in {directory}). "
      f"Pretrain first with --mode=pretrain and this --workdir{hint}.")
  if not directory.is_dir():
    raise missing
  template = lambda record: initial_state(
      run, model, mesh, probe_classes=record.get("online_probe_classes", 0),
      optimizer=recorded_optimizer(record) or run.optimizer.name)
  manager = checkpoints.open_reader(directory)
  try:
    state, _ = restore(manager, template, run, set_aside=False, probe_classes=None)
  finally:
    manager.close()
  if state is None:
    raise missing
  logging.info("Loaded the pretraining checkpoint of step %d from %s.", int(state.step),
               directory)
  return state
