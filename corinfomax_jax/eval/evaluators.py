"""Evaluators: the network's features on data, the kNN monitor, and `--mode=knn_eval`.

An evaluator is built from the config and has `run(variables) -> dict` of numbers and
`every_steps(steps_per_epoch)`; pretraining runs the ones `config.eval.monitors` lists
(`create_evaluators`). TensorFlow is imported only through the data modules, inside
these functions.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from corinfomax_jax.data import augment
from corinfomax_jax.run import configuration
from corinfomax_jax import files
from corinfomax_jax.eval import knn
from corinfomax_jax.run import loop
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.run import writers as metrics_lib
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir as workdir_lib
from corinfomax_jax.errors import ConfigError

KNN_RESULT_FILE = "knn_eval.json"


def open_sources(config):
  """(train source, eval source) of config.dataset, checked to share their classes."""
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  train_source = sources.get_source(config.dataset, config.data_dir, config.train_split,
                                    skip_bad_images=config.skip_bad_images)
  eval_source = sources.get_source(config.dataset, config.data_dir, config.eval_split,
                                   skip_bad_images=config.skip_bad_images)
  for source in (train_source, eval_source):
    if source.unlabelled:
      raise ConfigError(
          f"{config.dataset} split {source.split!r} has no class directories: it serves "
          "for pretraining, but evaluation (kNN, linear probe) needs labels; give it "
          f"{source.split}/<class>/<image> or set config.eval.knn_every_epochs = 0.")
  if train_source.class_names != eval_source.class_names:
    only_train = sorted(set(train_source.class_names) - set(eval_source.class_names))
    only_eval = sorted(set(eval_source.class_names) - set(train_source.class_names))
    raise ConfigError(
        f"{config.dataset}: splits {config.train_split!r} ({train_source.num_classes} "
        f"classes) and {config.eval_split!r} ({eval_source.num_classes} classes) must "
        f"have the same classes, for labels to agree; only in {config.train_split!r}: "
        f"{only_train[:5]}, only in {config.eval_split!r}: {only_eval[:5]}.")
  return train_source, eval_source


def index_subset(source, index: np.ndarray):
  """`source` restricted to the examples `index` (int64 indices into it), in that order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  index = np.asarray(index, np.int64)
  index_t = tf.constant(index)
  return dataclasses.replace(
      source, num_examples=len(index),
      load_batch=lambda i: source.load_batch(tf.gather(index_t, i)),
      describe=lambda i: source.describe(int(index[int(i)])), skipped=[], _bad=set(),
      file_names=(None if source.file_names is None else
                  lambda: np.asarray(source.file_names(), object)[index].tolist()))


def eval_split_sums(sums_fn, args, mesh: jax.sharding.Mesh, source, config) -> np.ndarray:
  """sum over the centre-crop batches of `source` of sums_fn(*args, batch), in float64.

  sums_fn (jitted here: args replicated, the batch sharded over `mesh`) returns a vector
  of per-batch sums that masks the padding rows (batch["mask"]), e.g. top-k hits and
  the count of real rows.
  """
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  replicated, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  fn = jax.jit(sums_fn, in_shardings=(replicated,) * len(args) + (data,),
               out_shardings=replicated)
  total = None
  for batch in pipeline.global_batches(
      pipeline.eval_batches(source, global_batch_size=config.eval.batch_size,
                            image_size=config.image_size,
                            aug_config=configuration.aug_overrides(config)), data):
    sums = np.asarray(jax.device_get(fn(*args, batch)), np.float64)
    total = sums if total is None else total + sums
  return total


