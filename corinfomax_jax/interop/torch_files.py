"""PyTorch's `torch.save` files (.pth, .pt) read into NumPy, without torch.

    tree = read_torch_file("resnet50.pth")   # dicts, lists, numbers, np.ndarray leaves

A `torch.save` file (torch >= 1.6) is a zip: `<name>/data.pkl` pickles the object, each
tensor as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose
storage is a persistent id `("storage", torch.<Type>Storage, key, device, numel)`, and
`<name>/data/<key>` holds that storage's raw bytes (`<name>/byteorder`: "little" unless
it says otherwise). The unpickler here is restricted as torch's `weights_only=True` is:
only those rebuild functions, the storage types and OrderedDict may be named, so a file
cannot run code; anything else is refused in one line naming it.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np
from etils import epath

# torch.<Name>Storage -> element dtype (little-endian); UntypedStorage counts bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2",
    "BFloat16Storage": "bf16", "LongStorage": "i8", "IntStorage": "i4",
    "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
    "UntypedStorage": "u1",
}


class _Storage:
  """A storage class named in the pickle: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
  return (raw.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, offset, size, stride, *unused_args) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a view of the storage, copied out."""
  array, itemsize = storage
  size, stride = tuple(size), tuple(stride)
  needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
  if needed > array.size:
    raise ValueError(f"a tensor of size {list(size)}, stride {list(stride)} at offset "
                     f"{offset} does not fit in its storage of {array.size} elements")
  view = np.lib.stride_tricks.as_strided(array[offset:], shape=size,
                                         strides=[s * itemsize for s in stride])
  return np.array(view, order="C")


def _rebuild_parameter(data, *unused_args) -> np.ndarray:
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _Storage(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str,
               path):
    super().__init__(io.BytesIO(data))
    self._archive, self._root, self._byteorder, self._path = archive, root, byteorder, path
    self._storages: dict[str, tuple[np.ndarray, int]] = {}

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise ValueError(
          f"{self._path} names {module}.{name}, which a file of tensors does not need "
          "and which is not read (it could run code): save the state_dict alone, "
          "torch.save(model.state_dict(), path)")
    return _GLOBALS[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _Storage)):
      raise ValueError(f"{self._path} holds an unknown persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if key not in self._storages:
      code = _STORAGE_DTYPES[storage_type.name]
      raw = self._archive.read(f"{self._root}/data/{key}")
      order = "<" if self._byteorder == "little" else ">"
      if code == "bf16":
        array = _bfloat16_to_float32(np.frombuffer(raw, dtype=f"{order}u2"))
      else:
        dtype = np.dtype(code if code in ("?", "u1", "i1") else order + code)
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
      self._storages[key] = (array, array.dtype.itemsize)
    return self._storages[key]


def read_torch_file(path) -> Any:
  """The object `torch.save` wrote to `path` (local or remote), tensors as NumPy arrays.

  Containers come back as dicts (OrderedDicts), lists and tuples; every tensor as a
  C-contiguous np.ndarray of its dtype (bfloat16 as float32, exactly). A Parameter is
  its data. ValueError, naming the path, for the pre-1.6 (non-zip) format, a file that
  is not torch.save's, or a pickle that names anything but tensors and containers.
  """
  raw = epath.Path(path).read_bytes()
  if not zipfile.is_zipfile(io.BytesIO(raw)):
    raise ValueError(f"{path} is not a torch.save zip file (the legacy format of torch < "
                     "1.6 is not read: load and save it again with a newer torch, or "
                     "give a .safetensors file)")
  with zipfile.ZipFile(io.BytesIO(raw)) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path} is a zip file but not torch.save's: it has "
                       f"{len(pickles)} data.pkl entries, not one")
    root = pickles[0][:-len("/data.pkl")]
    names = set(archive.namelist())
    byteorder = (archive.read(f"{root}/byteorder").decode().strip()
                 if f"{root}/byteorder" in names else "little")
    return _Unpickler(archive.read(pickles[0]), archive, root, byteorder, path).load()
