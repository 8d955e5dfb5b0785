"""The trained backbone as a plain function: `load_encoder(workdir)`.

    enc = corinfomax_jax.load_encoder("DIR")          # latest checkpoint, or step=N
    features = enc(images)   # (N, H, W, 3) float32, normalised as in pretraining
                             # -> (N, 512 or 2048) numpy float32, BatchNorm in eval mode
    enc.model, enc.variables, enc.config, enc.step     # for Flax users

Only the model keys of the checkpoint's record and the "params" / "batch_stats"
subtrees of its state are read (orbax partial restore), so neither the run's
configuration file, a mesh, ml_collections nor TensorFlow is needed. The variables are
replicated over this process's devices and each call's batch is split over them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
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
    return models.feature_dim(self.model)

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
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


def _read_record(directory, step: int) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(directory, item_names=("state", "run"))
  try:
    return manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
  finally:
    manager.close()


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished pretraining checkpoints in `workdir`, ascending."""
  directory = train_state_lib.checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir()
                if d.name.isdigit() and (d / "state").is_dir())


def load_encoder(workdir: str, step: int | None = None) -> Encoder:
  """The backbone of the pretraining checkpoint of `workdir` (latest, or `step`).

  Raises ConfigError when there is no such checkpoint.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = checkpoint_steps(workdir)
  directory = train_state_lib.checkpoint_dir(workdir)
  if not steps:
    raise ConfigError(f"No pretraining checkpoint in workdir {workdir!r} (looked in "
                      f"{directory}). Pretrain first with --mode=pretrain.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"No pretraining checkpoint of step {step} in {directory}; "
                      f"its steps are {steps}.")
  record = _read_record(directory, step)
  if record.get("format") != checkpoints.FORMAT:
    raise ConfigError(f"The checkpoint of step {step} in {directory} has format "
                      f"{record.get('format', 1)}; this version reads format "
                      f"{checkpoints.FORMAT}.")
  model = models.create_model(**record["model"])
  size = 32  # parameter shapes do not depend on the image size (global pooling)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, 3)), train=False))
  mesh = mesh_lib.make_mesh(jax.local_devices())
  replicated = mesh_lib.replicated(mesh)
  abstract = {k: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                             sharding=replicated), shapes[k])
              for k in ("params", "batch_stats")}
  abstract["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  restored = _restore_subtrees(directory / str(step) / "state", abstract, ocp)
  variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
  encoder = Encoder(model=model, variables=variables, config=record,
                    step=int(restored["step"]))
  # A writer may be adding checkpoints beside a reader: say which one was read.
  logging.info("Read the backbone of the checkpoint of step %d in %s.", encoder.step,
               directory)
  return encoder


def _restore_subtrees(path, abstract: Any, ocp) -> dict:
  """The subtrees of the state pytree at `path` that `abstract` names (partial restore)."""
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  finally:
    checkpointer.close()
