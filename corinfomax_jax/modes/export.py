"""--mode=export: the backbone of the latest checkpoint, for PyTorch and for Flax.

Writes (process 0) DIR/export/backbone.safetensors: torchvision's resnet18/resnet50
state_dict (no fc; BatchNorm running statistics; num_batches_tracked = the step, plus
an imported backbone's own), metadata {backbone, cifar_stem, width, step,
preprocessing, preprocessing.mean, preprocessing.std, preprocessing.resize,
preprocessing.crop} (JSON strings; the evaluation input: model_card.preprocessing); and
DIR/export/backbone.msgpack: flax.serialization.to_bytes({"params", "batch_stats"}) of
the backbone alone, which `flax.serialization.from_bytes` restores into
`models.create_backbone(...)`'s variables. In PyTorch (width 64; inputs normalised as
in pretraining, NCHW):

    import torch, torchvision
    from safetensors.torch import load_file
    net = torchvision.models.resnet18()  # or resnet50()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # cifar_stem only
    net.maxpool = torch.nn.Identity()                         # cifar_stem only
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file("DIR/export/backbone.safetensors"), strict=True)
    features = net.eval()(images)  # == corinfomax_jax.load_encoder("DIR")(images_nhwc)

Beside them, DIR/export/README.md, the model card (interop.model_card): method,
hyperparameters, data and its licence, steps and epochs, the evaluations found in the
workdir, the spectrum, the files' sha256, the preprocessing (also in the safetensors
metadata, as JSON under "preprocessing") and these loading snippets. A backbone other
than a ResNet (a ViT) is refused in one line (`check_exportable`).
"""
from __future__ import annotations

import hashlib
import json

import flax
import jax
from absl import logging

from corinfomax_jax import files
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.interop import model_card
from corinfomax_jax.interop import torchvision as export
from corinfomax_jax.modes import finetune
from corinfomax_jax.modes import knn_eval
from corinfomax_jax.modes import linear_eval
from corinfomax_jax.models import resnet
from corinfomax_jax.modes import startup
from corinfomax_jax.run import run_record
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import encoder as encoder_lib
from corinfomax_jax.run import train_state as train_state_lib

EXPORT_DIR = "export"
SAFETENSORS_FILE = "backbone.safetensors"
MSGPACK_FILE = "backbone.msgpack"
CARD_FILE = "README.md"
# The evaluations a model card lists: {name: the result file its mode writes}.
EVALUATIONS = {"knn": knn_eval.RESULT_FILE, "linear": linear_eval.LINEAR_RESULT_FILE,
               "finetune": finetune.FINETUNE_RESULT_FILE}


def _read_json(path):
  return json.loads(path.read_text()) if path.exists() else None


def _evaluations(root) -> dict:
  """{name: result} of the evaluations in the workdir `root`: EVALUATIONS, and each
  fine-tuning written to another config.eval.finetune.subdir as "finetune:<subdir>"
  (its <subdir>.json records its subdir)."""
  found = {name: _read_json(root / f) for name, f in EVALUATIONS.items()}
  for path in sorted(root.glob("*.json")):
    if path.name in EVALUATIONS.values() or path.name == run_record.RECORD:
      continue
    try:
      result = json.loads(path.read_text())
    except ValueError:
      continue
    if isinstance(result, dict) and result.get("subdir") == path.stem:
      found[f"finetune:{path.stem}"] = result
  return found


def batches_tracked(enc: encoder_lib.Encoder) -> int | dict[str, int]:
  """The BatchNorms' num_batches_tracked: the steps trained, plus those of a backbone
  imported with --mode=import (so that an import exports as it came)."""
  imported = enc.config.get(train_state_lib.IMPORTED, {}).get("num_batches_tracked", 0)
  if isinstance(imported, dict):
    return {key: value + enc.step for key, value in imported.items()}
  return imported + enc.step


