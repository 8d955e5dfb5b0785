"""--mode=export: the backbone of the latest checkpoint, for PyTorch and for Flax."""
from __future__ import annotations

import flax
import jax
from absl import logging

from corinfomax_jax import files
from corinfomax_jax.interop import torchvision as export
from corinfomax_jax.modes import startup
from corinfomax_jax.run import encoder as encoder_lib
from corinfomax_jax.run import train_state as train_state_lib

EXPORT_DIR = "export"
SAFETENSORS_FILE = "backbone.safetensors"
MSGPACK_FILE = "backbone.msgpack"


def batches_tracked(enc: encoder_lib.Encoder) -> int | dict[str, int]:
  """The BatchNorms' num_batches_tracked: the steps trained, plus those of a backbone
  imported with --mode=import (so that an import exports as it came)."""
  imported = enc.config.get(train_state_lib.IMPORTED, {}).get("num_batches_tracked", 0)
  if isinstance(imported, dict):
    return {key: value + enc.step for key, value in imported.items()}
  return imported + enc.step


def export_backbone(config, workdir: str) -> dict[str, str]:
  """--mode=export: the backbone of the latest checkpoint, for PyTorch and for Flax.

  Writes (process 0) DIR/export/backbone.safetensors: torchvision's resnet18/resnet50
  state_dict (no fc; BatchNorm running statistics; num_batches_tracked = the step, plus
  an imported backbone's own),
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
  # The checkpoint's record describes the model; the configuration is checked as in
  # every mode, and the workdir must hold the pretraining.
  startup.begin(config, workdir, create_workdir=False)
  enc = encoder_lib.load_encoder(workdir)
  model = enc.config["model"]
  backbone = {k: enc.variables[k]["backbone"] for k in ("params", "batch_stats")}
  tensors = export.torchvision_state_dict(enc.variables, backbone=model["backbone"],
                                          cifar_stem=model.get("cifar_stem"),
                                          num_batches_tracked=batches_tracked(enc))
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
