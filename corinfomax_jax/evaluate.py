"""Evaluation on precomputed features: weighted kNN, linear probe, spectrum plot.

Everything here takes arrays and returns numbers or files; wiring into the train loop
(feature extraction, sharding of the bank, logging) is the trainer's job.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def _probe_learning_rate(lr, schedule, min_lr, total_steps):
  if schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=min_lr / lr)
  if schedule == "constant":
    return lr
  raise ValueError(f"linear probe schedule {schedule!r} is not supported; accepted: "
                   "'cosine', 'constant'")


def train_linear_probe_on_features(train_feats, train_labels, num_classes: int, *,
                                   epochs: int, batch_size: int, lr: float,
                                   momentum: float = 0.9, weight_decay: float = 0.0,
                                   schedule: str = "cosine", min_lr: float = 0.0,
                                   seed: int = 0) -> dict[str, jax.Array]:
  """Trains a linear classifier (softmax cross-entropy) on fixed features.

  SGD with momentum; weight decay is added to the gradient before momentum, as in
  torch.optim.SGD. With schedule="cosine" the learning rate decays per step from lr to
  min_lr over epochs * ceil(n / batch_size) steps. Each epoch sees every sample once
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
  learning_rate = _probe_learning_rate(lr, schedule, min_lr, epochs * steps_per_epoch)
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
