"""The trained backbone as a plain function: `load_encoder(workdir)`.

    enc = corinfomax_jax.load_encoder("DIR")          # latest checkpoint, or step=N
    features = enc(images)   # (N, H, W, 3) float32, normalised as in pretraining (other
                             # dtypes, uint8 pixels among them, are refused)
                             # -> (N, 512 or 2048) numpy float32, BatchNorm in eval mode
    enc.model, enc.variables, enc.config, enc.step     # for Flax users

The checkpoint is read as saved (its shapes from its own metadata, the model from its
record's model keys), so neither the run's configuration file, a mesh, ml_collections
nor TensorFlow is needed; its "params" / "batch_stats" are kept. The variables are
replicated over this process's devices and each call's batch is split over them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from absl import logging

from corinfomax_jax.data import augment
from corinfomax_jax.run import checkpoints
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax import models
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """The pooled backbone features of a pretraining checkpoint; see the module docstring."""
  model: models.CorInfoMaxModel
  variables: dict  # {"params", "batch_stats"} of the whole model (backbone + projector)
  config: dict  # the checkpoint's record: {"model": create_model kwargs, ...}
  step: int

  @property
  def feature_dim(self) -> int:
    # At the pretraining's image size: a ViT's patch must divide it.
    size = self.config.get("data", {}).get("image_size", 32)
    return models.feature_dim(self.model, size)

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype.kind != "f":
      # uint8 pixels cast as they are would give features of unnormalised images.
      dataset = self.config.get("data", {}).get("dataset", "cifar10")
      raise ValueError(
          f"images must be normalised floats, (pixels / 255 - mean) / std with the mean "
          f"and std of pretraining; got dtype {images.dtype}. For uint8 pixels pass "
          f"corinfomax_jax.augment.normalize_uint8(images, *corinfomax_jax."
          f"augment.normalization_stats({dataset!r})), or the config.aug.mean and std "
          "the run set.")
    images = images.astype(np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (N, H, W, 3) float32 NHWC; got {images.shape}")
    devices = len(self._mesh.devices.flat)
    n = images.shape[0]
    padded = np.pad(images, [(0, -n % devices)] + [(0, 0)] * 3)
    batch = jax.device_put(padded, mesh_lib.batch_sharded(self._mesh))
    return np.asarray(features_fn(self.model, self._mesh)(self.variables, batch))[:n]

  @functools.cached_property
  def _mesh(self) -> jax.sharding.Mesh:
    return mesh_lib.make_mesh(jax.local_devices())


@functools.lru_cache(maxsize=None)
def features_fn(model, mesh: jax.sharding.Mesh, normalization=None):
  """The backbone's pooled features of a global batch, jitted over `mesh` (cached).

  (variables, images) -> (N, feature_dim) float32, BatchNorm in inference mode, the
  batch sharded over the mesh's "data" axis. normalization None: images are normalised
  float32; (mean, std): images are uint8, normalised on the device. The one feature
  function of load_encoder, the evaluators, export and embed.
  """
  def features(variables, images):
    if normalization is not None:
      images = augment.normalize_uint8(images, *normalization)
    return model.apply(variables, images, train=False)[0]  # XLA drops the projector
  return jax.jit(features, in_shardings=(mesh_lib.replicated(mesh),
                                         mesh_lib.batch_sharded(mesh)),
                 out_shardings=mesh_lib.batch_sharded(mesh))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished pretraining checkpoints in `workdir`, ascending."""
  directory = train_state_lib.checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir()
                if d.name.isdigit() and (d / "state").is_dir())


def load_encoder(workdir: str, step: int | None = None) -> Encoder:
  """The backbone of the pretraining checkpoint of `workdir` (latest, or `step`).

  The latest checkpoint is the latest readable one, as every mode picks it
  (checkpoints.restore_latest): a damaged newer step is skipped with one warning line.
  Nothing in the workdir changes.

  Args:
    workdir: the pretraining run's --workdir (a local path or a URL).
    step: a checkpoint step to read instead of the latest.

  Returns:
    The Encoder of that checkpoint.

  Raises:
    ConfigError: (one line) there is no checkpoint, no such step, or none (or not
      `step`) reads: the directory, the step(s) and the damage are named.
  """
  if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
    raise ConfigError(f"load_encoder: step = {step!r} is invalid: expected an integer "
                      f"checkpoint step (e.g. step=2) or None for the latest; got a "
                      f"{type(step).__name__}.")
  directory = train_state_lib.checkpoint_dir(workdir)
  missing = ConfigError(f"No pretraining checkpoint in workdir {workdir!r} (looked in "
                        f"{directory}). Pretrain first with --mode=pretrain.")
  if not directory.is_dir():
    raise missing
  manager = checkpoints.open_reader(directory)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise missing
    if step is not None and int(step) not in steps:
      raise ConfigError(f"No pretraining checkpoint of step {step} in {directory}; "
                        f"its steps are {steps}.")
    # The whole state is read, not only the backbone: a checkpoint reads here exactly
    # when it reads for the modes that restore the train state.
    state, record = checkpoints.restore_latest(manager, None, lambda record, step: None,
                                               set_aside=False,
                                               step=None if step is None else int(step))
  finally:
    manager.close()
  model = models.create_model(**record["model"])
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  encoder = Encoder(model=model, variables=variables, config=record,
                    step=int(state["step"]))
  # A writer may be adding checkpoints beside a reader: say which one was read.
  logging.info("Read the backbone of the checkpoint of step %d in %s.", encoder.step,
               directory)
  return encoder
