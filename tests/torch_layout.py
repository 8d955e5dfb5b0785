"""torchvision's ResNet state_dicts and torch.save's file format, without torch, for tests.

`torchvision_resnet` builds torchvision's resnet18/resnet50 state_dict from its
definition (not from the export's key table) with random values; `save_torch_file`
writes dicts, ints, strings and NumPy arrays (as tensors) as torch.save does. The reader
is also tested on a file torch itself wrote (interop/data/tiny_torch_checkpoint.pth).
"""
import struct
import zipfile

import numpy as np

_STORAGES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
             np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
             np.dtype("int32"): "IntStorage", np.dtype("uint8"): "ByteStorage"}


def _global(module, name):
  return b"c" + f"{module}\n{name}\n".encode()


def _str(text):
  data = text.encode("utf-8")
  return b"X" + struct.pack("<I", len(data)) + data


def _int(value):
  return b"J" + struct.pack("<i", value)


def _tuple(items):
  return b"(" + b"".join(items) + b"t"


def save_torch_file(tree, path, root="archive"):
  """Writes `tree` as torch.save(tree, path) would, pickle protocol 2 as torch's."""
  storages = []

  def pickled(node):
    if isinstance(node, dict):
      return b"}(" + b"".join(_str(k) + pickled(v) for k, v in node.items()) + b"u"
    if isinstance(node, str):
      return _str(node)
    if isinstance(node, int):
      return _int(node)
    array = np.array(node, order="C")  # (ascontiguousarray makes a scalar 1-D)
    key = str(len(storages))
    storages.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    strides = [s // array.itemsize for s in array.strides]
    storage = _tuple([_str("storage"), _global("torch", _STORAGES[array.dtype]),
                      _str(key), _str("cpu"), _int(array.size)]) + b"Q"  # BINPERSID
    args = _tuple([storage, _int(0), _tuple([_int(n) for n in array.shape]),
                   _tuple([_int(s) for s in strides]), b"\x89",  # requires_grad False
                   _global("collections", "OrderedDict") + b")R"])  # backward hooks
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"

  data = b"\x80\x02" + pickled(tree) + b"."
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(f"{root}/data.pkl", data)
    archive.writestr(f"{root}/byteorder", "little")
    for key, raw in enumerate(storages):
      archive.writestr(f"{root}/data/{key}", raw)
    archive.writestr(f"{root}/version", "3\n")


def torchvision_resnet(backbone, *, width=64, cifar_stem=False, classes=1000, seed=0):
  """torchvision.models.resnet18()/resnet50()'s state_dict, written from its definition
  (not from the export's table), with random values: kernels He-scaled, BN scales of
  either sign, running means and variances away from their initial 0 and 1."""
  stages, bottleneck = {"resnet18": ((2, 2, 2, 2), False),
                        "resnet50": ((3, 4, 6, 3), True)}[backbone]
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(key, out, inp, k):
    sd[f"{key}.weight"] = rng.normal(0, np.sqrt(2 / (inp * k * k)),
                                     (out, inp, k, k)).astype(np.float32)

  def bn(key, c):
    sd[f"{key}.weight"] = (rng.choice([-1, 1], c) * rng.uniform(0.5, 1.5, c)).astype(np.float32)
    sd[f"{key}.bias"] = rng.normal(0, 0.3, c).astype(np.float32)
    sd[f"{key}.running_mean"] = rng.normal(0, 0.3, c).astype(np.float32)
    sd[f"{key}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[f"{key}.num_batches_tracked"] = np.array(1234, np.int64)

  conv("conv1", width, 3, 3 if cifar_stem else 7)
  bn("bn1", width)
  inplanes, expansion = width, 4 if bottleneck else 1
  for i, blocks in enumerate(stages):
    planes = width * 2 ** i
    for j in range(blocks):
      p = f"layer{i + 1}.{j}"
      if bottleneck:
        conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
      else:
        conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
      if j == 0 and (i > 0 or bottleneck):
        conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
        bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  sd["fc.weight"] = rng.normal(0, 0.01, (classes, inplanes)).astype(np.float32)
  sd["fc.bias"] = np.zeros(classes, np.float32)
  return sd