def _evenly_spaced_subset(source, num: int):
  """`source` restricted to `num` examples spread evenly over its index range.

  Spread, not the first `num`: an image folder is sorted by class, so its first
  examples would all be of the first classes.
  """
  return index_subset(source, (np.arange(num, dtype=np.int64) * source.num_examples) // num)


@functools.lru_cache(maxsize=None)
def _features_fn(model: nn.Module, mesh: jax.sharding.Mesh, mean, std):
  """Backbone features of a uint8 global batch, jitted like the train step (cached)."""

  def features(variables, images):
    return model.apply(variables, augment.normalize_uint8(images, mean, std),
                       train=False)[0]

  return jax.jit(features, in_shardings=(mesh_lib.replicated(mesh),
                                         mesh_lib.batch_sharded(mesh)),
                 out_shardings=mesh_lib.batch_sharded(mesh))


def feature_batches(model: nn.Module, variables, mesh: jax.sharding.Mesh, source, *,
                    batch_size: int, image_size: int, aug_config=None):
  """Yields (features [b, dim] float32, labels [b] int32, positions [b] int64) per batch.

  One pass over `source` in index order (pipeline.eval_batches: resize + centre crop),
  global batches sharded over the mesh's "data" axis, the network in inference mode.
  Each batch is gathered to every process (process_allgather), one batch behind the
  computation, so devices hold one batch at a time and hosts one batch's rows.
  Padding rows and images skipped as unreadable are dropped; `positions` are the
  surviving rows' places in the pass, which for a random-access source are their
  example indices in the source (for a streamed source, their order of arrival).
  """
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.global_batches(
      pipeline.eval_batches(source, global_batch_size=batch_size, image_size=image_size,
                            aug_config=aug_config),
      mesh_lib.batch_sharded(mesh))
  recipe = augment.resolve(source.name, aug_config)
  features_fn = _features_fn(model, mesh, tuple(recipe["mean"]), tuple(recipe["std"]))

  def fetch(pending, b):
    f, label, mask = multihost_utils.process_allgather(pending, tiled=True)
    keep = mask > 0
    positions = b * batch_size + np.arange(len(mask), dtype=np.int64)
    return (np.asarray(f[keep], np.float32), np.asarray(label[keep], np.int32),
            positions[keep])

  pending = None
  for b, batch in enumerate(batches):
    computed = (features_fn(variables, batch["image"]), batch["label"], batch["mask"])
    if pending is not None:
      yield fetch(pending, b - 1)
    pending = computed
  if pending is not None:
    yield fetch(pending, b)


def extract_features(model: nn.Module, variables, mesh: jax.sharding.Mesh, source, *,
                     batch_size: int, image_size: int, aug_config=None,
                     max_examples: int = -1) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, dim] float32, labels [n] int32) of `source`, centre crops, on every host.

  The batches of `feature_batches`, concatenated: hosts hold all n rows, n * dim * 4
  bytes, 10.5 GB per host for ImageNet-1K with ResNet-50 (2048-d).
  max_examples (-1: all) keeps that many examples spread evenly over the split.
  """
  limit = source.num_examples if max_examples == -1 else min(max_examples,
                                                             source.num_examples)
  if limit < source.num_examples and source.random_access:
    source = _evenly_spaced_subset(source, limit)
  # A streamed source cannot be subset by index: it stops after its first `limit` rows.
  feats, labels, count = [], [], 0
  for f, label, _ in feature_batches(model, variables, mesh, source,
                                     batch_size=batch_size, image_size=image_size,
                                     aug_config=aug_config):
    feats.append(f)
    labels.append(label)
    count += len(label)
    if count >= limit:  # same count on every process: they all stop here
      break
  if not feats:
    raise ValueError(f"{source.name} split {source.split!r} gave no examples")
  return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]


def monitor_every_steps(config, steps_per_epoch: int) -> int:
  """The monitors' cadence in steps: config.eval.knn_every_epochs (0: off)."""
  return loop.epochs_to_steps(config.eval.knn_every_epochs, steps_per_epoch)


def knn_settings(config) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """(ks, temperatures) of config.eval.knn_k and knn_temperature (a number or a tuple)."""
  as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)
  return as_tuple(config.eval.knn_k), tuple(float(t) for t in
                                            as_tuple(config.eval.knn_temperature))


def knn_headline(ks, temperatures) -> tuple[int, float]:
  """The (k, T) reported as top1/top5: InstDisc's k = 200, T = 0.07 where listed, else
  the largest k and the first temperature."""
  k = knn.KNN_K if knn.KNN_K in ks else max(ks)
  t = knn.KNN_TEMPERATURE if knn.KNN_TEMPERATURE in temperatures else temperatures[0]
  return k, t


