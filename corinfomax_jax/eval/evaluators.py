"""Evaluators: the network's features on data, the kNN and online-probe monitors.

An evaluator is built from its own settings section and has `run_on_state(state) ->
dict` of numbers and `every_steps(steps_per_epoch)` (its own cadence); pretraining runs
the ones `eval.monitors` lists (`create_evaluators`). TensorFlow is imported only
through the data modules, inside these functions.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.eval import knn
from corinfomax_jax import models
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax.run import encoder
from corinfomax_jax.run import loop
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib


def open_sources(data: settings_lib.Data, *, needs_labels: str = "evaluation (kNN, "
                 "linear probe)"):
  """(train source, eval source) of `data`, checked to have labels and share classes."""
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  train_source, eval_source = (
      sources.get_source(data.dataset, data.data_dir, split,
                         skip_bad_images=data.skip_bad_images)
      for split in (data.train_split, data.eval_split))
  for source in (train_source, eval_source):
    if source.unlabelled:
      raise ConfigError(
          f"{data.dataset} split {source.split!r} has no class directories: it serves "
          f"for pretraining, but {needs_labels} needs labels; give it "
          f"{source.split}/<class>/<image>, or switch that evaluation off.")
  if train_source.class_names != eval_source.class_names:
    only_train = sorted(set(train_source.class_names) - set(eval_source.class_names))
    only_eval = sorted(set(eval_source.class_names) - set(train_source.class_names))
    raise ConfigError(
        f"{data.dataset}: splits {data.train_split!r} ({train_source.num_classes} "
        f"classes) and {data.eval_split!r} ({eval_source.num_classes} classes) must "
        f"have the same classes, for labels to agree; only in {data.train_split!r}: "
        f"{only_train[:5]}, only in {data.eval_split!r}: {only_eval[:5]}.")
  return train_source, eval_source


def index_subset(source, index: np.ndarray):
  """`source` restricted to the examples `index` (int64 indices into it), in that order."""
  return source.subset(index)


def eval_split_sums(sums_fn, args, mesh: jax.sharding.Mesh, source,
                    data: settings_lib.Data, batch_size: int,
                    interpolation: str = "bicubic") -> np.ndarray:
  """sum over the centre-crop batches of `source` of sums_fn(*args, batch), in float64.

  sums_fn (jitted here: args replicated, the batch sharded over `mesh`) returns a vector
  of per-batch sums that masks the padding rows (batch["mask"]), e.g. top-k hits and
  the count of real rows. Batches of `batch_size`, views as `data.recipe` says, resized
  with `interpolation` (a key of data.crops.INTERPOLATIONS).
  """
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  fn = jax.jit(sums_fn, in_shardings=(replicated,) * len(args) + (sharded,),
               out_shardings=replicated)
  total = None
  for batch in pipeline.global_batches(
      pipeline.eval_batches(source, pipeline.BatchSpec(batch_size, data.image_size),
                            recipe_lib.views(data.recipe),
                            interpolation=interpolation), sharded):
    sums = np.asarray(jax.device_get(fn(*args, batch)), np.float64)
    total = sums if total is None else total + sums
  return total


def _evenly_spaced_subset(source, num: int):
  """`source` restricted to `num` examples spread evenly over its index range.

  Spread, not the first `num`: an image folder is sorted by class, so its first
  examples would all be of the first classes.
  """
  return index_subset(source, (np.arange(num, dtype=np.int64) * source.num_examples) // num)


def feature_batches(model: nn.Module, variables, mesh: jax.sharding.Mesh, source, *,
                    batch_size: int, data: settings_lib.Data):
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
      pipeline.eval_batches(source, pipeline.BatchSpec(batch_size, data.image_size),
                            recipe_lib.views(data.recipe)),
      mesh_lib.batch_sharded(mesh))
  features_fn = encoder.features_fn(model, mesh, (data.mean, data.std))

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
                     batch_size: int, data: settings_lib.Data,
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
                                     batch_size=batch_size, data=data):
    feats.append(f)
    labels.append(label)
    count += len(label)
    if count >= limit:  # same count on every process: they all stop here
      break
  if not feats:
    raise ValueError(f"{source.name} split {source.split!r} gave no examples")
  return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]


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

  The bank is the train split (at most `knn.max_train_examples` of it, spread evenly),
  the queries the eval split, both centre crops through the network in inference
  mode; every k of `knn.ks` and temperature of `knn.temperatures` in one pass
  (knn.knn_accuracies). As a monitor (`run`, `run_on_state`) the bank and the queries
  are at most `knn.monitor_max_train_examples` and `knn.monitor_max_test_examples`,
  each spread evenly over its split. Every process returns the same numbers.
  """
  name = "knn"

  def __init__(self, knn_settings: settings_lib.Knn, data: settings_lib.Data,
               batch_size: int, model, mesh, train_source, eval_source):
    self._settings, self._data, self._batch_size = knn_settings, data, batch_size
    self._model, self._mesh = model, mesh
    self._train_source, self._eval_source = train_source, eval_source
    self.ks, self.temperatures = knn_settings.ks, knn_settings.temperatures

  def every_steps(self, steps_per_epoch: int) -> int:
    return loop.epochs_to_steps(self._settings.every_epochs, steps_per_epoch)

  def accuracies(self, variables, *, monitor: bool = False) -> tuple[dict, dict]:
    """({(k, T): {"top1", "top5"}} in percent, the bank and query counts); `monitor`:
    with the monitor's bank and query sizes."""
    kwargs = dict(batch_size=self._batch_size, data=self._data)
    knn_settings = self._settings
    max_bank, max_queries = knn_settings.max_train_examples, -1
    if monitor:
      if knn_settings.monitor_max_train_examples != -1:
        max_bank = knn_settings.monitor_max_train_examples
      max_queries = knn_settings.monitor_max_test_examples
    bank, bank_labels = extract_features(
        self._model, variables, self._mesh, self._train_source, max_examples=max_bank,
        **kwargs)
    queries, query_labels = extract_features(self._model, variables, self._mesh,
                                             self._eval_source, max_examples=max_queries,
                                             **kwargs)
    table = knn.knn_accuracies(bank, bank_labels, queries, query_labels,
                               self._train_source.num_classes, ks=self.ks,
                               temperatures=self.temperatures)
    return table, {"num_bank_examples": int(len(bank)),
                   "num_query_examples": int(len(queries))}

  def run(self, variables) -> dict:
    """The monitor: `knn_numbers` of the accuracies, and the bank and query counts."""
    table, counts = self.accuracies(variables, monitor=True)
    return {**knn_numbers(table, self.ks, self.temperatures), **counts}

  def run_on_state(self, state) -> dict:
    return self.run(train_state_lib.backbone_variables(state))


