"""Evaluation: weighted kNN, linear probe, spectrum plot, and the evaluation modes.

The first half works on arrays (features in, numbers or files out). The second half runs
the network: `knn_monitor` (called by the train loop), and the `--mode`s `knn_eval` and
`linear_eval`, which read the pretraining checkpoint of a workdir and write their results
next to it. TensorFlow is imported only inside those functions, through the input
pipeline and the TensorBoard writer.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corinfomax_jax import models
from corinfomax_jax import train

# InstDisc / solo-learn kNN monitor defaults.
KNN_K = 200
KNN_TEMPERATURE = 0.07


def _l2_normalize(x: jax.Array) -> jax.Array:
  # As torch.nn.functional.normalize: a zero vector stays zero instead of NaN.
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


def _padded_chunks(x: np.ndarray | jax.Array, chunk_size: int):
  """Yields (chunk padded with zeros to chunk_size rows, number of real rows)."""
  for start in range(0, x.shape[0], chunk_size):
    chunk = x[start:start + chunk_size]
    n = chunk.shape[0]
    if n < chunk_size:
      pad = [(0, chunk_size - n)] + [(0, 0)] * (chunk.ndim - 1)
      chunk = (np.pad(chunk, pad) if isinstance(chunk, np.ndarray)
               else jnp.pad(chunk, pad))
    yield chunk, n


def _check_chunk_size(chunk_size: int) -> None:
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size {chunk_size!r} must be a positive integer")


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_chunk_scores(bank_normed, bank_labels, queries, temperature, *, num_classes,
                      k):
  """Weighted-vote class scores (chunk, num_classes) of one chunk of queries."""
  sim = jnp.matmul(_l2_normalize(queries.astype(jnp.float32)), bank_normed.T,
                   precision=jax.lax.Precision.HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, k)
  weights = jnp.exp(top_sim / temperature)
  labels = bank_labels[top_idx]
  # Scatter-add instead of a (chunk, k, num_classes) one-hot, which for ImageNet is
  # 0.8 GB per 1024 queries.
  return jax.vmap(lambda l, w: jnp.zeros((num_classes,), jnp.float32).at[l].add(w))(
      labels, weights)


def _knn_setup(bank_feats, bank_labels, query_feats, num_classes, k, chunk_size):
  _check_chunk_size(chunk_size)
  if bank_feats.ndim != 2 or query_feats.ndim != 2:
    raise ValueError(f"bank and query features must be 2-D (n, dim); got shapes "
                     f"{bank_feats.shape} and {query_feats.shape}")
  if bank_feats.shape[1] != query_feats.shape[1]:
    raise ValueError(f"bank feature dim {bank_feats.shape[1]} != query feature dim "
                     f"{query_feats.shape[1]}")
  if bank_labels.shape != (bank_feats.shape[0],):
    raise ValueError(f"bank_labels shape {bank_labels.shape} must be "
                     f"({bank_feats.shape[0]},), one label per bank row")
  if bank_feats.shape[0] == 0:
    raise ValueError("the kNN bank is empty")
  if k <= 0 or num_classes <= 0:
    raise ValueError(f"k ({k}) and num_classes ({num_classes}) must be positive")
  bank_normed = jax.jit(lambda b: _l2_normalize(b.astype(jnp.float32)))(bank_feats)
  labels = jnp.asarray(bank_labels, jnp.int32)
  return bank_normed, labels, min(k, bank_feats.shape[0])


def knn_classify(bank_feats, bank_labels, query_feats, num_classes: int, *,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                 chunk_size: int = 256) -> np.ndarray:
  """Class scores (num_queries, num_classes) of the weighted kNN classifier.

  As in InstDisc / solo-learn: features are L2-normalised, the k bank rows with the
  highest cosine similarity s vote for their label with weight exp(s / temperature).
  Queries go through a jitted function chunk_size rows at a time (the last chunk is
  padded), so no (num_queries x bank) matrix is formed. k is clipped to the bank size.
  bank_feats may be a sharded jax.Array.
  """
  bank_normed, labels, k = _knn_setup(bank_feats, bank_labels, query_feats, num_classes,
                                      k, chunk_size)
  scores = [
      np.asarray(_knn_chunk_scores(bank_normed, labels, chunk, temperature,
                                   num_classes=num_classes, k=k))[:n]
      for chunk, n in _padded_chunks(query_feats, chunk_size)
  ]
  if not scores:
    return np.zeros((0, num_classes), np.float32)
  return np.concatenate(scores)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_chunk_hits(bank_normed, bank_labels, queries, query_labels, valid, temperature,
                    *, num_classes, k):
  scores = _knn_chunk_scores(bank_normed, bank_labels, queries, temperature,
                             num_classes=num_classes, k=k)
  return _topk_hits(scores, query_labels, valid)


def _topk_hits(scores: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """[top-1 hits, top-5 hits] over the rows where valid is True."""
  ranked = jax.lax.top_k(scores, min(5, scores.shape[-1]))[1]
  correct = (ranked == labels[:, None]) & valid[:, None]
  return jnp.stack([correct[:, 0].sum(), correct.any(axis=1).sum()])


def _accuracy(hits: np.ndarray, count: int) -> dict[str, float]:
  if count == 0:
    raise ValueError("no samples to evaluate")
  return {"top1": 100.0 * float(hits[0]) / count,
          "top5": 100.0 * float(hits[1]) / count}


def _labels_and_masks(labels, chunk_size):
  for chunk, n in _padded_chunks(np.asarray(labels, np.int32), chunk_size):
    yield chunk, np.arange(chunk_size) < n


def knn_accuracy(bank_feats, bank_labels, query_feats, query_labels,
                 num_classes: int, *, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE,
                 chunk_size: int = 256) -> dict[str, float]:
  """{"top1", "top5"} accuracy in percent of the weighted kNN (see knn_classify)."""
  bank_normed, labels, k = _knn_setup(bank_feats, bank_labels, query_feats, num_classes,
                                      k, chunk_size)
  if np.shape(query_labels) != (query_feats.shape[0],):
    raise ValueError(f"query_labels shape {np.shape(query_labels)} must be "
                     f"({query_feats.shape[0]},)")
  hits = np.zeros(2, np.int64)
  for (chunk, _), (chunk_labels, valid) in zip(
      _padded_chunks(query_feats, chunk_size),
      _labels_and_masks(query_labels, chunk_size)):
    hits += np.asarray(_knn_chunk_hits(bank_normed, labels, chunk, chunk_labels, valid,
                                       temperature, num_classes=num_classes, k=k))
  return _accuracy(hits, query_feats.shape[0])


def plot_spectra(spectra: Sequence[tuple[int, np.ndarray]], path: str | os.PathLike, *,
                 title: str = "Covariance eigenvalues", figsize=(6.4, 4.8),
                 dpi: int = 100) -> str | os.PathLike:
  """Writes a PNG of eigenvalue spectra (descending, log y), one line per step.

  Eigenvalues below 1e-12 (collapsed directions, or tiny negative values from
  rounding) are drawn at 1e-12 so they show at the bottom instead of vanishing from a
  log axis. The image is figsize * dpi pixels. Returns path.
  """
  # Agg canvas on a bare Figure: no pyplot global state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not spectra:
    raise ValueError("plot_spectra needs at least one (step, eigenvalues) pair")
  floor = 1e-12
  fig = Figure(figsize=figsize, dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for step, eigenvalues in spectra:
    values = np.sort(np.asarray(eigenvalues, np.float64).ravel())[::-1]
    ax.plot(np.arange(values.size), np.maximum(values, floor), label=f"step {step}")
  ax.axhline(1e-8, color="gray", linestyle="--", linewidth=1, label="1e-8")
  ax.set_yscale("log")
  ax.set_xlabel("eigenvalue index (descending)")
  ax.set_ylabel(f"eigenvalue (clipped at {floor:g})")
  ax.set_title(title)
  ax.legend(fontsize="small")
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format="png", dpi=dpi)
  return path


def _linear_logits(params: Any, feats: jax.Array) -> jax.Array:
  return nn.Dense(params["kernel"].shape[-1]).apply({"params": params},
                                                     feats.astype(jnp.float32))


LINEAR_SCHEDULES = ("cosine", "step", "constant")


def linear_probe_schedule(lr: float, schedule: str, *, steps_per_epoch: int, epochs: int,
                          min_lr: float = 0.0, step_epochs: int = 20) -> optax.Schedule:
  """The probe's per-step learning rate.

  "cosine": from lr to min_lr over epochs * steps_per_epoch steps; "step": lr times 0.1
  every step_epochs epochs (the ImageNet-1K protocol; min_lr unused); "constant": lr.
  """
  if schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(epochs * steps_per_epoch, 1),
                                       alpha=min_lr / lr)
  if schedule == "step":
    if not isinstance(step_epochs, int) or step_epochs <= 0:
      raise ValueError(f"step_epochs {step_epochs!r} must be a positive integer")
    return optax.piecewise_constant_schedule(
        lr, {e * steps_per_epoch: 0.1 for e in range(step_epochs, epochs, step_epochs)})
  if schedule == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"linear probe schedule {schedule!r} is not supported; accepted: "
                   f"{', '.join(repr(s) for s in LINEAR_SCHEDULES)}")


def train_linear_probe_on_features(train_feats, train_labels, num_classes: int, *,
                                   epochs: int, batch_size: int, lr: float,
                                   momentum: float = 0.9, weight_decay: float = 0.0,
                                   schedule: str = "cosine", min_lr: float = 0.0,
                                   step_epochs: int = 20,
                                   seed: int = 0) -> dict[str, jax.Array]:
  """Trains a linear classifier (softmax cross-entropy) on fixed features.

  SGD with momentum; weight decay is added to the gradient before momentum, as in
  torch.optim.SGD. The learning rate follows `linear_probe_schedule` with
  ceil(n / batch_size) steps per epoch (schedule "cosine": per step from lr to min_lr;
  "step": x0.1 every step_epochs epochs; "constant"). Each epoch sees every sample once
  in a fresh random order (the last batch is padded and the padding masked out).
  Returns params {"kernel": (dim, num_classes), "bias": (num_classes,)}.
  """
  feats = jnp.asarray(train_feats, jnp.float32)
  labels = jnp.asarray(train_labels, jnp.int32)
  n, dim = feats.shape
  if labels.shape != (n,):
    raise ValueError(f"train_labels shape {labels.shape} must be ({n},)")
  if n == 0 or epochs <= 0 or batch_size <= 0 or lr <= 0:
    raise ValueError(f"need samples and positive epochs, batch_size, lr; got n={n}, "
                     f"epochs={epochs}, batch_size={batch_size}, lr={lr}")
  batch_size = min(batch_size, n)
  steps_per_epoch = math.ceil(n / batch_size)
  learning_rate = linear_probe_schedule(lr, schedule, steps_per_epoch=steps_per_epoch,
                                        epochs=epochs, min_lr=min_lr,
                                        step_epochs=step_epochs)
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(learning_rate, momentum=momentum))

  init_key, key = jax.random.split(jax.random.key(seed))
  params = nn.Dense(num_classes).init(init_key, jnp.zeros((1, dim)))["params"]
  opt_state = tx.init(params)

  @jax.jit
  def train_epoch(params, opt_state, feats, labels, key):
    order = jax.random.permutation(key, n)
    padded = jnp.resize(order, steps_per_epoch * batch_size)  # repeats: masked below
    valid = jnp.arange(padded.size) < n
    batches = (padded.reshape(steps_per_epoch, batch_size),
               valid.reshape(steps_per_epoch, batch_size).astype(jnp.float32))

    def step(carry, batch):
      params, opt_state = carry
      idx, weight = batch

      def loss_fn(params):
        losses = optax.softmax_cross_entropy_with_integer_labels(
            _linear_logits(params, feats[idx]), labels[idx])
        return jnp.sum(losses * weight) / jnp.sum(weight)

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state, losses.mean()

  for epoch_key in jax.random.split(key, epochs):
    params, opt_state, _ = train_epoch(params, opt_state, feats, labels, epoch_key)
  return params


@jax.jit
def _probe_chunk_hits(params, feats, labels, valid):
  return _topk_hits(_linear_logits(params, feats), labels, valid)


def linear_probe_accuracy(params: dict[str, jax.Array], feats, labels, *,
                          chunk_size: int = 4096) -> dict[str, float]:
  """{"top1", "top5"} accuracy in percent of train_linear_probe_on_features' params."""
  _check_chunk_size(chunk_size)
  if np.shape(labels) != (feats.shape[0],):
    raise ValueError(f"labels shape {np.shape(labels)} must be ({feats.shape[0]},)")
  hits = np.zeros(2, np.int64)
  for (chunk, _), (chunk_labels, valid) in zip(
      _padded_chunks(feats, chunk_size), _labels_and_masks(labels, chunk_size)):
    hits += np.asarray(_probe_chunk_hits(params, chunk, chunk_labels, valid))
  return _accuracy(hits, feats.shape[0])


