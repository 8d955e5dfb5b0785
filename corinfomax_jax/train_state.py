"""The pretraining state: what it holds, how it is created, and how it is read back.

Pretraining writes it; the evaluation and fine-tuning modes read it. The state is one
pytree and a checkpoint is exactly that pytree (plus a JSON record).
"""
from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from corinfomax_jax import checkpoints
from corinfomax_jax import configuration
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax import models
from corinfomax_jax import objective
from corinfomax_jax.errors import ConfigError


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step; a checkpoint is exactly this pytree."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_state: objective.CorInfoMaxState


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
  dim = models.parse_projector(config.model.projector)[-1]

  def init(rng):
    image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    _, init_rng = jax.random.split(rng)  # the initialisation of earlier versions
    variables = model.init({"params": init_rng}, image, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params),
                      loss_state=objective.init_state(dim, config.r_init))

  return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(
      jax.random.PRNGKey(config.seed))


def initial_state(config, model, mesh) -> TrainState:
  """The seeded initial state: the random network, and the checkpoint template."""
  # Only the optimizer state's structure matters here, not the schedule's length.
  tx = create_optimizer(config, create_learning_rate_fn(config, 1))
  return create_train_state(config, model, tx, mesh)


def backbone_variables(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


# --- Checkpoints of the train state. -------------------------------------------------
def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_checkpoint_manager(workdir: str, config):
  return checkpoints.create_manager(checkpoint_dir(workdir), keep=config.keep_checkpoints)


def checkpoint_record(config) -> dict:
  """What a checkpoint says about the run that wrote it (load_encoder reads "model").

  "data" (the data set, hence its normalisation, and the image size) is informative:
  a resumed run is not checked against it.
  """
  return {"model": configuration.model_record(config), "optimizer": config.optimizer,
          "data": {"dataset": config.dataset, "image_size": config.image_size}}


def restore(manager, template: TrainState, config, *, set_aside: bool = True):
  """(state, record) of the latest usable checkpoint, or (None, None); see checkpoints."""
  expected = checkpoint_record(config)

  def check(record, step):
    checkpoints.check_same(record.get("model", {}), expected["model"], step,
                           manager.directory, "model.")
    checkpoints.check_same(record, {"optimizer": expected["optimizer"]}, step,
                           manager.directory)

  return checkpoints.restore_latest(manager, template, check, set_aside=set_aside)


def load_pretrained(config, model, mesh, workdir: str, hint: str = "") -> TrainState:
  """The latest pretraining checkpoint of `workdir`; ConfigError when there is none."""
  directory = checkpoint_dir(workdir)
  missing = ConfigError(
      f"No pretraining checkpoint in workdir {workdir!r} (looked in {directory}). "
      f"Pretrain first with --mode=pretrain and this --workdir{hint}.")
  if not os.path.isdir(directory):
    raise missing
  template = initial_state(config, model, mesh)
  manager = create_checkpoint_manager(workdir, config)
  try:
    state, _ = restore(manager, template, config, set_aside=False)
  finally:
    manager.close()
  if state is None:
    raise missing
  logging.info("Loaded the pretraining checkpoint of step %d from %s.", int(state.step),
               directory)
  return state