def check_exportable(backbone: str) -> None:
  """ConfigError (one line) for a backbone without a torchvision layout: a ViT is not
  written in timm's layout; it is read with corinfomax_jax.load_encoder (docs/vit.md)."""
  if backbone not in resnet.RESNETS:
    raise ConfigError(
        f"--mode=export writes torchvision's ResNet layout ({', '.join(sorted(resnet.RESNETS))}"
        f"); backbone {backbone!r} has none and is not exported: read it with "
        "corinfomax_jax.load_encoder(workdir) (its .variables are the Flax parameters)")


def export_backbone(config, workdir: str) -> dict[str, str]:
  """--mode=export: the latest checkpoint's backbone as DIR/export/backbone.safetensors
  and .msgpack, with its model card README.md (the module docstring says what each
  holds); returns {"safetensors": path, "msgpack": path, "card": path, "step": ...}."""
  # The checkpoint's record describes the model; the configuration is checked as in
  # every mode, and the workdir must hold the pretraining.
  run, _ = startup.begin(config, workdir, create_workdir=False,
                         checks=(lambda r: check_exportable(r.model.kwargs["backbone"]),))
  enc = encoder_lib.load_encoder(workdir)
  model = enc.config["model"]
  check_exportable(model["backbone"])
  backbone = {k: enc.variables[k]["backbone"] for k in ("params", "batch_stats")}
  tensors = export.torchvision_state_dict(enc.variables, backbone=model["backbone"],
                                          cifar_stem=model.get("cifar_stem"),
                                          num_batches_tracked=batches_tracked(enc))
  root = files.as_path(workdir)
  directory = root / EXPORT_DIR
  paths = {"safetensors": str(directory / SAFETENSORS_FILE),
           "msgpack": str(directory / MSGPACK_FILE), "card": str(directory / CARD_FILE)}
  prep = model_card.preprocessing(mean=run.data.mean, std=run.data.std,
                                  image_size=run.data.image_size,
                                  test_resize_ratio=run.data.recipe["test_resize_ratio"])
  if jax.process_index() == 0:
    _write(run, enc, root, backbone, tensors, paths, prep)
  return {**paths, "step": enc.step}


def _write(run: settings_lib.Settings, enc: encoder_lib.Encoder, root, backbone: dict,
           tensors: dict, paths: dict[str, str], prep: dict) -> None:
  """Writes the safetensors, the msgpack and the model card (of the workdir `root`'s
  evaluations) to `paths`."""
  model = enc.config["model"]
  (root / EXPORT_DIR).mkdir(parents=True, exist_ok=True)
  export.save_safetensors(tensors, paths["safetensors"], metadata={
      "backbone": model["backbone"], "cifar_stem": str(model["cifar_stem"]),
      "width": str(model["width"]), "step": str(enc.step),
      **model_card.metadata(prep)})
  msgpack = flax.serialization.to_bytes(jax.device_get(backbone))
  files.write_bytes(paths["msgpack"], msgpack)
  saved = _read_json(root / run_record.RECORD)
  if saved is not None:  # a record of an earlier version: its keys in their new places
    saved = settings_lib.moved_keys_applied(saved)
  card = model_card.model_card(
      record=enc.config, config=saved or run.record,
      config_source=f"the workdir's {run_record.RECORD}" if saved else
      "this export's configuration (the workdir has no config.json)",
      step=enc.step,
      evaluations=_evaluations(root),
      files={"safetensors": SAFETENSORS_FILE, "msgpack": MSGPACK_FILE},
      sha256={SAFETENSORS_FILE: hashlib.sha256(
                  files.as_path(paths["safetensors"]).read_bytes()).hexdigest(),
              MSGPACK_FILE: hashlib.sha256(msgpack).hexdigest()},
      prep=prep)
  files.write_text(paths["card"], card)
  logging.info("Exported the backbone of step %d (%s, cifar_stem=%s, width %d) to %s "
               "and %s, its model card to %s.", enc.step, model["backbone"],
               model["cifar_stem"], model["width"], paths["safetensors"],
               paths["msgpack"], paths["card"])
