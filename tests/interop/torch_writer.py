"""torch.save's zip format written without torch, for tests: dicts, ints, strings and
NumPy arrays (as tensors). The reader is also tested on a file torch itself wrote
(data/tiny_torch_checkpoint.pth); this writer makes files of any size."""
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