# ---------------------------------------------------------------------------------
# Evaluation modes: the network on data.
# ---------------------------------------------------------------------------------
LINEAR_VARIANT = "frozen_backbone_random_resized_crop"  # the paper's protocol
PRECOMPUTED_VARIANT = "precomputed_center_crop_features"
KNN_RESULT_FILE = "knn_eval.json"
LINEAR_DIR = "linear_eval"  # TensorBoard events and probe checkpoints, in the workdir
LINEAR_RESULT_FILE = "linear_eval.json"
# Probe hyperparameters a resumed probe must share with the run that wrote it.
_LINEAR_KEYS = ("linear_epochs", "linear_batch_size", "linear_lr", "linear_min_lr",
                "linear_schedule", "linear_step_epochs", "linear_weight_decay",
                "linear_momentum")


def validate_eval_config(config) -> None:
  """Raises train.ConfigError naming the first config.eval value that cannot work."""
  ev = config.eval

  def need(ok, key, accepted):
    if not ok:
      raise train.ConfigError(
          f"config.eval.{key} = {ev[key]!r} is invalid: expected {accepted}")

  def is_int(key):
    return isinstance(ev[key], int) and not isinstance(ev[key], bool)

  def is_number(key):
    return (isinstance(ev[key], (int, float)) and not isinstance(ev[key], bool)
            and math.isfinite(ev[key]))

  for key in ("batch_size", "knn_k", "linear_epochs", "linear_batch_size",
              "linear_step_epochs"):
    need(is_int(key) and ev[key] > 0, key, "a positive integer")
  need(is_int("knn_every_epochs") and ev.knn_every_epochs >= 0, "knn_every_epochs",
       "an integer >= 0 (0: no kNN monitor)")
  for key in ("max_train_examples", "linear_max_steps"):
    need(is_int(key) and (ev[key] == -1 or ev[key] > 0), key,
         "a positive integer, or -1 for no limit")
  for key in ("knn_temperature", "linear_lr"):
    need(is_number(key) and ev[key] > 0, key, "a positive number")
  for key in ("linear_min_lr", "linear_weight_decay"):
    need(is_number(key) and ev[key] >= 0, key, "a number >= 0")
  need(is_number("linear_momentum") and 0 <= ev.linear_momentum < 1, "linear_momentum",
       "a number in [0, 1)")
  need(ev.linear_schedule in LINEAR_SCHEDULES, "linear_schedule",
       f"one of {list(LINEAR_SCHEDULES)}")
  need(isinstance(ev.random_init, bool), "random_init", "True or False")
  need(isinstance(ev.linear_precomputed, bool), "linear_precomputed", "True or False")


