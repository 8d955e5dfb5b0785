"""Backbones behind a registry, the CorInfoMax model (backbone + projector), and heads.

A backbone is a Flax module whose `__call__(x, train)` takes (N, H, W, 3) images and
returns (N, D) float32 features. To add one: write its module, then add one line to
BACKBONES saying how to build it from keyword arguments and which ones it accepts, each
with its check. `create_model(backbone=<name>, ...)`, `feature_dim` and the train state
then work unchanged.

    model = models.create_model(**config.model)   # backbone, cifar_stem, width, ...
    dim = models.feature_dim(model)                # 512 for resnet18 at width 64

Registered: the ResNets (resnet.RESNETS) and the ViTs (vit.VITS: vit_ti16, vit_s16,
vit_b16, big_vision's sizes and parameter names).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from corinfomax_jax.models import heads
from corinfomax_jax.models import layers
from corinfomax_jax.models import resnet
from corinfomax_jax.models import vit
from corinfomax_jax.models.heads import Projector
from corinfomax_jax.models.heads import init_linear_head
from corinfomax_jax.models.heads import linear_logits
from corinfomax_jax.models.heads import parse_projector
from corinfomax_jax.models.layers import DTYPES
from corinfomax_jax.models.layers import parse_dtype
from corinfomax_jax.models.resnet import BasicBlock
from corinfomax_jax.models.resnet import Bottleneck
from corinfomax_jax.models.resnet import ResNet
from corinfomax_jax.models.vit import ViT


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build one backbone.

  Attributes:
    build: keyword arguments -> the unbound backbone module.
    options: the keyword arguments `build` accepts, each mapped to its check (raises
      ValueError saying what is accepted; returns otherwise).
    check_image_size: (image_size, **options) -> raises ValueError when the backbone
      cannot take square images of that side (a ViT's patch must divide it); None: any.
  """
  build: Callable[..., nn.Module]
  options: Mapping[str, Callable[[Any], Any]]
  check_image_size: Optional[Callable[..., None]] = None


BACKBONES: dict[str, BackboneSpec] = {
    **{name: BackboneSpec(functools.partial(resnet.create_resnet, name), resnet.OPTIONS)
       for name in resnet.RESNETS},
    **{name: BackboneSpec(functools.partial(vit.create_vit, name), vit.OPTIONS,
                          vit.check_image_size)
       for name in vit.VITS},
}


