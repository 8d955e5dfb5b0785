"""Classification metrics: top-k hits of scores, accuracy, and fixed-size chunks of rows.

Arrays in, numbers out: the kNN classifier, the probe's test path and the precomputed
probe count their hits here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def topk_hits(scores: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """[top-1 hits, top-5 hits] over the rows where valid is True."""
  ranked = jax.lax.top_k(scores, min(5, scores.shape[-1]))[1]
  correct = (ranked == labels[:, None]) & valid[:, None]
  return jnp.stack([correct[:, 0].sum(), correct.any(axis=1).sum()])


def accuracy(hits: np.ndarray, count: int) -> dict[str, float]:
  """{"top1", "top5"} in percent of [top-1 hits, top-5 hits] out of `count` rows."""
  if count == 0:
    raise ValueError("no samples to evaluate")
  return {"top1": 100.0 * float(hits[0]) / count,
          "top5": 100.0 * float(hits[1]) / count}


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


def labels_and_masks(labels, chunk_size):
  """Yields (labels padded to chunk_size, mask of the real rows) per chunk."""
  for chunk, n in padded_chunks(np.asarray(labels, np.int32), chunk_size):
    yield chunk, np.arange(chunk_size) < n