def _sources(config):
  """(train source, eval source) of config.dataset, checked to share their classes."""
  from corinfomax_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  train_source = input_pipeline.get_source(config.dataset, config.data_dir,
                                           config.train_split,
                                           skip_bad_images=config.skip_bad_images)
  eval_source = input_pipeline.get_source(config.dataset, config.data_dir,
                                          config.eval_split,
                                          skip_bad_images=config.skip_bad_images)
  if train_source.class_names != eval_source.class_names:
    only_train = sorted(set(train_source.class_names) - set(eval_source.class_names))
    only_eval = sorted(set(eval_source.class_names) - set(train_source.class_names))
    raise train.ConfigError(
        f"{config.dataset}: splits {config.train_split!r} ({train_source.num_classes} "
        f"classes) and {config.eval_split!r} ({eval_source.num_classes} classes) must "
        f"have the same classes, for labels to agree; only in {config.train_split!r}: "
        f"{only_train[:5]}, only in {config.eval_split!r}: {only_eval[:5]}.")
  return train_source, eval_source


def _evenly_spaced_subset(source, num: int):
  """`source` restricted to `num` examples spread evenly over its index range.

  Spread, not the first `num`: an image folder is sorted by class, so its first
  examples would all be of the first classes.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  index = (np.arange(num, dtype=np.int64) * source.num_examples) // num
  index_t = tf.constant(index)
  return dataclasses.replace(
      source, num_examples=num,
      load_batch=lambda i: source.load_batch(tf.gather(index_t, i)),
      describe=lambda i: source.describe(int(index[int(i)])), skipped=[], _bad=set())


@functools.lru_cache(maxsize=None)
def _features_fn(model: nn.Module, mesh: jax.sharding.Mesh):
  """Backbone features of a global batch, jitted like the train step (cached per model)."""

  def features(variables, images):
    return model.apply(variables, images, train=False)[0]

  return jax.jit(features, in_shardings=(NamedSharding(mesh, P()),
                                         NamedSharding(mesh, P(train.DATA_AXIS))),
                 out_shardings=NamedSharding(mesh, P(train.DATA_AXIS)))


def _backbone_variables(state: train.TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def extract_features(model: nn.Module, variables, mesh: jax.sharding.Mesh, source, *,
                     batch_size: int, image_size: int, aug_config=None,
                     max_examples: int = -1) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, dim] float32, labels [n] int32) of `source`, centre crops, on every host.

  Images go through input_pipeline.eval_batches (resize + centre crop) in global
  batches sharded over the mesh's "data" axis; padding rows are dropped. Each batch's
  features are gathered to every process (process_allgather), one batch behind the
  computation, so devices hold one batch at a time while hosts hold all n rows:
  n * dim * 4 bytes, 10.5 GB per host for ImageNet-1K with ResNet-50 (2048-d).
  max_examples (-1: all) keeps that many examples spread evenly over the split.
  """
  from corinfomax_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  limit = source.num_examples if max_examples == -1 else min(max_examples,
                                                             source.num_examples)
  if limit < source.num_examples and source.random_access:
    source = _evenly_spaced_subset(source, limit)
  # A streamed source cannot be subset by index: it stops after its first `limit` rows.
  batches = input_pipeline.global_batches(
      input_pipeline.eval_batches(source, global_batch_size=batch_size,
                                  image_size=image_size, aug_config=aug_config),
      NamedSharding(mesh, P(train.DATA_AXIS)))
  features_fn = _features_fn(model, mesh)
  feats, labels = [], []

  def fetch(pending):
    f, label, mask = multihost_utils.process_allgather(pending, tiled=True)
    keep = mask > 0
    feats.append(np.asarray(f[keep], np.float32))
    labels.append(np.asarray(label[keep], np.int32))

  pending, count = None, 0
  for batch in batches:
    computed = (features_fn(variables, batch["image"]), batch["label"], batch["mask"])
    if pending is not None:
      fetch(pending)
      count += len(labels[-1])
      if count >= limit:  # same count on every process: they all stop here
        pending = None
        break
    pending = computed
  if pending is not None:
    fetch(pending)
  if not feats:
    raise ValueError(f"{source.name} split {source.split!r} gave no examples")
  return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]


