"""Weighted k-nearest-neighbour classification: the maths, its names, its evaluator.

The maths takes arrays and gives numbers (no network, no data pipeline);
`KnnEvaluator` runs it on the backbone features of the train split (the bank) and the
eval split (the queries), as the kNN monitor and `--mode=knn_eval`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from corinfomax_jax.eval import features as features_lib
from corinfomax_jax.eval import metrics
from corinfomax_jax.methods import corinfomax as objective
from corinfomax_jax.run import loop
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib

# InstDisc's weighted kNN (Wu et al., 2018): k = 200, temperature 0.07.
KNN_K = 200
KNN_TEMPERATURE = 0.07


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
  metrics.check_chunk_size(chunk_size)
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
      for chunk, n in metrics.padded_chunks(query_feats, chunk_size)
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
      jax.vmap(lambda t, k=k: metrics.topk_hits(
          _votes(top_sim[:, :k], top_labels[:, :k], t, num_classes), query_labels,
          valid))(temperatures)
      for k in ks])


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
      metrics.padded_chunks(query_feats, chunk_size),
      metrics.labels_and_masks(query_labels, chunk_size)):
    hits += np.asarray(_knn_chunk_hits(bank_normed, labels, chunk, chunk_labels, valid,
                                       jnp.asarray(temperatures, jnp.float32),
                                       num_classes=num_classes, ks=clipped))
  return {(k, t): metrics.accuracy(hits[i, j], query_feats.shape[0])
          for i, k in enumerate(ks) for j, t in enumerate(temperatures)}


def knn_headline(ks, temperatures) -> tuple[int, float]:
  """The (k, T) reported as top1/top5: InstDisc's k = 200, T = 0.07 where listed, else
  the largest k and the first temperature."""
  k = KNN_K if KNN_K in ks else max(ks)
  t = KNN_TEMPERATURE if KNN_TEMPERATURE in temperatures else temperatures[0]
  return k, t


def knn_numbers(table: dict, ks, temperatures) -> dict[str, float]:
  """Flat names of knn_accuracies' table: top1/top5 at the headline (k, T), then
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
  (knn_accuracies). As a monitor (`run`, `run_on_state`) the bank and the queries
  are at most `knn.monitor_max_train_examples` and `knn.monitor_max_test_examples`,
  each spread evenly over its split. Every process returns the same numbers.
  """
  name = "knn"
  settings_class = settings_lib.Knn  # its section of settings.Eval

  def __init__(self, settings: settings_lib.Knn, context: features_lib.Context):
    self._settings, self._context = settings, context
    self.ks, self.temperatures = settings.ks, settings.temperatures

  def every_steps(self, steps_per_epoch: int) -> int:
    return loop.epochs_to_steps(self._settings.every_epochs, steps_per_epoch)

  def accuracies(self, variables, *, monitor: bool = False) -> tuple[dict, dict]:
    """({(k, T): {"top1", "top5"}} in percent, the bank and query counts); `monitor`:
    with the monitor's bank and query sizes."""
    settings, c = self._settings, self._context
    max_bank, max_queries = settings.max_train_examples, -1
    if monitor:
      if settings.monitor_max_train_examples != -1:
        max_bank = settings.monitor_max_train_examples
      max_queries = settings.monitor_max_test_examples
    bank, bank_labels, queries, query_labels = (
        x for source, limit in ((c.train_source, max_bank), (c.eval_source, max_queries))
        for x in features_lib.extract_features(
            c.model, variables, c.mesh, source, batch_size=c.batch_size, data=c.data,
            max_examples=limit))
    table = knn_accuracies(bank, bank_labels, queries, query_labels,
                           c.train_source.num_classes, ks=self.ks,
                           temperatures=self.temperatures)
    return table, {"num_bank_examples": int(len(bank)),
                   "num_query_examples": int(len(queries))}

  def run(self, variables) -> dict:
    """The monitor: `knn_numbers` of the accuracies, and the bank and query counts."""
    table, counts = self.accuracies(variables, monitor=True)
    return {**knn_numbers(table, self.ks, self.temperatures), **counts}

  def run_on_state(self, state) -> dict:
    return self.run(train_state_lib.backbone_variables(state))
