"""The pretrained backbone as a torchvision ResNet state_dict, in a safetensors file.

`torchvision_state_dict` renames and transposes the Flax backbone variables of
`models.CorInfoMaxModel` (or of a bare `models.ResNet`) into the keys and layouts of
torchvision's `resnet18` / `resnet50` (no `fc.*`: the backbone has no classifier);
`save_safetensors` writes them without any dependency. In PyTorch:

    import torch, torchvision
    from safetensors.torch import load_file  # pip install safetensors
    net = torchvision.models.resnet18()       # or resnet50()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem only
    net.maxpool = torch.nn.Identity()                         # CIFAR stem only
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file("backbone.safetensors"), strict=True)
    features = net.eval()(images_nchw)  # == Flax features (train=False)

Images are normalised as in pretraining (`augment.normalization_stats`) and
laid out NCHW in torch, NHWC in Flax.

BatchNorm running variance: Flax's running average holds the biased batch variance,
torch's the unbiased one (n / (n - 1) larger). The export keeps Flax's value as is, so
that the torch model in eval mode, which normalises by running_var directly, gives the
Flax features; torch training mode would then continue its average from that value.

Only the ResNets of `models.resnet.RESNETS` have a torchvision counterpart; their
(blocks per stage, block kind) come from that table. Any other registered backbone is
refused in one line.

`torch_layout_features` is an independent pure-JAX forward of the torch-layout dict
(it reads only the stage sizes and block kind from the table, not the Flax modules):
tests compare it with the Flax model to prove the mapping without torch.
`tools/check_torch_export.py` checks against torchvision itself.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from corinfomax_jax import models
from corinfomax_jax.models import resnet

# The torchvision block of each Flax block class of the ResNet table.
_BLOCK_KINDS = {resnet.BasicBlock: "basic", resnet.Bottleneck: "bottleneck"}
_BN_EPS = 1e-5  # torch.nn.BatchNorm2d and models.layers.batch_norm


def _architecture(backbone: str) -> tuple[tuple[int, ...], str]:
  """(blocks per stage, "basic" | "bottleneck") of the ResNet `backbone`."""
  if backbone not in resnet.RESNETS:
    what = "has no torchvision counterpart" if backbone in models.BACKBONES else (
        "is not a registered backbone")
    raise ValueError(f"backbone {backbone!r} {what}; the torchvision export maps the "
                     f"ResNets, accepted names: {sorted(resnet.RESNETS)}")
  spec = resnet.RESNETS[backbone]
  return tuple(spec["stage_sizes"]), _BLOCK_KINDS[spec["block_cls"]]


def _layers(backbone: str) -> Iterator[tuple[str, str, tuple[str, ...]]]:
  """(kind, torch prefix, Flax path) of every conv and BN, in torchvision's order."""
  stage_sizes, block = _architecture(backbone)
  yield "conv", "conv1", ("conv1",)
  yield "bn", "bn1", ("bn1",)
  convs = 2 if block == "basic" else 3
  for i, num_blocks in enumerate(stage_sizes):
    for j in range(num_blocks):
      torch_block, flax_block = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
      for c in range(1, convs + 1):
        yield "conv", f"{torch_block}.conv{c}", (flax_block, f"conv{c}")
        yield "bn", f"{torch_block}.bn{c}", (flax_block, f"bn{c}")
      # torchvision adds a projection where the stride or channel count changes: the
      # first block of stages 2-4, and of stage 1 too for the 4x-expanding Bottleneck.
      if j == 0 and (i > 0 or block == "bottleneck"):
        yield "conv", f"{torch_block}.downsample.0", (flax_block, "downsample_conv")
        yield "bn", f"{torch_block}.downsample.1", (flax_block, "downsample_bn")