class OnlineProbeEvaluator:
  """Test accuracy of the online linear probe that pretraining trains (state.probe).

  Centre crops of the eval split through the backbone in inference mode, then the
  probe's Dense layer, every `online_probe.every_epochs` epochs.
  """
  name = "online_probe"

  def __init__(self, probe_settings: settings_lib.OnlineProbe, data: settings_lib.Data,
               batch_size: int, model, mesh, train_source, eval_source):
    del train_source
    self._settings, self._data, self._batch_size = probe_settings, data, batch_size
    self._model, self._mesh = model, mesh
    self._eval_source = eval_source

  def every_steps(self, steps_per_epoch: int) -> int:
    return loop.epochs_to_steps(self._settings.every_epochs, steps_per_epoch)

  def run_on_state(self, state) -> dict:
    """{"test_top1", "test_top5"} in percent, and the test count."""
    logits_fn = jax.jit(models.linear_logits)
    hits, count = np.zeros(2, np.int64), 0
    for feats, labels, _ in feature_batches(
        self._model, train_state_lib.backbone_variables(state), self._mesh,
        self._eval_source, batch_size=self._batch_size, data=self._data):
      logits = logits_fn(state.probe["params"], feats)
      hits += np.asarray(knn.topk_hits(logits, labels, np.ones(len(labels), bool)))
      count += len(labels)
    accuracy = knn.accuracy(hits, count)
    return {"test_top1": accuracy["top1"], "test_top5": accuracy["top5"],
            "num_test_examples": count}


# Each evaluator and the name of its section of settings.Eval (one line a new one).
EVALUATORS = {"knn": KnnEvaluator, "online_probe": OnlineProbeEvaluator}


def monitors_on(ev: settings_lib.Eval) -> bool:
  """Whether pretraining runs any evaluator (listed in ev.monitors, cadence > 0)."""
  return any(getattr(ev, name).every_epochs > 0 for name in ev.monitors)


def create_evaluators(ev: settings_lib.Eval, data: settings_lib.Data, model, mesh,
                      train_source, eval_source) -> list:
  """The evaluators `ev.monitors` lists whose own cadence is on (every_epochs > 0)."""
  out = []
  for name in ev.monitors:
    evaluator = EVALUATORS[name](getattr(ev, name), data, ev.batch_size, model, mesh,
                                 train_source, eval_source)
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
