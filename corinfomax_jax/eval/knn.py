"""Weighted k-nearest-neighbour classification of features, and top-k accuracy.

Arrays in, numbers out (no network, no data pipeline): the kNN monitor and
`--mode=knn_eval` call these on backbone features.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from corinfomax_jax.methods import corinfomax as objective

# InstDisc's weighted kNN (Wu et al., 2018): k = 200, temperature 0.07.
KNN_K = 200
KNN_TEMPERATURE = 0.07


def padded_chunks(x: np.ndarray | jax.Array, chunk_size: int):
  """Yields (chunk padded with zeros to chunk_size rows, number of real rows)."""
  for start in range(0, x.shape[0], chunk_size):
    chunk = x[start:start + chunk_size]
    n = chunk.shape[0]
    if n < chunk_size:
      pad = [(0, chunk_size - n)] + [(0, 0)] * (chunk.ndim - 1)
      chunk = (np.pad(chunk, pad) if isinstance(chunk, np.ndarray)
               else jnp.pad(chunk, pad))
    yield chunk, n


def check_chunk_size(chunk_size: int) -> None:
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size {chunk_size!r} must be a positive integer")


def _votes(top_sim, top_labels, temperature, num_classes):
  """Class scores: each of the neighbours votes for its label with exp(sim / T)."""
  weights = jnp.exp(top_sim / temperature)
  # Scatter-add instead of a (chunk, k, num_classes) one-hot, which for ImageNet is
  # 0.8 GB per 1024 queries.
  return jax.vmap(lambda l, w: jnp.zeros((num_classes,), jnp.float32).at[l].add(w))(
      top_labels, weights)


def _neighbours(bank_normed, bank_labels, queries, k):
  """(cosine similarities, labels) of each query's k nearest bank rows, most similar first."""
  sim = jnp.matmul(objective.l2_normalize(queries.astype(jnp.float32)), bank_normed.T,
                   precision=jax.lax.Precision.HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, k)
  return top_sim, bank_labels[top_idx]


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_chunk_scores(bank_normed, bank_labels, queries, temperature, *, num_classes,
                      k):
  """Weighted-vote class scores (chunk, num_classes) of one chunk of queries."""
  top_sim, top_labels = _neighbours(bank_normed, bank_labels, queries, k)
  return _votes(top_sim, top_labels, temperature, num_classes)


def _knn_setup(bank_feats, bank_labels, query_feats, num_classes, k, chunk_size):
  check_chunk_size(chunk_size)
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
  bank_normed = jax.jit(lambda b: objective.l2_normalize(b.astype(jnp.float32)))(bank_feats)
  labels = jnp.asarray(bank_labels, jnp.int32)
  return bank_normed, labels, min(k, bank_feats.shape[0])


def knn_classify(bank_feats, bank_labels, query_feats, num_classes: int, *,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                 chunk_size: int = 256) -> np.ndarray:
  """Class scores (num_queries, num_classes) of the weighted kNN classifier.

  As in InstDisc (Wu et al., 2018): features are L2-normalised, the k bank rows with the
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
      for chunk, n in padded_chunks(query_feats, chunk_size)
  ]
  if not scores:
    return np.zeros((0, num_classes), np.float32)
  return np.concatenate(scores)


@functools.partial(jax.jit, static_argnames=("num_classes", "ks"))
def _knn_chunk_hits(bank_normed, bank_labels, queries, query_labels, valid, temperatures,
                    *, num_classes, ks):
  """[len(ks), len(temperatures), 2] top-1/top-5 hits of one chunk of queries.

  One top-k of the largest k; a smaller k takes the first k of those neighbours (top_k
  returns them most similar first), which is exactly its own top-k.
  """
  top_sim, top_labels = _neighbours(bank_normed, bank_labels, queries, max(ks))
  return jnp.stack([
      jax.vmap(lambda t, k=k: topk_hits(
          _votes(top_sim[:, :k], top_labels[:, :k], t, num_classes), query_labels,
          valid))(temperatures)
      for k in ks])


def topk_hits(scores: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """[top-1 hits, top-5 hits] over the rows where valid is True."""
  ranked = jax.lax.top_k(scores, min(5, scores.shape[-1]))[1]
  correct = (ranked == labels[:, None]) & valid[:, None]
  return jnp.stack([correct[:, 0].sum(), correct.any(axis=1).sum()])


def accuracy(hits: np.ndarray, count: int) -> dict[str, float]:
  if count == 0:
    raise ValueError("no samples to evaluate")
  return {"top1": 100.0 * float(hits[0]) / count,
          "top5": 100.0 * float(hits[1]) / count}


def labels_and_masks(labels, chunk_size):
  for chunk, n in padded_chunks(np.asarray(labels, np.int32), chunk_size):
    yield chunk, np.arange(chunk_size) < n


def knn_accuracy(bank_feats, bank_labels, query_feats, query_labels,
                 num_classes: int, *, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE,
                 chunk_size: int = 256) -> dict[str, float]:
  """{"top1", "top5"} accuracy in percent of the weighted kNN (see knn_classify)."""
  return knn_accuracies(bank_feats, bank_labels, query_feats, query_labels, num_classes,
                        ks=(k,), temperatures=(temperature,),
                        chunk_size=chunk_size)[(k, temperature)]


def knn_accuracies(bank_feats, bank_labels, query_feats, query_labels,
                   num_classes: int, *, ks=(10, 20, 100, 200),
                   temperatures=(KNN_TEMPERATURE,),
                   chunk_size: int = 256) -> dict[tuple[int, float], dict[str, float]]:
  """{(k, temperature): {"top1", "top5"}} of the weighted kNN, in one pass over the bank.

  Per chunk of queries one similarity matrix and one top-k of the largest k; every
  (k, temperature) pair votes from those neighbours, so the results equal separate
  `knn_accuracy` runs. Each k is clipped to the bank size (the keys keep the k asked).
  """
  ks, temperatures = tuple(ks), tuple(float(t) for t in temperatures)
  if not ks or not temperatures:
    raise ValueError(f"need at least one k and one temperature; got {ks}, {temperatures}")
  bank_normed, labels, k_max = _knn_setup(bank_feats, bank_labels, query_feats,
                                          num_classes, max(ks), chunk_size)
  if min(ks) <= 0:
    raise ValueError(f"every k must be positive; got {ks}")
  if np.shape(query_labels) != (query_feats.shape[0],):
    raise ValueError(f"query_labels shape {np.shape(query_labels)} must be "
                     f"({query_feats.shape[0]},)")
  clipped = tuple(min(k, k_max) for k in ks)
  hits = np.zeros((len(ks), len(temperatures), 2), np.int64)
  for (chunk, _), (chunk_labels, valid) in zip(
      padded_chunks(query_feats, chunk_size),
      labels_and_masks(query_labels, chunk_size)):
    hits += np.asarray(_knn_chunk_hits(bank_normed, labels, chunk, chunk_labels, valid,
                                       jnp.asarray(temperatures, jnp.float32),
                                       num_classes=num_classes, ks=clipped))
  return {(k, t): accuracy(hits[i, j], query_feats.shape[0])
          for i, k in enumerate(ks) for j, t in enumerate(temperatures)}