def _entries(backbone: str) -> Iterator[tuple[str, Optional[str], tuple[str, ...]]]:
  """(torch key, Flax collection, Flax path) of every tensor of torchvision's state_dict
  (no fc.*), in its order: the one key table that export and import both read.

  Conv kernels are OIHW in torch and HWIO in Flax (the path ends in "kernel");
  num_batches_tracked has no Flax counterpart (collection None).
  """
  for kind, prefix, path in _layers(backbone):
    if kind == "conv":
      yield f"{prefix}.weight", "params", path + ("kernel",)
      continue
    yield f"{prefix}.weight", "params", path + ("scale",)
    yield f"{prefix}.bias", "params", path + ("bias",)
    yield f"{prefix}.running_mean", "batch_stats", path + ("mean",)
    yield f"{prefix}.running_var", "batch_stats", path + ("var",)
    yield f"{prefix}.num_batches_tracked", None, ()


def _backbone_trees(variables: Mapping[str, Any]) -> tuple[Mapping, Mapping]:
  """(params, batch_stats) of the backbone: of a CorInfoMaxModel or a bare ResNet."""
  if "params" not in variables or "batch_stats" not in variables:
    raise ValueError("variables must be a Flax variable dict with 'params' and "
                     f"'batch_stats' collections; got keys {sorted(variables)}")
  params, stats = variables["params"], variables["batch_stats"]
  if "backbone" in params:
    params, stats = params["backbone"], stats["backbone"]
  return params, stats


def _lookup(tree: Mapping, path: tuple[str, ...], leaf: str, what: str) -> Any:
  node = tree
  for name in path + (leaf,):
    if not isinstance(node, Mapping) or name not in node:
      raise ValueError(f"{what} has no {'/'.join(path + (leaf,))}: the variables do "
                       "not match the backbone named "
                       f"({' or '.join(sorted(resnet.RESNETS))}?)")
    node = node[name]
  return node


def _to_numpy(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Multi-host: a replicated or sharded global array, gathered on every process.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype=np.float32)


def _check_stem(kernel_shape: tuple[int, ...], cifar_stem: bool) -> None:
  expected = 3 if cifar_stem else 7
  if tuple(kernel_shape[:2]) != (expected, expected):
    raise ValueError(
        f"conv1 kernel is {kernel_shape[0]}x{kernel_shape[1]} but cifar_stem={cifar_stem} "
        f"means {expected}x{expected}: pass the cifar_stem the model was built with")


