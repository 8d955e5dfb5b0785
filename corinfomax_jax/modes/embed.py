"""--mode=embed: the backbone features of a split, written batch by batch.

DIR/embeddings/<split>.npz holds features float32 [n, dim], labels int32 [n] and index
int64 [n] (the example's index in the source, i.e. its position in the sorted file list
of an image folder or in the TFDS split; for a streamed TFDS split, its order of
arrival), and paths str [n], where each row's image comes from (`Source.paths`): for an
image folder its path relative to the folder's root ("train/cat/001.jpg"); for a TFDS
split read by index, its file_name feature (imagenet2012: "n01440764_10026.JPEG") or
else its id feature (cifar10: "train_16399"), read in one more pass over the split's
records. paths is left out for a TFDS data set with neither feature, and for a streamed
TFDS split (not prepared as ArrayRecord), whose rows arrive in an order that no index
names.

Centre crops through the latest checkpoint's backbone in inference mode, in global
batches of config.eval.batch_size sharded over all devices
(features_lib.feature_batches). So that 1.28M x 2048 features (10.5 GB) need not fit in
memory, process 0 writes each gathered batch straight into three .npy files
(np.lib.format.open_memmap) under DIR/embeddings/<split>.parts/ (under TMPDIR when DIR
is a URL), then stores them uncompressed into the .npz (np.savez copies a memory-mapped
array in 16 MiB pieces) and removes them: host memory holds one batch, the disk briefly
twice the result; for a URL the npz is then uploaded. `np.load(path, mmap_mode=...)`
does not map npz members; np.load(path)["features"] reads that array.

Process 0 also draws DIR/embeddings/map.png (eval.embedding_map): the features in 2-D
(UMAP, else t-SNE; at most MAP_POINTS of them, drawn with config.seed), coloured by
class where the split has labels; without either library it logs how to get it.
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np
from absl import logging

from corinfomax_jax import files
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.eval import embedding_map
from corinfomax_jax.eval import features as features_lib
from corinfomax_jax.modes import startup
from corinfomax_jax.run import encoder as encoder_lib
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import writers

EMBEDDINGS_DIR = "embeddings"
MAP_FILE = "map.png"
# The map's points at most: scikit-learn's t-SNE of 2000 points of 512 dimensions takes
# 14 s on one CPU core, of 5000 points 107 s.
MAP_POINTS = 2000


def embed_split(run: settings_lib.Settings) -> str:
  """The split --mode=embed reads: config.eval.embed_split, else config.eval_split, else,
  for an image folder that has no such split (a folder of one split, as for
  pretraining on one's own images), config.train_split."""
  if run.eval.embed_split:
    return run.eval.embed_split
  data = run.data
  if data.dataset.startswith("folder:"):
    root = files.as_path(data.dataset[len("folder:"):])
    if not (root / data.eval_split).is_dir() and (root / data.train_split).is_dir():
      logging.info("%s has no split %r (config.eval_split): embedding train_split %r "
                   "(config.eval.embed_split chooses another).", root, data.eval_split,
                   data.train_split)
      return data.train_split
  return data.eval_split


def _draw_map(features, labels, class_names, path, *, title: str, seed: int) -> None:
  """embeddings/map.png, or one line saying how to get it when no layout is installed."""
  points = embedding_map.layout(features, seed=seed, max_points=MAP_POINTS)
  if points is None:
    logging.info("No map of the embedding (%s): neither umap-learn nor scikit-learn is "
                 "installed; %s.", path, embedding_map.INSTALL_HINT)
    return
  embedding_map.plot_map(points, labels, class_names, path, title=title, seed=seed)
  logging.info("Map of the embedding (%s, %d of %d points): %s", points.algorithm,
               len(points.index), points.total, path)


def embed(config, workdir: str) -> str:
  """--mode=embed: backbone features of a split (`embed_split`) to
  DIR/embeddings/<split>.npz, and their map to DIR/embeddings/map.png (the module
  docstring says what they hold and how they are written). Returns the npz path."""
  run, mesh = startup.begin(
      config, workdir, batch_sizes=lambda r: {"eval.batch_size": r.eval.batch_size},
      create_workdir=False)
  enc = _encoder(run, workdir)
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  data = run.data
  split = embed_split(run)
  source = sources.get_source(data.dataset, data.data_dir, split,
                              skip_bad_images=data.skip_bad_images)
  directory = files.as_path(workdir) / EMBEDDINGS_DIR
  path = directory / f"{split}.npz"
  writer = jax.process_index() == 0
  # Memory maps need a local disk: beside the result, or under TMPDIR for a URL.
  parts = files.scratch_dir(directory / f"{split}.parts") if writer else None
  arrays, count = _features_to_memmaps(run, mesh, enc, source, parts)
  if writer:
    _write_npz(arrays, count, source, os.path.join(parts, f"{split}.npz"), path)
    logging.info("Features of %d %s %s images (dim %d, checkpoint step %d) written to "
                 "%s.", count, data.dataset, split, enc.feature_dim, enc.step, path)
    try:
      _draw_map(arrays["features"][:count], None if source.unlabelled else
                arrays["labels"][:count], source.class_names, directory / MAP_FILE,
                title=f"{workdir.rstrip('/').rsplit('/', 1)[-1]}, step {enc.step}: {split} "
                      f"split of {writers.dataset_title(data.dataset)}, "
                      f"{enc.config.get('method', 'corinfomax')}",
                seed=run.seed)
    finally:
      arrays.clear()  # unmaps the .npy files
      shutil.rmtree(parts)
  return str(path)


def _encoder(run: settings_lib.Settings, workdir: str) -> encoder_lib.Encoder:
  """The latest checkpoint's encoder (fails now when there is none); ConfigError when
  config.model is not the one it was written by."""
  enc = encoder_lib.load_encoder(workdir)
  if enc.config["model"] != run.model.record():
    raise ConfigError(
        f"The checkpoint in {workdir!r} was written by config.model "
        f"{enc.config['model']}, not {run.model.record()}: use the "
        "pretraining configuration.")
  return enc


def _features_to_memmaps(run: settings_lib.Settings, mesh, enc: encoder_lib.Encoder,
                         source, parts: str | None) -> tuple[dict, int]:
  """({"features", "labels", "index"}: .npy memory maps under `parts`, each of the
  split's size, filled batch by batch; {} where `parts` is None: a process that does
  not write), the rows computed."""
  n, dim = source.num_examples, enc.feature_dim
  variables = jax.device_put(enc.variables, mesh_lib.replicated(mesh))
  arrays = {} if parts is None else {
      name: np.lib.format.open_memmap(os.path.join(parts, f"{name}.npy"), mode="w+",
                                      dtype=dtype, shape=shape)
      for name, dtype, shape in (("features", np.float32, (n, dim)),
                                 ("labels", np.int32, (n,)),
                                 ("index", np.int64, (n,)))}
  count = 0
  for feats, labels, index in features_lib.feature_batches(
      enc.model, variables, mesh, source, batch_size=run.eval.batch_size, data=run.data):
    if parts is not None:
      for name, rows in (("features", feats), ("labels", labels), ("index", index)):
        arrays[name][count:count + len(rows)] = rows
    count += len(labels)
  return arrays, count


def _write_npz(arrays: dict, count: int, source, tmp: str, path) -> None:
  """The first `count` rows of `arrays` (and the rows' paths, where the source has
  them) as an uncompressed npz at `tmp`, then moved to `path`."""
  rows = {name: array[:count] for name, array in arrays.items()}
  if source.has_paths:
    rows["paths"] = np.asarray(source.paths(), dtype=np.str_)[rows["index"]]
  with open(tmp, "wb") as f:
    # np.savez copies each (memory-mapped) array in 16 MiB pieces; [:count] drops the
    # rows of images skipped as unreadable.
    np.savez(f, **rows)
  files.move_local_file(tmp, path)