def _knn_result(config, model, variables, mesh) -> dict:
  """kNN accuracy of the backbone `variables`, with the bank and query counts."""
  train.check_batch_divides(config.eval.batch_size, jax.device_count(),  # the monitor's check
                            jax.process_count(), key="eval.batch_size")
  train_source, eval_source = _sources(config)
  kwargs = dict(batch_size=config.eval.batch_size, image_size=config.image_size,
                aug_config=train.aug_overrides(config))
  bank, bank_labels = extract_features(model, variables, mesh, train_source,
                                       max_examples=config.eval.max_train_examples,
                                       **kwargs)
  queries, query_labels = extract_features(model, variables, mesh, eval_source, **kwargs)
  accuracy = knn_accuracy(bank, bank_labels, queries, query_labels,
                          train_source.num_classes, k=config.eval.knn_k,
                          temperature=config.eval.knn_temperature)
  return {**accuracy, "num_bank_examples": int(len(bank)),
          "num_query_examples": int(len(queries))}


def knn_monitor(config, model: nn.Module,
                state: train.TrainState, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """{"top1", "top5"} in percent: weighted kNN of the backbone features of `state`.

  The bank is config.train_split (at most config.eval.max_train_examples of it), the
  queries config.eval_split, both centre crops through the network in inference mode;
  k = config.eval.knn_k, temperature config.eval.knn_temperature. Every process returns
  the same numbers. Does not change `state`.
  """
  start = time.time()
  result = _knn_result(config, model, _backbone_variables(state), mesh)
  logging.info("kNN monitor at step %d: top-1 %.2f top-5 %.2f (%d bank, %d queries, "
               "%.1f s).", int(state.step), result["top1"], result["top5"],
               result["num_bank_examples"], result["num_query_examples"],
               time.time() - start)
  return {"top1": result["top1"], "top5": result["top5"]}


def _template_state(config, model, mesh) -> train.TrainState:
  """The seeded initial train state: the random network, and the checkpoint template."""
  # Only the optimizer state's structure matters here, not the schedule's length.
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 1))
  return train.create_train_state(config, model, tx, mesh)