def torchvision_state_dict(variables: Mapping[str, Any], *, backbone: str,
                           cifar_stem: bool,
                           num_batches_tracked: int | Mapping[str, int] = 0
                           ) -> dict[str, np.ndarray]:
  """The backbone of `variables` as torchvision's ResNet state_dict (no fc.*).

  Args:
    variables: {"params", "batch_stats"} of `models.create_model` (the backbone is
      taken from its "backbone" submodule) or of `models.create_backbone`; any width.
    backbone: "resnet18" or "resnet50", as the model was built.
    cifar_stem: as the model was built (3x3 stride-1 conv1, no max-pool).
    num_batches_tracked: the value of every BN's num_batches_tracked buffer, e.g. the
      pretraining step, or {torch key: value} (`batches_tracked`); eval mode never
      reads it.

  Returns:
    torch key -> float32 array (conv kernels OIHW), each num_batches_tracked an int64
    scalar. running_var is Flax's running (biased) variance, unchanged: see the module
    docstring.
  """
  _architecture(backbone)  # a non-ResNet is refused before its variables are read
  trees = dict(zip(("params", "batch_stats"), _backbone_trees(variables)))
  _check_stem(np.shape(_lookup(trees["params"], ("conv1",), "kernel", "params")),
              cifar_stem)
  out = {}
  for key, collection, path in _entries(backbone):
    if collection is None:
      out[key] = np.array(num_batches_tracked.get(key, 0)
                          if isinstance(num_batches_tracked, Mapping)
                          else num_batches_tracked, dtype=np.int64)
      continue
    value = _to_numpy(_lookup(trees[collection], path[:-1], path[-1], collection))
    out[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if path[-1] == "kernel" else value
  return out


def torchvision_shapes(variables: Mapping[str, Any], *, backbone: str
                       ) -> dict[str, tuple[int, ...]]:
  """torch key -> shape of the state_dict that `variables` export to (no fc.*).

  `variables` as for `torchvision_state_dict`; only shapes are read, so abstract
  values (`jax.eval_shape`) do.
  """
  _architecture(backbone)
  trees = dict(zip(("params", "batch_stats"), _backbone_trees(variables)))
  out = {}
  for key, collection, path in _entries(backbone):
    if collection is None:
      out[key] = ()
      continue
    shape = tuple(_lookup(trees[collection], path[:-1], path[-1], collection).shape)
    out[key] = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
  return out


# torchvision's classifier: the one part of a torchvision ResNet that has no place in a
# backbone, so the only keys an import leaves out (and counts).
CLASSIFIER_PREFIX = "fc."


def ignored_keys(state_dict: Mapping[str, Any]) -> list[str]:
  """The keys of `state_dict` an import leaves out: torchvision's classifier, fc.*."""
  return sorted(k for k in state_dict if k.startswith(CLASSIFIER_PREFIX))


def batches_tracked(state_dict: Mapping[str, Any]) -> int | dict[str, int]:
  """The num_batches_tracked of `state_dict`'s BatchNorms: one int when they agree
  (torchvision's do), else {key: int}; 0 when it has none. An export adds the steps
  trained since to it, so that an imported backbone exports as it came."""
  values = {k: int(np.asarray(v)) for k, v in state_dict.items()
            if k.endswith(".num_batches_tracked")}
  if len(set(values.values())) > 1:
    return values
  return next(iter(values.values()), 0)


def _architecture_of(keys) -> str:
  """What a torchvision-style key set holds, for an error line: "resnet50", or the
  blocks per stage and block kind when no registered ResNet has them."""
  blocks: dict[int, set] = {}
  for key in keys:
    parts = key.split(".")
    if len(parts) > 2 and parts[0].startswith("layer") and parts[0][5:].isdigit():
      blocks.setdefault(int(parts[0][5:]), set()).add(parts[1])
  if not blocks:
    return "no ResNet stages (layer1... keys)"
  stages = tuple(len(blocks.get(i, ())) for i in range(1, max(blocks) + 1))
  kind = "bottleneck" if any(".conv3." in k for k in keys) else "basic"
  for name, spec in resnet.RESNETS.items():
    if tuple(spec["stage_sizes"]) == stages and _BLOCK_KINDS[spec["block_cls"]] == kind:
      return f"a {name}"
  return f"{kind} blocks {list(stages)} per stage"


def _listed(items: list[str], limit: int = 4) -> str:
  return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit
                                     else "")


def state_dict_mismatch(state_dict: Mapping[str, Any], expected: Mapping[str, tuple],
                        *, backbone: str, cifar_stem: bool) -> Optional[str]:
  """Why `state_dict` does not load into the backbone whose torch shapes are
  `expected` (`torchvision_shapes`), in one line; None when it loads.

  Names the missing and the unexpected keys (fc.* is never unexpected), the keys whose
  shapes differ, a stem of the other kind (7x7 ImageNet conv1 for a CIFAR model or
  the reverse) and what architecture the keys hold when it is not `backbone`.
  """
  # torch itself loads a state_dict of torch < 0.4.1 without num_batches_tracked.
  missing = [k for k in expected
             if k not in state_dict and not k.endswith(".num_batches_tracked")]
  unexpected = [k for k in state_dict
                if k not in expected and not k.startswith(CLASSIFIER_PREFIX)]
  shapes = [k for k in expected if k in state_dict
            and tuple(np.shape(state_dict[k])) != tuple(expected[k])]
  problems = []
  stem = tuple(np.shape(state_dict.get("conv1.weight", ())))
  want = 3 if cifar_stem else 7
  if len(stem) == 4 and stem[2:] != (want, want) and stem[2] == stem[3] in (3, 7):
    problems.append(
        f"conv1.weight is {stem[2]}x{stem[3]}: "
        + ("an ImageNet stem (7x7 stride-2 conv1, then a 3x3 max-pool)" if stem[2] == 7
           else "a CIFAR stem (3x3 stride-1 conv1, no max-pool)")
        + f", but the model has cifar_stem={cifar_stem}; set "
          f"config.model.cifar_stem={not cifar_stem}")
    if "conv1.weight" in shapes:
      shapes.remove("conv1.weight")
  if missing or unexpected:
    held = _architecture_of(state_dict)
    if held != f"a {backbone}":
      problems.append(f"the file holds {held}, the model is a {backbone}")
  if missing:
    problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
  if shapes:
    problems.append(f"other shapes ({len(shapes)}): " + _listed(
        [f"{k} {list(np.shape(state_dict[k]))} in the file, {list(expected[k])} in the "
         "model" for k in shapes], limit=3))
    first = "conv1.weight" if "conv1.weight" in shapes else None
    if first:
      problems.append(f"the file's conv1 has {np.shape(state_dict[first])[0]} output "
                      f"channels, the model {expected[first][0]} (config.model.width)")
  return "; ".join(problems) if problems else None


