"""A backbone's state_dict from a file: safetensors, or torch.save's .pth/.pt (no torch).

    weights = read_weights("resnet50.pth")
    weights.state_dict      # torch key -> np.ndarray, prefixes removed
    weights.sha256, weights.source, weights.left_out

Published checkpoints nest the state_dict and prefix its keys: a training checkpoint
keeps it under "model_state_dict" (or "state_dict", "model") beside the epoch and the
optimizer; DataParallel prefixes every key with "module."; SSL code keeps the encoder
as "backbone." beside "projector.". The state_dict is taken from the first of those
entries, "module." is removed from every key, and where keys start with "backbone."
those are the backbone's and every other group of keys is left out, each group counted
in `left_out` so that the import can say what it did not read.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import numpy as np
from etils import epath

from corinfomax_jax.interop import torch_files
from corinfomax_jax.interop import torchvision

# Where training checkpoints keep the model's state_dict, in the order looked for.
NESTED_KEYS = ("model_state_dict", "state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
BACKBONE_PREFIX = "backbone."


@dataclasses.dataclass(frozen=True)
class Weights:
  """A state_dict read from a file, and what was done to reach it."""
  state_dict: dict[str, np.ndarray]
  path: str
  sha256: str  # of the whole file
  source: str  # where in the file: "the top level", "'model_state_dict', keys 'backbone.*'"
  left_out: dict[str, int]  # key group ("projector.*") -> number of keys not read

  def record(self) -> dict[str, Any]:
    """What a run record keeps of the file: path, sha256, key counts."""
    return {"path": self.path, "sha256": self.sha256, "source": self.source,
            "keys": len(self.state_dict), "left_out": dict(self.left_out)}


def _is_zip(raw: bytes) -> bool:
  return raw[:4] == b"PK\x03\x04"


def _tensors(raw: bytes, path) -> Any:
  if _is_zip(raw):
    return torch_files.read_torch_file(path)
  try:
    return torchvision.load_safetensors(path)
  except ValueError as e:
    raise ValueError(f"{path} is neither a safetensors file nor a torch.save zip file "
                     f"(.pth, .pt): {e}") from None


def _state_dict_in(tree: Any, path) -> tuple[Mapping[str, Any], str]:
  """The mapping of tensors in `tree` and where it was found."""
  def is_state_dict(node):
    return (isinstance(node, Mapping) and node
            and all(isinstance(v, np.ndarray) for v in node.values()))

  if is_state_dict(tree):
    return tree, "the top level"
  if isinstance(tree, Mapping):
    for key in NESTED_KEYS:
      if is_state_dict(tree.get(key)):
        return tree[key], repr(key)
  top = sorted(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
  raise ValueError(f"{path} holds no state_dict (a mapping of names to tensors) at its "
                   f"top level nor under {' or '.join(map(repr, NESTED_KEYS))}; its top "
                   f"level is {top}")


def _group(key: str) -> str:
  return key.split(".", 1)[0] + ".*"


def read_weights(path) -> Weights:
  """The backbone state_dict of a .safetensors or torch.save file, as the module
  docstring says; ValueError (one line, naming the path) when there is none."""
  raw = epath.Path(path).read_bytes()
  state_dict, source = _state_dict_in(_tensors(raw, path), path)
  state_dict = dict(state_dict)
  if state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
    state_dict = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
    source += f", keys {DATA_PARALLEL_PREFIX!r} removed"
  left_out: dict[str, int] = {}
  if any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
    for key in state_dict:
      if not key.startswith(BACKBONE_PREFIX):
        left_out[_group(key)] = left_out.get(_group(key), 0) + 1
    state_dict = {k[len(BACKBONE_PREFIX):]: v for k, v in state_dict.items()
                  if k.startswith(BACKBONE_PREFIX)}
    source += f", keys {BACKBONE_PREFIX + '*'!r}"
  return Weights(state_dict=state_dict, path=str(path),
                 sha256=hashlib.sha256(raw).hexdigest(), source=source,
                 left_out=left_out)