def _pretrained_state(config, model, mesh, workdir: str, hint: str) -> train.TrainState:
  """The latest pretraining checkpoint of `workdir`; ConfigError when there is none."""
  directory = train.checkpoint_dir(workdir)
  missing = train.ConfigError(
      f"No pretraining checkpoint in workdir {workdir!r} (looked in {directory}). "
      f"Pretrain first with --mode=pretrain and this --workdir{hint}.")
  if not os.path.isdir(directory):
    raise missing
  template = _template_state(config, model, mesh)
  manager = train.create_checkpoint_manager(workdir, config)
  try:
    state, _ = train.restore_checkpoint(manager, template, config, set_aside=False)
  finally:
    manager.close()
  if state is None:
    raise missing
  logging.info("Loaded the pretraining checkpoint of step %d from %s.", int(state.step),
               directory)
  return state


def _write_json(path: str, result: dict) -> None:
  """Writes `result` from process 0, atomically (a reader never sees half a file)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def knn_eval(config, workdir: str) -> dict:
  """--mode=knn_eval: kNN accuracy of the workdir's latest checkpoint (or random init).

  With config.eval.random_init the network is the seeded initialisation
  (train.create_train_state with config.seed) and no checkpoint is read. Writes
  <workdir>/knn_eval.json and returns the same dict: top1, top5 (percent), step,
  random_init, num_bank_examples, num_query_examples, k, temperature, dataset, splits.
  """
  train.validate_config(config)
  validate_eval_config(config)
  train.check_batch_divides(config.eval.batch_size, jax.device_count(),
                            jax.process_count(), key="eval.batch_size")
  mesh = train.make_mesh()
  model = train.create_model(config)
  random_init = config.eval.random_init
  if random_init:
    state = _template_state(config, model, mesh)
  else:
    state = _pretrained_state(config, model, mesh, workdir,
                              ", or set config.eval.random_init=True to evaluate the "
                              "random initialisation")
  result = _knn_result(config, model, _backbone_variables(state), mesh)
  result.update(step=int(state.step), random_init=random_init, k=config.eval.knn_k,
                temperature=config.eval.knn_temperature, dataset=config.dataset,
                train_split=config.train_split, eval_split=config.eval_split)
  path = os.path.join(workdir, KNN_RESULT_FILE)
  _write_json(path, result)
  logging.info("kNN (k=%d, T=%g) of %s at step %d: top-1 %.2f top-5 %.2f (%d bank, %d "
               "queries); written to %s.", result["k"], result["temperature"],
               "the random initialisation" if random_init else "the checkpoint",
               result["step"], result["top1"], result["top5"],
               result["num_bank_examples"], result["num_query_examples"], path)
  return result


# --- Linear probe on the frozen backbone. ------------------------------------------
@flax.struct.dataclass
class ProbeState:
  """The linear probe's training state; its checkpoint is exactly this pytree."""
  step: jax.Array
  params: Any  # {"kernel": (dim, num_classes), "bias": (num_classes,)}
  opt_state: Any