def flax_backbone_from_state_dict(state_dict: Mapping[str, Any], *, backbone: str,
                                  cifar_stem: bool,
                                  like: Optional[Mapping[str, Any]] = None
                                  ) -> dict[str, dict]:
  """The inverse of `torchvision_state_dict`: {"params", "batch_stats"} of a ResNet.

  The result is the backbone's own variables (what `models.create_backbone` builds;
  under "backbone" in a CorInfoMaxModel), float32. `like`: variables of the model
  the result is for (any `torchvision_state_dict` input; abstract values do), whose
  shapes the file must have; without it, the kernels' stem alone is checked. fc.* keys
  (`ignored_keys`) are left out and num_batches_tracked is not kept (Flax has no such
  buffer); any other difference raises ValueError in one line (`state_dict_mismatch`).
  """
  _architecture(backbone)  # a non-ResNet is refused before its variables are read
  expected = (torchvision_shapes(like, backbone=backbone) if like is not None else
              {key: np.shape(state_dict[key]) for key, _, _ in _entries(backbone)
               if key in state_dict})
  if like is None:
    expected.update({key: () for key, _, _ in _entries(backbone) if key not in expected})
  problem = state_dict_mismatch(state_dict, expected, backbone=backbone,
                                cifar_stem=cifar_stem)
  if problem:
    raise ValueError(f"the state_dict does not fit a torchvision {backbone}: {problem}")
  trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, collection, path in _entries(backbone):
    if collection is None:
      continue
    value = np.asarray(state_dict[key], dtype=np.float32)
    if path[-1] == "kernel":
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    node = trees[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return trees


def torch_layout_features(state_dict: Mapping[str, Any], images_nhwc: jax.Array, *,
                          backbone: str, cifar_stem: bool) -> jax.Array:
  """Pooled features of torchvision's ResNet in eval mode, computed in JAX from `state_dict`.

  Written from torchvision's definition, not from models/resnet.py's modules (only its
  table's stage sizes and block kind): OIHW kernels, symmetric padding k // 2, BN with
  the running statistics and eps 1e-5, v1.5 Bottleneck (stride on the 3x3), 3x3
  stride-2 max-pool after the 7x7 stem unless `cifar_stem`.
  """
  sd = {k: jnp.asarray(v) for k, v in state_dict.items()}
  stage_sizes, block = _architecture(backbone)

  def conv(x, key, stride):
    w = sd[f"{key}.weight"]
    pad = w.shape[-1] // 2
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=jax.lax.Precision.HIGHEST)

  def bn(x, key):
    inv = sd[f"{key}.weight"] / jnp.sqrt(sd[f"{key}.running_var"] + _BN_EPS)
    return (x - sd[f"{key}.running_mean"]) * inv + sd[f"{key}.bias"]

  x = jnp.asarray(images_nhwc, jnp.float32)
  x = jax.nn.relu(bn(conv(x, "conv1", 1 if cifar_stem else 2), "bn1"))
  if not cifar_stem:
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
  for i, num_blocks in enumerate(stage_sizes):
    for j in range(num_blocks):
      p = f"layer{i + 1}.{j}"
      stride = 2 if i > 0 and j == 0 else 1
      if block == "basic":
        y = jax.nn.relu(bn(conv(x, f"{p}.conv1", stride), f"{p}.bn1"))
        y = bn(conv(y, f"{p}.conv2", 1), f"{p}.bn2")
      else:
        y = jax.nn.relu(bn(conv(x, f"{p}.conv1", 1), f"{p}.bn1"))
        y = jax.nn.relu(bn(conv(y, f"{p}.conv2", stride), f"{p}.bn2"))
        y = bn(conv(y, f"{p}.conv3", 1), f"{p}.bn3")
      shortcut = x
      if f"{p}.downsample.0.weight" in sd:
        shortcut = bn(conv(x, f"{p}.downsample.0", stride), f"{p}.downsample.1")
      x = jax.nn.relu(shortcut + y)
  return jnp.mean(x, axis=(1, 2))


