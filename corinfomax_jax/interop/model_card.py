"""The model card of an export: export/README.md, what the checkpoint is without the workdir.

`model_card(...)` is a pure function of what the workdir records: the run's resolved
configuration (config.json), the checkpoint's record (model, method, data, spectra,
steps per epoch, an imported file), the evaluations found beside it (knn_eval.json,
linear_eval.json, finetune.json) and the exported files' sha256. `preprocessing(...)`
is the input an exported backbone expects; the export also writes it into the
safetensors metadata.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np

from corinfomax_jax.methods import corinfomax as objective

# TFDS names no licence for CIFAR; its catalog pages give this citation.
_CIFAR = ("{name} (Alex Krizhevsky, \"Learning multiple layers of features from tiny "
          "images\", 2009; https://www.cs.toronto.edu/~kriz/cifar.html). TFDS names no "
          "licence for it; its page asks that the report above be cited.")
_IMAGENET = ("{name}: images of ImageNet (image-net.org), under ImageNet's terms of "
             "access (non-commercial research and educational use).")


def data_licence(dataset: str) -> str:
  """The licence line of a `get_source` data set name."""
  if dataset.startswith("folder:"):
    return (f"An image folder ({dataset[len('folder:'):]}): as the folder's owner "
            "licenses it.")
  name = dataset.split(":")[0]
  if name in ("cifar10", "cifar100"):
    return _CIFAR.format(name={"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name])
  if name.startswith("imagenet"):
    return _IMAGENET.format(name=name)
  return (f"{name}: see its TFDS catalog page "
          f"(https://www.tensorflow.org/datasets/catalog/{name}) for its licence.")


# The preprocessing keys an export also writes one by one into the safetensors metadata,
# as preprocessing.<key>.
METADATA_KEYS = ("mean", "std", "resize", "crop")


def preprocessing(*, mean, std, image_size: int, test_resize_ratio: float,
                  interpolation: str = "bicubic") -> dict[str, Any]:
  """The evaluation input of the backbone, as the eval pipeline makes it
  (crops.resize_center_crop): the shorter side resized to `resize`, the centre `crop` x
  `crop` (the image size the backbone was trained at, also under "image_size"), then
  normalised with `mean` and `std`."""
  return {"image_size": int(image_size), "resize": int(image_size * test_resize_ratio),
          "crop": int(image_size), "interpolation": interpolation,
          "mean": [float(m) for m in mean], "std": [float(s) for s in std],
          "layout": "RGB, pixels / 255, then (x - mean) / std"}


def metadata(p: Mapping[str, Any]) -> dict[str, str]:
  """The safetensors metadata of preprocessing `p` (values are strings there): the whole
  as JSON under "preprocessing", and each of METADATA_KEYS as JSON under
  "preprocessing.<key>"."""
  return {"preprocessing": metadata_json(p),
          **{f"preprocessing.{k}": metadata_json(p[k]) for k in METADATA_KEYS}}


def preprocessing_text(p: Mapping[str, Any]) -> str:
  return (f"RGB; resize the shorter side to {p['resize']} px ({p['interpolation']}), "
          f"centre crop {p['crop']} x {p['crop']} (the size the backbone was trained "
          f"at); divide by 255; subtract "
          f"mean {p['mean']} and divide by std {p['std']} per channel.")


def _number(x) -> str:
  return f"{x:.2f}" if isinstance(x, float) else str(x)


def _evaluation_lines(evaluations: Mapping[str, Optional[dict]], step: int) -> list[str]:
  lines = []

  def of_step(result_step):
    return "" if result_step == step else (
        f" (of the checkpoint of step {result_step}, not of this export's step {step})")

  knn = evaluations.get("knn")
  if knn:
    lines.append(
        f"- kNN ({'random initialisation; ' if knn.get('random_init') else ''}InstDisc's "
        f"weighted kNN, k = {knn['k']}, T = {knn['temperature']:g}, bank: "
        f"{knn['num_bank_examples']} {knn['dataset']} {knn['train_split']} images, "
        f"queries: {knn['num_query_examples']} {knn['eval_split']} images, centre crops): "
        f"top-1 {_number(knn['top1'])}, top-5 {_number(knn['top5'])}"
        f"{of_step(knn['step'])}.")
  linear = evaluations.get("linear")
  if linear:
    lines.append(
        f"- Linear probe ({linear['variant']}; frozen backbone, {linear['epochs']} epochs, "
        f"batch {linear['batch_size']}, SGD lr {linear['lr']:g} ({linear['schedule']}), "
        f"momentum {linear['momentum']:g}, weight decay {linear['weight_decay']:g}; "
        f"trained on {linear['dataset']} {linear['train_split']}, tested on "
        f"{linear['num_test_examples']} {linear['eval_split']} images): top-1 "
        f"{_number(linear['top1'])}, top-5 {_number(linear['top5'])}"
        f"{of_step(linear['pretrain_step'])}.")
  # "finetune" (config.eval.finetune.subdir's default), then "finetune:<subdir>" each.
  for key in sorted(k for k in evaluations if k.split(":")[0] == "finetune"):
    finetune = evaluations[key]
    if not finetune:
      continue
    best = finetune.get("best", {})
    where = f"{key.split(':', 1)[1]}.json; " if ":" in key else ""
    lines.append(
        f"- Fine-tuning ({where}"
        f"{'random initialisation; ' if finetune.get('random_init') else ''}"
        f"whole network on {finetune['num_labelled']} labelled images "
        f"({finetune['label_fraction']:g} of {finetune['dataset']} "
        f"{finetune['train_split']}), {finetune['epochs']} epochs, batch "
        f"{finetune['batch_size']}, backbone lr {finetune['backbone_lr']:g}, head lr "
        f"{finetune['head_lr']:g}, weight decay {finetune['weight_decay']:g}; tested on "
        f"{finetune['eval_split']}): top-1 {_number(finetune['top1'])}, top-5 "
        f"{_number(finetune['top5'])} after the last epoch"
        + (f" (best {_number(best['top1'])} at epoch {best['epoch']}, chosen on "
           f"{best['chosen_on']})" if best else "")
        + f"{of_step(finetune['pretrain_step'])}.")
  return lines or ["- None in the workdir (run --mode=knn_eval, linear_eval or finetune "
                   "before exporting to list them here)."]


def _spectrum_lines(spectra) -> list[str]:
  if not spectra:
    return ["- Not recorded (no spectrum was logged before this checkpoint)."]
  step, eigenvalues = spectra[-1]
  eigenvalues = np.asarray(eigenvalues, np.float32)
  s = objective.covariance_spectrum(np.diag(eigenvalues))
  return [f"- Branch 1's projector covariance at step {step}: dimension "
          f"{len(eigenvalues)}, effective rank {float(s.effective_rank):.2f}, eigenvalues "
          f"from {float(s.min_eigenvalue):.3g} to {float(s.max_eigenvalue):.3g}, "
          f"{int(s.num_above)} above 1e-1, {int(s.num_below)} below 1e-8."]


def _snippets(model: Mapping[str, Any], files: Mapping[str, str], p: Mapping[str, Any]
              ) -> list[str]:
  backbone, cifar_stem, width = model["backbone"], model["cifar_stem"], model["width"]
  out = ["### PyTorch (torchvision)", ""]
  if width == 64:
    out += ["```python",
            "import torch, torchvision",
            "from safetensors.torch import load_file  # pip install safetensors",
            f"net = torchvision.models.{backbone}()"]
    if cifar_stem:
      out += ["net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem",
              "net.maxpool = torch.nn.Identity()"]
    out += ["net.fc = torch.nn.Identity()",
            f"net.load_state_dict(load_file(\"{files['safetensors']}\"), strict=True)",
            "features = net.eval()(images)  # NCHW float32, preprocessed as below",
            "```"]
  else:
    out += [f"This backbone has width {width}; torchvision builds its ResNets at width 64 "
            "only, so the file loads into a torchvision-style ResNet built with "
            f"{width} channels in its first stage (the keys and layouts are torchvision's)."]
  out += ["", "### JAX (Flax)", "", "```python",
          "import flax, jax, jax.numpy as jnp",
          "from corinfomax_jax import models",
          f"net = models.create_backbone(\"{backbone}\", cifar_stem={cifar_stem}, "
          f"width={width})",
          f"template = net.init(jax.random.PRNGKey(0), jnp.zeros((1, {p['image_size']}, "
          f"{p['image_size']}, 3)), train=False)",
          f"with open(\"{files['msgpack']}\", \"rb\") as f:",
          "  variables = flax.serialization.from_bytes(template, f.read())",
          "features = net.apply(variables, images, train=False)  # NHWC float32",
          "```"]
  return out


def model_card(*, record: Mapping[str, Any], config: Mapping[str, Any], config_source: str,
               step: int, evaluations: Mapping[str, Optional[dict]],
               files: Mapping[str, str], sha256: Mapping[str, str],
               prep: Mapping[str, Any]) -> str:
  """export/README.md as Markdown.

  record: the checkpoint's record; config: the run's resolved configuration (from
  `config_source`, e.g. "config.json"); step: the exported checkpoint's; evaluations:
  {"knn", "linear", "finetune", "finetune:<subdir>", ...}: each mode's result JSON, or
  None ("finetune:<subdir>": a fine-tuning with config.eval.finetune.subdir); files: {"safetensors",
  "msgpack"}: the exported file names; sha256: name -> hex digest; prep: `preprocessing`.
  """
  model = record["model"]
  method = config.get("method", record.get("method", "corinfomax"))
  data = record.get("data", {})
  dataset = config.get("dataset", data.get("dataset", "?"))
  steps_per_epoch = record.get("steps_per_epoch")
  imported = record.get("imported")
  hyper = config.get(method, {})
  title = f"{model['backbone']} ({'CIFAR' if model['cifar_stem'] else 'ImageNet'} stem"
  title += f", width {model['width']})" if model["width"] != 64 else ")"
  lines = [f"# {title}, {method}, {dataset}, step {step}", ""]
  if imported:
    lines += [f"The backbone was imported from `{imported['path']}` (sha256 "
              f"`{imported['sha256']}`; {imported['read']} tensors of {imported['source']}"
              f", {len(imported['ignored'])} classifier keys ignored) and trained {step} "
              "steps since with the method below.", ""]
  lines += ["## Method", "",
            f"- {method}: " + ", ".join(f"{k} = {v}" for k, v in sorted(hyper.items())) + ".",
            f"- Projector {model['projector']} (batch norm: {model.get('projector_bn')}); "
            "the export holds the backbone only.",
            f"- Optimizer {config.get('optimizer', record.get('optimizer'))}: peak "
            f"learning rate {config.get('learning_rate')} x batch {config.get('batch_size')}"
            f" / {config.get('base_batch_size')}, momentum {config.get('momentum')}, weight "
            f"decay {config.get('weight_decay')}, {config.get('warmup_epochs')} warm-up "
            f"epochs then cosine to {config.get('min_learning_rate')}; seed "
            f"{config.get('seed')}; compute dtype {model.get('dtype', 'float32')}.",
            f"- (From {config_source}.)", "",
            "## Data, steps and epochs", "",
            f"- {dataset}, split {config.get('train_split', 'train')!r}, "
            f"{data.get('image_size', prep['image_size'])} px views.",
            f"- Step {step} of a schedule of {config.get('num_epochs')} epochs"
            + (f" ({config.get('max_steps')} steps at most)"
               if config.get("max_steps", -1) not in (-1, None) else "")
            + (f": {step / steps_per_epoch:.2f} epochs ({steps_per_epoch} steps per "
               f"epoch, {record.get('num_train_examples')} images)." if steps_per_epoch
               else "; the checkpoint does not record its steps per epoch."),
            "- Licence of the data: " + data_licence(dataset), "",
            "## Evaluations", "", *_evaluation_lines(evaluations, step), "",
            "## Covariance spectrum", "", *_spectrum_lines(record.get("spectra")), "",
            "## Files", "",
            *[f"- `{name}`: sha256 `{digest}`" for name, digest in sha256.items()], "",
            "## Preprocessing", "", preprocessing_text(prep), "",
            "The safetensors metadata holds the same as JSON under \"preprocessing\", and "
            "each of mean, std, resize and crop as JSON under \"preprocessing.mean\", "
            "\"preprocessing.std\", \"preprocessing.resize\", \"preprocessing.crop\".",
            "",
            "## Loading", "", *_snippets(model, files, prep), "",
            "BatchNorm in eval mode uses the running statistics; running_var holds Flax's "
            "(biased) running variance, so torch's eval mode gives the same features.", ""]
  return "\n".join(lines)


def metadata_json(value: Any) -> str:
  return json.dumps(value, separators=(",", ":"))