def create_probe_state(num_features: int, num_classes: int,
                       tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       seed: int) -> ProbeState:
  """The initial probe (flax Dense initialisation), created replicated on `mesh`."""

  def init(rng):
    params = nn.Dense(num_classes).init(rng, jnp.zeros((1, num_features)))["params"]
    return ProbeState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.PRNGKey(seed))


def probe_train_step(probe: ProbeState, variables, batch, *, model, tx,
                     learning_rate_fn):
  """One SGD step of the probe on {"image", "label"}: (new probe, metrics).

  The backbone runs in inference mode (BatchNorm uses its running statistics, which
  stay as they are) and its features are cut from the gradient: only the probe trains.
  """
  features = jax.lax.stop_gradient(model.apply(variables, batch["image"], train=False)[0])

  def loss_fn(params):
    logits = _linear_logits(params, features)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe.params)
  updates, opt_state = tx.update(grads, probe.opt_state, probe.params)
  metrics = {"loss": loss,
             "top1": 100.0 * jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "learning_rate": learning_rate_fn(probe.step)}
  return probe.replace(step=probe.step + 1,
                       params=optax.apply_updates(probe.params, updates),
                       opt_state=opt_state), metrics


def _probe_eval_hits(params, variables, batch, *, model):
  """[top-1 hits, top-5 hits, real rows] of one padded eval batch."""
  features = model.apply(variables, batch["image"], train=False)[0]
  valid = batch["mask"] > 0
  return jnp.concatenate([_topk_hits(_linear_logits(params, features), batch["label"],
                                     valid), valid.sum()[None]])


def _probe_checkpoint_manager(workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), LINEAR_DIR,
                                            "checkpoints"),
                               options=options, item_names=("probe", "run"))


def _probe_record(config, pretrain_step: int) -> dict:
  return {"pretrain_step": pretrain_step,
          "eval": {k: config.eval[k] for k in _LINEAR_KEYS}}