# --- safetensors: 8-byte little-endian header size, JSON header, raw tensor bytes. ---

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def save_safetensors(tensors: Mapping[str, np.ndarray], path,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes `tensors` (name -> numpy array) to `path` (local or remote) as safetensors."""
  header: dict[str, Any] = {}
  if metadata:
    bad = {k: v for k, v in metadata.items()
           if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
      raise ValueError(f"safetensors metadata must map str to str; got {bad!r}")
    header["__metadata__"] = dict(metadata)
  chunks, offset = [], 0
  for name, value in tensors.items():
    if name == "__metadata__":
      raise ValueError("'__metadata__' is reserved in safetensors; rename the tensor")
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _DTYPE_NAMES:
      raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which is not one of "
                       f"{sorted(str(d) for d in _DTYPE_NAMES)}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned
  with epath.Path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for data in chunks:
      f.write(data)


def read_safetensors_header(path) -> dict[str, Any]:
  """The JSON header of a safetensors file (tensor entries and "__metadata__")."""
  header, _ = _parse(epath.Path(path).read_bytes(), path)
  return header


def _parse(raw: bytes, path) -> tuple[dict[str, Any], memoryview]:
  if len(raw) < 8:
    raise ValueError(f"{path} is not a safetensors file: {len(raw)} bytes")
  (size,) = struct.unpack("<Q", raw[:8])
  if size > len(raw) - 8:
    raise ValueError(f"{path} is not a safetensors file (or is truncated): header of "
                     f"{size} bytes in a file of {len(raw)}")
  try:
    header = json.loads(raw[8:8 + size].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} has an unreadable safetensors header: {e}") from e
  return header, memoryview(raw)[8 + size:]


def load_safetensors(path) -> dict[str, np.ndarray]:
  """Reads a safetensors file (local or remote) into name -> numpy array (BF16 tensors
  as float32, exactly)."""
  header, buffer = _parse(epath.Path(path).read_bytes(), path)
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry.get("dtype") not in _DTYPES and entry.get("dtype") != "BF16":
      raise ValueError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, not "
                       f"one of {sorted(_DTYPES) + ['BF16']}")
    # bfloat16 is float32's upper half: read as uint16, widened exactly below.
    dtype = _DTYPES.get(entry["dtype"], np.dtype("<u2"))
    shape = tuple(entry["shape"])
    start, end = entry["data_offsets"]
    if not 0 <= start <= end <= len(buffer) or end - start != dtype.itemsize * math.prod(shape):
      raise ValueError(f"{path}: tensor {name!r} has offsets {[start, end]} that do not "
                       f"hold shape {list(shape)} of {entry['dtype']} in "
                       f"{len(buffer)} data bytes")
    out[name] = np.frombuffer(buffer[start:end], dtype=dtype).reshape(shape).astype(
        dtype.newbyteorder("="))
    if entry["dtype"] == "BF16":
      out[name] = (out[name].astype(np.uint32) << 16).view(np.float32)
  return out