def backbone_spec(name: str) -> BackboneSpec:
  """BACKBONES[name]; an unknown name raises ValueError listing the registered ones."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; accepted names: {sorted(BACKBONES)}")
  return BACKBONES[name]


def check_backbone_options(name: str, **kwargs) -> None:
  """Raises ValueError for an option backbone `name` does not accept, or a bad value.

  Args:
    name: a key of BACKBONES.
    **kwargs: keyword arguments for the backbone's build.
  """
  spec = backbone_spec(name)
  for key, value in kwargs.items():
    if key not in spec.options:
      raise ValueError(f"backbone {name!r} has no option {key!r}; it accepts "
                       f"{sorted(spec.options)}")
    spec.options[key](value)


def check_image_size(name: str, image_size: int, **kwargs) -> None:
  """Raises ValueError when backbone `name` built with `kwargs` cannot take square
  images of side `image_size` (BackboneSpec.check_image_size)."""
  spec = backbone_spec(name)
  if spec.check_image_size is not None:
    spec.check_image_size(image_size, **{k: v for k, v in kwargs.items()
                                         if k in spec.options})


def create_backbone(name: str, **kwargs) -> nn.Module:
  """The backbone registered as `name`, built from `kwargs` after checking them.

  Args:
    name: a key of BACKBONES ("resnet18", "resnet50", ...).
    **kwargs: its options, e.g. width=64, cifar_stem=True, dtype="bfloat16" for a
      ResNet.

  Returns:
    The unbound backbone module.
  """
  check_backbone_options(name, **kwargs)
  return backbone_spec(name).build(**kwargs)


class CorInfoMaxModel(nn.Module):
  """Backbone + projector; `__call__(x, train)` returns (features, z), both float32.

  z is not normalised (the loss does it). The trainer passes each view separately, so
  BatchNorm statistics are per view, as in the reference.

  Attributes:
    backbone: the backbone module (`create_backbone`); its parameters live under
      "backbone".
    projector: the projector's sizes, hidden sizes then D; its parameters live under
      "projector".
    projector_bn: BatchNorm after each hidden projector layer.
  """
  backbone: nn.Module
  projector: tuple[int, ...] = (2048, 2048, 64)
  projector_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    features = self.backbone(x, train)
    z = Projector(parse_projector(self.projector), self.projector_bn,
                  name="projector")(features, train)
    return features, z


def create_model(backbone: str = "resnet18", *, projector=(2048, 2048, 64),
                 projector_bn: bool = False, dtype="float32",
                 **backbone_kwargs) -> CorInfoMaxModel:
  """The CorInfoMax model; bad names or sizes raise ValueError here, before any tracing.

  The keyword arguments are the keys of `config.model`: `create_model(**config.model)`.

  Args:
    backbone: a key of BACKBONES.
    projector: (hidden sizes..., D) or "2048-2048-64".
    projector_bn: BatchNorm after each hidden projector layer.
    dtype: "float32" or "bfloat16", the backbone's compute dtype (parameters stay
      float32); a backbone without a dtype option accepts only float32.
    **backbone_kwargs: the backbone's other options (ResNet: cifar_stem, width; ViT:
      patch_size, posemb, pool).

  Returns:
    The unbound model.
  """
  spec = backbone_spec(backbone)
  if "num_classes" in backbone_kwargs:
    raise ValueError("create_model takes no num_classes: the projector needs the "
                     "backbone's pooled features, not a classifier's logits")
  if "dtype" in spec.options:
    backbone_kwargs["dtype"] = dtype
  elif parse_dtype(dtype) != jnp.float32:
    raise ValueError(f"backbone {backbone!r} has no dtype option (it accepts "
                     f"{sorted(spec.options)}): dtype {dtype!r} cannot be applied")
  return CorInfoMaxModel(backbone=create_backbone(backbone, **backbone_kwargs),
                         projector=parse_projector(projector),
                         projector_bn=bool(projector_bn))


@functools.lru_cache(maxsize=64)
def _output_width(module: nn.Module, image_size: int) -> int:
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  out, _ = jax.eval_shape(functools.partial(module.init_with_output, train=False),
                          jax.random.key(0), images)
  features = out[0] if isinstance(out, tuple) else out
  return int(features.shape[-1])


def feature_dim(model_or_backbone: nn.Module, image_size: int = 32) -> int:
  """The size D of the backbone's features, from the module's own output shape.

  Nothing is computed: the shapes come from `jax.eval_shape`.

  Args:
    model_or_backbone: a CorInfoMaxModel (its features, not z) or a bare backbone.
    image_size: the side of the square input; globally pooled backbones (the ResNets)
      give the same D at every size.

  Returns:
    D, e.g. 512 for resnet18 and 2048 for resnet50 at width 64.
  """
  return _output_width(model_or_backbone, image_size)


def backbone_feature_dim(name: str, width: int = 64) -> int:
  """feature_dim of the backbone `name` built at `width` (kept for older callers)."""
  return feature_dim(create_backbone(name, width=width))


__all__ = [
    "BACKBONES", "BackboneSpec", "BasicBlock", "Bottleneck", "CorInfoMaxModel", "DTYPES",
    "Projector", "ResNet", "ViT", "backbone_feature_dim", "backbone_spec",
    "check_backbone_options", "check_image_size", "create_backbone", "create_model",
    "feature_dim", "heads", "init_linear_head", "layers", "linear_logits", "parse_dtype",
    "parse_projector", "resnet", "vit",
]