def _restore_probe(manager, template: ProbeState, record: dict):
  """The latest probe checkpoint, or None; refuses one of another backbone or protocol."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = manager.latest_step()
  if step is None:
    return None
  saved = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
  if saved != record:
    raise train.ConfigError(
        f"The linear probe checkpoints in {manager.directory} were written for {saved}, "
        f"but this run is {record} (the pretraining checkpoint or config.eval.linear_* "
        "changed). Move that directory away to train a new probe, or use the original "
        "configuration.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  return manager.restore(step, args=ocp.args.Composite(
      probe=ocp.args.StandardRestore(abstract)))["probe"]


def _linear_eval_augmented(config, workdir, model, variables, pretrain_step, mesh,
                           train_source, eval_source, writer) -> dict:
  """The paper's protocol: random resized crops through the frozen backbone, resumable."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  ev = config.eval
  batch_size = ev.linear_batch_size
  if batch_size > train_source.num_examples:
    raise train.ConfigError(
        f"config.eval.linear_batch_size = {batch_size} exceeds the "
        f"{train_source.num_examples} examples of {config.dataset} "
        f"{config.train_split!r}: use a smaller batch.")
  steps_per_epoch = input_pipeline.steps_per_epoch(train_source.num_examples, batch_size)
  num_steps = ev.linear_epochs * steps_per_epoch
  if ev.linear_max_steps != -1:
    num_steps = min(num_steps, ev.linear_max_steps)
  learning_rate_fn = linear_probe_schedule(
      ev.linear_lr, ev.linear_schedule, steps_per_epoch=steps_per_epoch,
      epochs=ev.linear_epochs, min_lr=ev.linear_min_lr, step_epochs=ev.linear_step_epochs)
  tx = optax.chain(optax.add_decayed_weights(ev.linear_weight_decay),
                   optax.sgd(learning_rate_fn, momentum=ev.linear_momentum))
  probe = create_probe_state(models.backbone_feature_dim(config.model, config.width),
                             train_source.num_classes, tx, mesh, config.seed)

  # --- Resume: the data position is the probe's step.
  manager = _probe_checkpoint_manager(workdir)
  record = _probe_record(config, pretrain_step)
  restored = _restore_probe(manager, probe, record)
  if restored is not None:
    probe = restored
    logging.info("Linear probe resumed from %s at step %d of %d.", manager.directory,
                 int(probe.step), num_steps)
  start_step = int(probe.step)

  # --- Train.
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(train.DATA_AXIS))
  p_train_step = jax.jit(
      functools.partial(probe_train_step, model=model, tx=tx,
                        learning_rate_fn=learning_rate_fn),
      in_shardings=(replicated, replicated, data), out_shardings=(replicated, replicated),
      donate_argnums=(0,))
  logging.info("Linear probe (%s): steps %d to %d, batch %d, %d steps per epoch, lr %g "
               "%s.", LINEAR_VARIANT, start_step, num_steps, batch_size, steps_per_epoch,
               ev.linear_lr, ev.linear_schedule)
  if start_step < num_steps:
    batches = input_pipeline.global_batches(
        input_pipeline.probe_train_batches(
            train_source, global_batch_size=batch_size, image_size=config.image_size,
            seed=config.seed, start_step=start_step, aug_config=train.aug_overrides(config)),
        data)
    pending, last_time = [], time.time()
    for step in range(start_step + 1, num_steps + 1):
      probe, metrics = p_train_step(probe, variables, next(batches))
      pending.append(metrics)
      if step % steps_per_epoch == 0 or step == num_steps:
        fetched = jax.device_get(pending)
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        if not math.isfinite(mean["loss"]):
          manager.wait_until_finished()
          raise train.NonFiniteLossError(
              f"The linear probe's loss is {mean['loss']} by step {step}; lower "
              f"config.eval.linear_lr ({ev.linear_lr}).")
        now = time.time()
        logging.info("linear probe step %d/%d epoch %.2f loss %.4f train top-1 %.2f "
                     "lr %.5f images/s %.1f", step, num_steps, step / steps_per_epoch,
                     mean["loss"], mean["top1"], mean["learning_rate"],
                     len(pending) * batch_size / max(now - last_time, 1e-9))
        writer.scalars(step, {f"linear/train_{k}": v for k, v in mean.items()})
        pending, last_time = [], now
        manager.save(step, args=ocp.args.Composite(probe=ocp.args.StandardSave(probe),
                                                   run=ocp.args.JsonSave(record)))
  manager.wait_until_finished()
  manager.close()

  # --- Test: resize + centre crop, padding masked.
  p_eval = jax.jit(functools.partial(_probe_eval_hits, model=model),
                   in_shardings=(replicated, replicated, data), out_shardings=replicated)
  hits = np.zeros(3, np.int64)
  for batch in input_pipeline.global_batches(
      input_pipeline.eval_batches(eval_source, global_batch_size=ev.batch_size,
                                  image_size=config.image_size,
                                  aug_config=train.aug_overrides(config)), data):
    hits += np.asarray(jax.device_get(p_eval(probe.params, variables, batch)))
  return {**_accuracy(hits[:2], int(hits[2])), "step": int(probe.step),
          "trained_steps": int(probe.step) - start_step, "num_steps": num_steps,
          "steps_per_epoch": steps_per_epoch,
          "num_train_examples": train_source.num_examples,
          "num_test_examples": int(hits[2])}


