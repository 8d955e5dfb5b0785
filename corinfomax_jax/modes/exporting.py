"""What leaves a run for other code: the backbone files (--mode=export) and the
features of a split (--mode=embed).
"""
from __future__ import annotations

import os
import shutil

import flax
import jax
import numpy as np
from absl import logging

from corinfomax_jax.run import configuration
from corinfomax_jax.run import encoder as encoder_lib
from corinfomax_jax.eval import evaluators
from corinfomax_jax.interop import torchvision as export
from corinfomax_jax import files
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.run import workdir as workdir_lib
from corinfomax_jax.errors import ConfigError

EXPORT_DIR = "export"
SAFETENSORS_FILE = "backbone.safetensors"
MSGPACK_FILE = "backbone.msgpack"
EMBEDDINGS_DIR = "embeddings"


def export_backbone(config, workdir: str) -> dict[str, str]:
  """--mode=export: the backbone of the latest checkpoint, for PyTorch and for Flax.

  Writes (process 0) DIR/export/backbone.safetensors: torchvision's resnet18/resnet50
  state_dict (no fc; BatchNorm running statistics and num_batches_tracked = the step),
  metadata {backbone, cifar_stem, width, step}; and DIR/export/backbone.msgpack:
  flax.serialization.to_bytes({"params", "batch_stats"}) of the backbone alone, which
  `flax.serialization.from_bytes` restores into `models.create_backbone(...)`'s variables.
  In PyTorch (width 64; inputs normalised as in pretraining, NCHW):

      import torch, torchvision
      from safetensors.torch import load_file
      net = torchvision.models.resnet18()  # or resnet50()
      net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # cifar_stem only
      net.maxpool = torch.nn.Identity()                         # cifar_stem only
      net.fc = torch.nn.Identity()
      net.load_state_dict(load_file("DIR/export/backbone.safetensors"), strict=True)
      features = net.eval()(images)  # == corinfomax_jax.load_encoder("DIR")(images_nhwc)

  Returns {"safetensors": path, "msgpack": path, "step": ...}.
  """
  del config  # the checkpoint's record describes the model
  workdir_lib.check_workdir(workdir, create=False)
  enc = encoder_lib.load_encoder(workdir)
  model = enc.config["model"]
  backbone = {k: enc.variables[k]["backbone"] for k in ("params", "batch_stats")}
  tensors = export.torchvision_state_dict(enc.variables, backbone=model["backbone"],
                                          cifar_stem=model["cifar_stem"],
                                          num_batches_tracked=enc.step)
  directory = files.as_path(workdir) / EXPORT_DIR
  paths = {"safetensors": str(directory / SAFETENSORS_FILE),
           "msgpack": str(directory / MSGPACK_FILE)}
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    export.save_safetensors(tensors, paths["safetensors"], metadata={
        "backbone": model["backbone"], "cifar_stem": str(model["cifar_stem"]),
        "width": str(model["width"]), "step": str(enc.step)})
    files.write_bytes(paths["msgpack"],
                      flax.serialization.to_bytes(jax.device_get(backbone)))
    logging.info("Exported the backbone of step %d (%s, cifar_stem=%s, width %d) to %s "
                 "and %s.", enc.step, model["backbone"], model["cifar_stem"],
                 model["width"], *paths.values())
  return {**paths, "step": enc.step}


def embed_split(config) -> str:
  """The split --mode=embed reads: config.eval.embed_split, else config.eval_split."""
  return config.eval.embed_split or config.eval_split


def embed(config, workdir: str) -> str:
  """--mode=embed: backbone features of a split to DIR/embeddings/<split>.npz.

  The npz holds features float32 [n, dim], labels int32 [n] and index int64 [n] (the
  example's index in the source, i.e. its position in the sorted file list of an image
  folder or in the TFDS split; for a streamed TFDS split, its order of arrival).
  Centre crops through the latest checkpoint's backbone in inference mode, in global
  batches of config.eval.batch_size sharded over all devices (evaluators.feature_batches).
  So that 1.28M x 2048 features (10.5 GB) need not fit in memory, process 0 writes each
  gathered batch straight into three .npy files (np.lib.format.open_memmap) under
  DIR/embeddings/<split>.parts/ (under TMPDIR when DIR is a URL), then stores them
  uncompressed into the .npz (np.savez copies a memory-mapped array in 16 MiB pieces)
  and removes them: host memory holds one batch, the disk briefly twice the result; for
  a URL the npz is then uploaded.
  `np.load(path, mmap_mode=...)` does not map npz members; np.load(path)["features"]
  reads that array. Returns the npz path.
  """
  workdir_lib.check_workdir(workdir, create=False)
  configuration.validate_config(config)
  mesh_lib.check_batch_divides(config.eval.batch_size, jax.device_count(),
                               jax.process_count(), key="eval.batch_size")
  enc = encoder_lib.load_encoder(workdir)  # fails now when there is no checkpoint
  if enc.config["model"] != configuration.model_record(config):
    raise ConfigError(
        f"The checkpoint in {workdir!r} was written by config.model "
        f"{enc.config['model']}, not {configuration.model_record(config)}: use the "
        "pretraining configuration.")
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  split = embed_split(config)
  source = sources.get_source(config.dataset, config.data_dir, split,
                              skip_bad_images=config.skip_bad_images)
  mesh = mesh_lib.make_mesh()
  variables = jax.device_put(enc.variables, mesh_lib.replicated(mesh))
  n, dim = source.num_examples, enc.feature_dim
  directory = files.as_path(workdir) / EMBEDDINGS_DIR
  path = directory / f"{split}.npz"
  writer = jax.process_index() == 0
  if writer:
    # Memory maps need a local disk: beside the result, or under TMPDIR for a URL.
    parts = files.scratch_dir(directory / f"{split}.parts")
    arrays = {
        name: np.lib.format.open_memmap(os.path.join(parts, f"{name}.npy"), mode="w+",
                                        dtype=dtype, shape=shape)
        for name, dtype, shape in (("features", np.float32, (n, dim)),
                                   ("labels", np.int32, (n,)),
                                   ("index", np.int64, (n,)))}
  count = 0
  for feats, labels, index in evaluators.feature_batches(
      enc.model, variables, mesh, source, batch_size=config.eval.batch_size,
      image_size=config.image_size, aug_config=configuration.aug_overrides(config)):
    if writer:
      for name, rows in (("features", feats), ("labels", labels), ("index", index)):
        arrays[name][count:count + len(rows)] = rows
    count += len(labels)
  if writer:
    tmp = os.path.join(parts, f"{split}.npz")
    with open(tmp, "wb") as f:
      # np.savez copies each (memory-mapped) array in 16 MiB pieces; [:count] drops the
      # rows of images skipped as unreadable.
      np.savez(f, **{name: array[:count] for name, array in arrays.items()})
    arrays.clear()  # unmaps the .npy files
    files.move_local_file(tmp, path)
    shutil.rmtree(parts)
    logging.info("Features of %d %s %s images (dim %d, checkpoint step %d) written to "
                 "%s.", count, config.dataset, split, dim, enc.step, path)
  return str(path)
