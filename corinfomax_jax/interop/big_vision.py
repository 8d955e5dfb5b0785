"""big_vision's ViT checkpoints (.npz) into the ViT backbone (models.vit), by name.

    like = jax.eval_shape(functools.partial(backbone.init, train=False), key, images)
    params, left_out = load_big_vision_npz("ViT-S_16.npz", like["params"])
    features = backbone.apply({"params": params}, images, train=False)

big_vision writes a checkpoint as one array per parameter, the key being the path of
names joined by "/" ("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"). The
layouts of its earlier checkpoints (and of google-research/vision_transformer's) are
read as big_vision's own `fix_old_checkpoints` reads them:
  - "Transformer/posembed_input/pos_embedding" or "Transformer/pos_embedding": the
    position embeddings, moved to "pos_embedding";
  - position embeddings of h*w + 1 entries (the class token's first): that entry is
    added to "cls" and dropped, as the class token then takes no position embedding;
  - a scanned encoder ("Transformer/encoderblock/...", every leaf with a leading depth
    axis): split into encoderblock_0, encoderblock_1, ...
Entries the backbone has no place for (the classifier "head", "pre_logits", a MAP head)
are left out and named. The position embeddings are not resampled: a checkpoint of
another patch grid is refused, naming both shapes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from flax import traverse_util
import jax
import numpy as np


def _fix_layout(tree: dict) -> dict:
  """big_vision's current layout from its earlier ones (see the module docstring)."""
  encoder = tree.get("Transformer", {})
  if "posembed_input" in encoder:
    tree["pos_embedding"] = encoder.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in encoder:
    tree["pos_embedding"] = encoder.pop("pos_embedding")
  pe = tree.get("pos_embedding")
  if pe is not None:
    n = pe.shape[1]
    if math.isqrt(n - 1) ** 2 == n - 1 and math.isqrt(n) ** 2 != n:
      tree["pos_embedding"] = pe[:, 1:]
      if "cls" in tree:
        tree["cls"] = tree["cls"] + pe[:, :1]
  if "encoderblock" in encoder:
    scanned = traverse_util.flatten_dict(encoder.pop("encoderblock"), sep="/")
    depth = next(iter(scanned.values())).shape[0]
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = traverse_util.unflatten_dict(
          {k: v[i] for k, v in scanned.items()}, sep="/")
  return tree


def load_big_vision_npz(path_or_arrays, like: Mapping[str, Any]
                        ) -> tuple[dict, list[str]]:
  """The ViT parameters of a big_vision checkpoint, in the tree of `like`.

  Args:
    path_or_arrays: the .npz file's path, or its arrays as a {"a/b/c": array} mapping.
    like: the backbone's parameters or their shapes (jax.eval_shape of its init's
      "params"): the names and shapes to fill.

  Returns:
    (params as float32 numpy arrays in `like`'s tree, the checkpoint's keys left out).

  Raises:
    ValueError (one line): a parameter of `like` is missing from the checkpoint or has
      another shape there.
  """
  if isinstance(path_or_arrays, Mapping):
    flat = dict(path_or_arrays)
  else:
    with np.load(path_or_arrays, allow_pickle=False) as npz:
      flat = {k: npz[k] for k in npz.files}
  source = traverse_util.flatten_dict(
      _fix_layout(traverse_util.unflatten_dict(flat, sep="/")), sep="/")
  wanted = traverse_util.flatten_dict(like, sep="/")
  missing = sorted(set(wanted) - set(source))
  if missing:
    raise ValueError(f"the big_vision checkpoint has no {missing[0]!r} (and "
                     f"{len(missing) - 1} more missing): not this backbone's layout "
                     "(pool 'tok' needs 'cls'; posemb 'learn' needs 'pos_embedding')")
  for key, target in wanted.items():
    if tuple(source[key].shape) != tuple(target.shape):
      raise ValueError(f"the big_vision checkpoint's {key!r} has shape "
                       f"{tuple(source[key].shape)}, the backbone's {tuple(target.shape)} "
                       "(another variant, patch size or image size?)")
  params = traverse_util.unflatten_dict(
      {k: np.asarray(source[k], np.float32) for k in wanted}, sep="/")
  return params, sorted(set(source) - set(wanted))


def big_vision_arrays(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse layout: {"a/b/c": array} of a ViT backbone's parameters, as big_vision
  saves them (np.savez(path, **big_vision_arrays(params)) writes its .npz)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