def _linear_eval_precomputed(config, model, variables, mesh, train_source,
                             eval_source) -> dict:
  """The faster variant: one pass of centre-crop features, then the probe on them."""
  ev = config.eval
  kwargs = dict(batch_size=ev.batch_size, image_size=config.image_size,
                aug_config=train.aug_overrides(config))
  train_feats, train_labels = extract_features(model, variables, mesh, train_source,
                                               **kwargs)
  test_feats, test_labels = extract_features(model, variables, mesh, eval_source,
                                             **kwargs)
  logging.info("Linear probe (%s): %d epochs on %d features, lr %g %s.",
               PRECOMPUTED_VARIANT, ev.linear_epochs, len(train_feats), ev.linear_lr,
               ev.linear_schedule)
  params = train_linear_probe_on_features(
      train_feats, train_labels, train_source.num_classes, epochs=ev.linear_epochs,
      batch_size=ev.linear_batch_size, lr=ev.linear_lr, momentum=ev.linear_momentum,
      weight_decay=ev.linear_weight_decay, schedule=ev.linear_schedule,
      min_lr=ev.linear_min_lr, step_epochs=ev.linear_step_epochs, seed=config.seed)
  return {**linear_probe_accuracy(params, test_feats, test_labels),
          "num_train_examples": int(len(train_feats)),
          "num_test_examples": int(len(test_feats))}


def linear_eval(config, workdir: str) -> dict:
  """--mode=linear_eval: a linear probe on the frozen backbone of the latest checkpoint.

  The paper's protocol (config.eval.linear_*): a Dense(num_classes) on the pooled
  backbone features, trained with SGD momentum on random resized crops + flips of the
  train split, the backbone in inference mode and out of the gradient; tested on centre
  crops of config.eval_split. Its checkpoints (<workdir>/linear_eval/checkpoints) are
  resumed. With config.eval.linear_precomputed the probe instead trains on centre-crop
  features extracted once (faster; labelled "variant": "precomputed_center_crop_features").
  config.eval.linear_lr is used as given, not scaled with linear_batch_size (the
  paper's 0.2 is for batch 256). Probe checkpoints are written at the end of each epoch.
  Logs and writes top-1/top-5 to TensorBoard (<workdir>/linear_eval) and
  <workdir>/linear_eval.json, and returns that dict.
  """
  train.validate_config(config)
  validate_eval_config(config)
  train.check_batch_divides(config.eval.batch_size, jax.device_count(),
                            jax.process_count(), key="eval.batch_size")
  if not config.eval.linear_precomputed:
    train.check_batch_divides(config.eval.linear_batch_size, jax.device_count(),
                              jax.process_count(), key="eval.linear_batch_size")
  mesh = train.make_mesh()
  model = train.create_model(config)
  state = _pretrained_state(config, model, mesh, workdir, "")
  pretrain_step = int(state.step)
  variables = _backbone_variables(state)
  train_source, eval_source = _sources(config)
  ev = config.eval
  writer = train.MetricWriter(os.path.join(workdir, LINEAR_DIR))
  try:
    if ev.linear_precomputed:
      variant, tag = PRECOMPUTED_VARIANT, "linear_precomputed"
      result = _linear_eval_precomputed(config, model, variables, mesh, train_source,
                                        eval_source)
    else:
      variant, tag = LINEAR_VARIANT, "linear"
      result = _linear_eval_augmented(config, workdir, model, variables, pretrain_step,
                                      mesh, train_source, eval_source, writer)
    # Test accuracy against the pretraining step: probes of successive checkpoints of a
    # run form one curve.
    writer.scalars(pretrain_step, {f"{tag}/test_top1": result["top1"],
                                   f"{tag}/test_top5": result["top5"]})
  finally:
    writer.close()
  result.update(variant=variant, pretrain_step=pretrain_step, dataset=config.dataset,
                train_split=config.train_split, eval_split=config.eval_split,
                **{k[len("linear_"):]: ev[k] for k in _LINEAR_KEYS})
  path = os.path.join(workdir, LINEAR_RESULT_FILE)
  _write_json(path, result)
  logging.info("Linear probe (%s) on the checkpoint of step %d: top-1 %.2f top-5 %.2f "
               "on %d %s images; written to %s.", variant, result["pretrain_step"],
               result["top1"], result["top5"], result["num_test_examples"],
               config.eval_split, path)
  return result
