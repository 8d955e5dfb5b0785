"""--mode=import: a torchvision-layout backbone from a file, as a pretraining workdir.

    python main.py --mode=import --config=configs/imagenet100_r50.py --workdir=W \
        --weights=resnet50.pth

writes the checkpoint of step 0 that pretraining would have written, with the file's
backbone (weights and BatchNorm running statistics) in place of the random one; the
projector, the method's state and the optimizer's are the config's seeded fresh ones.
Every mode reads the workdir as it reads a pretraining's, and --mode=pretrain continues
from it. The checkpoint's record (and W/import.json) says where the weights came from.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.interop import torchvision
from corinfomax_jax.interop import weights_files
from corinfomax_jax.models import resnet
from corinfomax_jax.modes import startup
from corinfomax_jax.run import checkpoints
from corinfomax_jax.run import run_record
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir_lock

RESULT = "import.json"


def _probe_classes(run) -> int:
  """The online probe's classes (0 when off): a continued pretraining must agree."""
  if not run.eval.online_probe.enabled:
    return 0
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.get_source(run.data.dataset, run.data.data_dir, run.data.train_split,
                              skip_bad_images=run.data.skip_bad_images)
  return train_state_lib.online_probe_classes(run.eval.online_probe, source.num_classes)


def check_importable(run) -> None:
  """ConfigError (one line) for a backbone without a torchvision layout (a ViT)."""
  backbone = run.model.kwargs["backbone"]
  if backbone not in resnet.RESNETS:
    raise ConfigError(
        f"--mode=import reads torchvision ResNet weights; backbone {backbone!r} has "
        "none: a big_vision ViT .npz loads with corinfomax_jax.interop.big_vision."
        "load_big_vision_npz (docs/vit.md)")


def import_weights(config, workdir: str, weights: str | None) -> dict:
  """--mode=import: writes the step-0 checkpoint of `workdir` with the backbone of the
  file `weights` (see the module docstring) and returns what import.json holds.

  ConfigError, in one line, for a missing --weights, a workdir that already holds
  checkpoints, an unreadable file, and a state_dict that does not fit config.model
  (missing, unexpected or reshaped keys, the other stem); fc.* is the only part of a
  torchvision ResNet left out, and it is counted.
  """
  if not weights:
    raise ConfigError("--mode=import needs --weights=PATH: a .safetensors file or a "
                      "torch.save .pth/.pt file of a torchvision ResNet state_dict")
  with workdir_lock.WorkdirLock(workdir, "import") as lock:
    run, mesh = startup.begin(config, workdir, lock=lock, checks=(check_importable,))
    _check_no_checkpoints(workdir)
    file, backbone = _read_backbone(run, weights)
    probe_classes = _probe_classes(run)
    state = _imported_state(run, mesh, backbone, probe_classes)
    ignored = torchvision.ignored_keys(file.state_dict)
    provenance = {**file.record(), "ignored": ignored,
                  "read": len(file.state_dict) - len(ignored),
                  "num_batches_tracked": torchvision.batches_tracked(file.state_dict)}
    record = {**train_state_lib.checkpoint_record(run, probe_classes),
              "results": run_record.result_values(run.record), "spectra": [],
              train_state_lib.IMPORTED: provenance}
    manager = train_state_lib.create_checkpoint_manager(workdir, run.train.keep_checkpoints)
    try:
      checkpoints.save(manager, 0, state, record)
      checkpoints.finish(manager)
    finally:
      manager.close()
    run_record.write_run_config(run.record, workdir)
    left_out = ", ".join(f"{n} {group}" for group, n in file.left_out.items())
    logging.info(
        "Imported %d tensors of %s (%s; sha256 %s) into the backbone of %s as the "
        "checkpoint of step 0; ignored %d classifier keys (fc.*)%s; projector and %s "
        "state fresh (seed %d).", provenance["read"], weights, file.source, file.sha256,
        workdir, len(ignored),
        f"; not the backbone, left out: {left_out}" if left_out else "",
        run.method.name, run.seed)
    startup.write_result(workdir, RESULT, {**provenance, "step": 0})
  return {**provenance, "step": 0}


def _check_no_checkpoints(workdir: str) -> None:
  """ConfigError (one line) when the workdir already holds pretraining checkpoints."""
  directory = train_state_lib.checkpoint_dir(workdir)
  if directory.is_dir():
    manager = checkpoints.open_reader(directory)
    try:
      steps = sorted(manager.all_steps())
    finally:
      manager.close()
    if steps:
      raise ConfigError(f"The workdir {workdir!r} already holds pretraining checkpoints "
                        f"(steps {steps}): import into a new --workdir.")


def _read_backbone(run, weights: str):
  """(the weights file, its backbone as Flax {"params", "batch_stats"}); ConfigError
  (one line) for a file that cannot be read or does not fit config.model."""
  try:
    file = weights_files.read_weights(weights)
  except FileNotFoundError:
    raise ConfigError(f"--weights {weights!r} does not exist.") from None
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model_keys = run.model.record()
  # The backbone's shapes, without building it: a file that does not fit fails first.
  size = run.data.image_size
  like = jax.eval_shape(functools.partial(run.model.backbone().init, train=False),
                        jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  problem = torchvision.state_dict_mismatch(
      file.state_dict, torchvision.torchvision_shapes(like, backbone=model_keys["backbone"]),
      backbone=model_keys["backbone"], cifar_stem=model_keys["cifar_stem"])
  if problem:
    raise ConfigError(f"--weights {weights!r} ({file.source}) does not fit "
                      f"config.model (backbone {model_keys['backbone']}, cifar_stem "
                      f"{model_keys['cifar_stem']}, width {model_keys['width']}): "
                      f"{problem}.")
  return file, torchvision.flax_backbone_from_state_dict(
      file.state_dict, backbone=model_keys["backbone"],
      cifar_stem=model_keys["cifar_stem"], like=like)


def _imported_state(run, mesh, backbone: dict, probe_classes: int):
  """The config's seeded initial train state with `backbone` in place of its own."""
  state = train_state_lib.initial_state(run, run.model.create(), mesh,
                                        probe_classes=probe_classes)
  replicated = mesh_lib.replicated(mesh)
  return state.replace(
      params={**state.params, "backbone": jax.device_put(backbone["params"], replicated)},
      batch_stats={**state.batch_stats,
                   "backbone": jax.device_put(backbone["batch_stats"], replicated)})