def knn_numbers(table: dict, ks, temperatures) -> dict[str, float]:
  """Flat names of knn.knn_accuracies' table: top1/top5 at the headline (k, T), then
  top1_k<k>/top5_k<k> at the headline T, and top1_k<k>_t<T> for other temperatures."""
  k0, t0 = knn_headline(ks, temperatures)
  out = dict(table[(k0, t0)])
  for (k, t), acc in table.items():
    suffix = f"_k{k}" if t == t0 else f"_k{k}_t{t:g}"
    out.update({f"{name}{suffix}": v for name, v in acc.items()})
  return out


class KnnEvaluator:
  """Weighted kNN of the backbone features: train split as the bank, eval split queried.

  The bank is config.train_split (at most config.eval.max_train_examples of it, spread
  evenly), the queries config.eval_split, both centre crops through the network in
  inference mode; every k of config.eval.knn_k and temperature of
  config.eval.knn_temperature in one pass (knn.knn_accuracies). Every process returns
  the same numbers.
  """
  name = "knn"

  def __init__(self, config, model, mesh, train_source, eval_source):
    self._config, self._model, self._mesh = config, model, mesh
    self._train_source, self._eval_source = train_source, eval_source
    self.ks, self.temperatures = knn_settings(config)

  def every_steps(self, steps_per_epoch: int) -> int:
    return monitor_every_steps(self._config, steps_per_epoch)

  def accuracies(self, variables) -> tuple[dict, dict]:
    """({(k, T): {"top1", "top5"}} in percent, the bank and query counts)."""
    config = self._config
    kwargs = dict(batch_size=config.eval.batch_size, image_size=config.image_size,
                  aug_config=configuration.aug_overrides(config))
    bank, bank_labels = extract_features(self._model, variables, self._mesh,
                                         self._train_source,
                                         max_examples=config.eval.max_train_examples,
                                         **kwargs)
    queries, query_labels = extract_features(self._model, variables, self._mesh,
                                             self._eval_source, **kwargs)
    table = knn.knn_accuracies(bank, bank_labels, queries, query_labels,
                               self._train_source.num_classes, ks=self.ks,
                               temperatures=self.temperatures)
    return table, {"num_bank_examples": int(len(bank)),
                   "num_query_examples": int(len(queries))}

  def run(self, variables) -> dict:
    """`knn_numbers` of the accuracies, and the bank and query counts."""
    table, counts = self.accuracies(variables)
    return {**knn_numbers(table, self.ks, self.temperatures), **counts}

  def run_on_state(self, state) -> dict:
    return self.run(train_state_lib.backbone_variables(state))


class OnlineProbeEvaluator:
  """Test accuracy of the online linear probe that pretraining trains (state.probe).

  Centre crops of config.eval_split through the backbone in inference mode, then the
  probe's Dense layer; at the kNN monitor's cadence (config.eval.knn_every_epochs).
  """
  name = "online_probe"

  def __init__(self, config, model, mesh, train_source, eval_source):
    del train_source
    self._config, self._model, self._mesh = config, model, mesh
    self._eval_source = eval_source

  def every_steps(self, steps_per_epoch: int) -> int:
    return monitor_every_steps(self._config, steps_per_epoch)

  def run_on_state(self, state) -> dict:
    """{"test_top1", "test_top5"} in percent, and the test count."""
    config = self._config
    logits_fn = jax.jit(train_state_lib.online_probe_logits)
    hits, count = np.zeros(2, np.int64), 0
    for feats, labels, _ in feature_batches(
        self._model, train_state_lib.backbone_variables(state), self._mesh,
        self._eval_source, batch_size=config.eval.batch_size, image_size=config.image_size,
        aug_config=configuration.aug_overrides(config)):
      logits = logits_fn(state.probe["params"], feats)
      hits += np.asarray(knn.topk_hits(logits, labels, np.ones(len(labels), bool)))
      count += len(labels)
    accuracy = knn.accuracy(hits, count)
    return {"test_top1": accuracy["top1"], "test_top5": accuracy["top5"],
            "num_test_examples": count}


