"""Top-k hits and accuracy against plain NumPy."""
import numpy as np
import pytest

from corinfomax_jax.eval import metrics


def test_topk_hits_count_only_the_valid_rows():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(50, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 50)
  valid = np.arange(50) < 41
  ranked = np.argsort(-scores, axis=1)
  expected = [np.sum((ranked[:, 0] == labels) & valid),
              np.sum((ranked[:, :5] == labels[:, None]).any(1) & valid)]
  hits = np.asarray(metrics.topk_hits(scores, labels, valid))
  np.testing.assert_array_equal(hits, expected)
  assert metrics.accuracy(hits, 41) == {"top1": 100 * expected[0] / 41,
                                        "top5": 100 * expected[1] / 41}
  with pytest.raises(ValueError, match="no samples"):
    metrics.accuracy(hits, 0)


def test_chunks_pad_the_last_and_mask_it():
  chunks = list(metrics.labels_and_masks(np.arange(5), 2))
  assert [c.tolist() for c, _ in chunks] == [[0, 1], [2, 3], [4, 0]]
  assert [m.tolist() for _, m in chunks] == [[True, True], [True, True], [True, False]]
  with pytest.raises(ValueError, match="chunk_size"):
    metrics.check_chunk_size(0)
