"""Checks the torchvision export against torchvision itself (a developer tool, not a test).

Needs torch and torchvision next to jax and flax, e.g. a scratch virtualenv made with
--system-site-packages:  python tools/check_torch_export.py  (from the repository root).
For resnet18 with the CIFAR stem (32 px) and resnet50 without it (64 px), both width 64:
builds the Flax model, makes every BatchNorm non-trivial (random scales, biases, running
means and variances: init values would hide a swapped mean/var or a zero-init residual
branch), writes the export with export.save_safetensors, loads it into torchvision's
ResNet with load_state_dict(strict=True), and compares eval-mode features on 4 random
images. Prints the differences; exits 1 if one exceeds 1e-4 of the largest feature.
"""
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from corinfomax_jax.interop import torchvision as export
from corinfomax_jax import models  # noqa: E402

TOLERANCE = 1e-4  # of the largest feature magnitude


def _perturbed_batch_norms(variables, rng):
  def perturb(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return leaf
    if name == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "scale":
      return (rng.choice([-1, 1], leaf.shape) * rng.uniform(0.5, 1.5, leaf.shape)
              ).astype(np.float32)
    return rng.normal(0, 0.3, leaf.shape).astype(np.float32)  # BN bias, running mean

  return jax.tree_util.tree_map_with_path(perturb, variables)


def _torchvision_backbone(backbone, cifar_stem):
  net = getattr(torchvision.models, backbone)()
  if cifar_stem:
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  net.fc = torch.nn.Identity()
  return net


def check(backbone, cifar_stem, image_size, directory, seed=0):
  rng = np.random.default_rng(seed)
  model = models.create_model(backbone, projector="8", cifar_stem=cifar_stem, width=64)
  images = rng.normal(size=(4, image_size, image_size, 3)).astype(np.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(seed, impl="rbg"), jnp.zeros_like(images))
  variables = _perturbed_batch_norms(variables, rng)
  flax_features = np.asarray(
      jax.jit(functools.partial(model.apply, train=False))(variables, images)[0])

  path = os.path.join(directory, f"{backbone}.safetensors")
  state_dict = export.torchvision_state_dict(variables, backbone=backbone,
                                             cifar_stem=cifar_stem, num_batches_tracked=1)
  export.save_safetensors(state_dict, path, metadata={"format": "pt"})
  loaded = {k: torch.from_numpy(v) for k, v in export.load_safetensors(path).items()}
  try:  # the reference reader, where installed, also validates the file format
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    reference = load_file(path)
    assert reference.keys() == loaded.keys()
    assert all(torch.equal(reference[k], loaded[k]) for k in loaded)
    reader = "safetensors.torch.load_file and export.load_safetensors agree"
  except ImportError:
    reader = "export.load_safetensors (safetensors not installed)"

  net = _torchvision_backbone(backbone, cifar_stem)
  net.load_state_dict(loaded, strict=True)
  net.eval()
  with torch.no_grad():
    torch_features = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  jax_features = np.asarray(export.torch_layout_features(
      state_dict, images, backbone=backbone, cifar_stem=cifar_stem))

  scale = np.abs(flax_features).max()
  torch_diff = np.abs(torch_features - flax_features).max()
  jax_diff = np.abs(jax_features - flax_features).max()
  print(f"{backbone} cifar_stem={cifar_stem} {image_size}px features {flax_features.shape}, "
        f"max |flax| {scale:.4g}; file read by {reader}")
  print(f"  torchvision vs flax: max abs diff {torch_diff:.3g} "
        f"(relative {torch_diff / scale:.3g})")
  print(f"  torch_layout_features vs flax: max abs diff {jax_diff:.3g} "
        f"(relative {jax_diff / scale:.3g})")
  return torch_diff <= TOLERANCE * scale and jax_diff <= TOLERANCE * scale


def main():
  print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  with tempfile.TemporaryDirectory() as directory:
    ok = [check("resnet18", True, 32, directory), check("resnet50", False, 64, directory)]
  if not all(ok):
    print(f"FAILED: a difference exceeds {TOLERANCE} of the largest feature")
    sys.exit(1)
  print("OK")


if __name__ == "__main__":
  main()