_EVALUATORS = {"knn": KnnEvaluator, "online_probe": OnlineProbeEvaluator}


def monitors_on(config) -> bool:
  """Whether pretraining runs any evaluator (config.eval.monitors, at the kNN cadence)."""
  return bool(config.eval.monitors) and monitor_every_steps(config, 1) > 0


def create_evaluators(config, model, mesh, train_source, eval_source) -> list:
  """The evaluators `config.eval.monitors` lists that are switched on (cadence > 0)."""
  out = []
  for name in config.eval.monitors:
    evaluator = _EVALUATORS[name](config, model, mesh, train_source, eval_source)
    if evaluator.every_steps(1) > 0:
      out.append(evaluator)
  return out


def monitor_action(evaluator, every_steps: int, writer) -> loop.Periodic:
  """A loop action that runs `evaluator` on the train state and logs its numbers."""

  def run(step, state):
    start = time.time()
    result = evaluator.run_on_state(state)
    numbers = {k: v for k, v in result.items() if not k.startswith("num_")}
    # TensorBoard: knn/top1, knn/top1_k20, ... (evaluator names, then its own).
    logging.info("%s monitor at step %d: %s (%.1f s).", evaluator.name, step,
                 " ".join(f"{k} {v:.2f}" for k, v in numbers.items()), time.time() - start)
    writer.scalars(step, {f"{evaluator.name}/{k}": v for k, v in numbers.items()})

  return loop.Periodic(every_steps, run)


def knn_eval(config, workdir: str) -> dict:
  """--mode=knn_eval: kNN accuracy of the workdir's latest checkpoint (or random init).

  With config.eval.random_init the network is the seeded initialisation
  (train_state.initial_state with config.seed) and no checkpoint is read. Writes
  <workdir>/knn_eval.json and returns the same dict: top1, top5 (percent) at the
  headline k and temperature (`knn_headline`: 200 and 0.07, InstDisc's), "by_k" {k:
  {top1, top5}} at that temperature, "by_temperature" {T: {k: {top1, top5}}}, step,
  random_init, num_bank_examples, num_query_examples, k, temperature, dataset, splits.
  """
  configuration.validate_config(config)
  # Without random_init the workdir must hold a checkpoint: load_pretrained says so.
  workdir_lib.check_workdir(workdir, create=config.eval.random_init)
  mesh_lib.check_batch_divides(config.eval.batch_size, jax.device_count(),
                               jax.process_count(), key="eval.batch_size")
  train_source, eval_source = open_sources(config)
  mesh = mesh_lib.make_mesh()
  model = configuration.create_model(config)
  random_init = config.eval.random_init
  if random_init:
    state = train_state_lib.initial_state(config, model, mesh)
  else:
    state = train_state_lib.load_pretrained(
        config, model, mesh, workdir,
        ", or set config.eval.random_init=True to evaluate the random initialisation")
  evaluator = KnnEvaluator(config, model, mesh, train_source, eval_source)
  table, counts = evaluator.accuracies(train_state_lib.backbone_variables(state))
  ks, temperatures = evaluator.ks, evaluator.temperatures
  k, t = knn_headline(ks, temperatures)
  result = {**table[(k, t)], **counts, "k": k, "temperature": t,
            "by_k": {str(kk): table[(kk, t)] for kk in ks},
            "by_temperature": {f"{tt:g}": {str(kk): table[(kk, tt)] for kk in ks}
                               for tt in temperatures},
            "step": int(state.step), "random_init": random_init,
            "dataset": config.dataset, "train_split": config.train_split,
            "eval_split": config.eval_split}
  path = files.as_path(workdir) / KNN_RESULT_FILE
  metrics_lib.write_json(path, result)
  logging.info("kNN (k=%d, T=%g) of %s at step %d: top-1 %.2f top-5 %.2f (%d bank, %d "
               "queries); written to %s.", result["k"], result["temperature"],
               "the random initialisation" if random_init else "the checkpoint",
               result["step"], result["top1"], result["top5"],
               result["num_bank_examples"], result["num_query_examples"], path)
  return result
