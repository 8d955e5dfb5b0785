"""The weighted kNN classifier against brute force, by-hand cases and its own chunking."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from corinfomax_jax.eval import knn


def _unit(degrees):
  rad = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(rad), np.sin(rad)], axis=-1).astype(np.float32)


def _knn_reference(bank, bank_labels, queries, num_classes, k, temperature):
  """Brute force in float64 numpy: the full similarity matrix, sorted."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sim = queries.astype(np.float64) @ bank.T.astype(np.float64)
  scores = np.zeros((len(queries), num_classes))
  for i, row in enumerate(sim):
    for j in np.argsort(-row)[:k]:
      scores[i, bank_labels[j]] += np.exp(row[j] / temperature)
  return scores


def _random_case(seed=0, n_bank=300, n_query=77, dim=32, num_classes=10):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n_bank, dim)).astype(np.float32),
          rng.integers(0, num_classes, n_bank),
          rng.normal(size=(n_query, dim)).astype(np.float32),
          rng.integers(0, num_classes, n_query))


def test_knn_scores_by_hand():
  # One class-0 point at 0 degrees (cos 1) and three class-1 points at 60 degrees
  # (cos 0.5); scale doesn't matter (features are normalised).
  bank = np.concatenate([_unit([0]), 3.0 * _unit([60, 60, 60])])
  labels = np.array([0, 1, 1, 1])
  scores = knn.knn_classify(bank, labels, 2.0 * _unit([0]), num_classes=3, k=4)
  expected = [np.exp(1 / 0.07), 3 * np.exp(0.5 / 0.07), 0.0]
  np.testing.assert_allclose(scores[0], expected, rtol=1e-5)


def test_knn_weighting_beats_majority_vote():
  # Same bank: majority of the 4 neighbours is class 1, but the single much closer
  # class-0 point outweighs them at T = 0.07. At a huge temperature the weights are
  # nearly equal and the vote becomes a majority vote.
  bank = np.concatenate([_unit([0]), _unit([60, 60, 60])])
  labels = np.array([0, 1, 1, 1])
  query = _unit([0])
  assert knn.knn_classify(bank, labels, query, 2, k=4).argmax() == 0
  assert knn.knn_classify(bank, labels, query, 2, k=4,
                               temperature=100.0).argmax() == 1
  acc = knn.knn_accuracy(bank, labels, query, np.array([0]), 2, k=4)
  assert acc["top1"] == 100.0


def test_knn_top1_top5_by_hand():
  # Class c sits at 10*c degrees from the query direction, so with k=7 the class
  # ranking for the query is 0, 1, ..., 6. Labels 0, 3, 4, 5, 6 have ranks
  # 1, 4, 5, 6, 7: one top-1 hit, three top-5 hits out of five.
  bank = _unit(10 * np.arange(7))
  labels = np.arange(7)
  queries = np.repeat(_unit([0]), 5, axis=0)
  acc = knn.knn_accuracy(bank, labels, queries, np.array([0, 3, 4, 5, 6]), 7, k=7)
  assert acc == {"top1": 20.0, "top5": 60.0}


def test_knn_query_equal_to_bank_point_k1_returns_its_label():
  bank, labels, _, _ = _random_case()
  idx = np.array([0, 5, 17, 123, 299])
  scores = knn.knn_classify(bank, labels, bank[idx], 10, k=1)
  np.testing.assert_array_equal(scores.argmax(axis=1), labels[idx])
  # Exactly one neighbour with similarity 1: its weight is exp(1 / T).
  np.testing.assert_allclose(scores.max(axis=1), np.exp(1 / 0.07), rtol=1e-5)
  assert (np.count_nonzero(scores, axis=1) == 1).all()


def test_knn_matches_brute_force():
  bank, labels, queries, _ = _random_case()
  for k in (1, 20, 300):
    scores = knn.knn_classify(bank, labels, queries, 10, k=k, temperature=0.1)
    np.testing.assert_allclose(
        scores, _knn_reference(bank, labels, queries, 10, k, 0.1), rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 76, 77, 100, 512])
def test_knn_chunked_equals_unchunked(chunk_size):
  bank, labels, queries, query_labels = _random_case()
  whole = knn.knn_classify(bank, labels, queries, 10, k=20,
                                chunk_size=len(queries))
  chunked = knn.knn_classify(bank, labels, queries, 10, k=20,
                                  chunk_size=chunk_size)
  assert chunked.shape == (77, 10)
  # Predictions and accuracies agree exactly; scores to the last float32 bits only,
  # since a matmul's summation order may depend on its row count (M=1 is a matvec).
  np.testing.assert_array_equal(np.argsort(-chunked, axis=1, kind="stable"),
                                np.argsort(-whole, axis=1, kind="stable"))
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  assert (knn.knn_accuracy(bank, labels, queries, query_labels, 10, k=20,
                                chunk_size=chunk_size)
          == knn.knn_accuracy(bank, labels, queries, query_labels, 10, k=20,
                                   chunk_size=len(queries)))


def test_knn_accuracy_agrees_with_scores():
  bank, labels, queries, query_labels = _random_case(seed=1, num_classes=6)
  scores = knn.knn_classify(bank, labels, queries, 6, k=50)
  top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
  acc = knn.knn_accuracy(bank, labels, queries, query_labels, 6, k=50,
                              chunk_size=10)
  assert acc["top1"] == pytest.approx(100 * np.mean(scores.argmax(1) == query_labels))
  assert acc["top5"] == pytest.approx(
      100 * np.mean((top5 == query_labels[:, None]).any(1)))
  assert 0 < acc["top1"] < acc["top5"] < 100


def test_knn_all_k_and_temperatures_in_one_pass_equal_separate_runs():
  bank, labels, queries, query_labels = _random_case(seed=2, num_classes=6)
  ks, temperatures = (1, 10, 50, 200, 500), (0.07, 0.5)  # 500 > bank: clipped
  table = knn.knn_accuracies(bank, labels, queries, query_labels, 6, ks=ks,
                             temperatures=temperatures, chunk_size=16)
  assert list(table) == [(k, t) for k in ks for t in temperatures]
  for (k, t), acc in table.items():
    assert acc == knn.knn_accuracy(bank, labels, queries, query_labels, 6, k=k,
                                   temperature=t, chunk_size=16), (k, t)
  assert len({a["top1"] for a in table.values()}) > 2  # the settings really differ


def test_knn_k_is_clipped_to_bank_size():
  bank, labels, queries, _ = _random_case(n_bank=5)
  np.testing.assert_array_equal(knn.knn_classify(bank, labels, queries, 10, k=200),
                                knn.knn_classify(bank, labels, queries, 10, k=5))


def test_knn_with_sharded_bank_equals_unsharded():
  bank, labels, queries, _ = _random_case(n_bank=64)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.device_put(bank, NamedSharding(mesh, P("data")))
  sharded_labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
  np.testing.assert_allclose(
      knn.knn_classify(sharded, sharded_labels, queries, 10, k=20, chunk_size=32),
      knn.knn_classify(bank, labels, queries, 10, k=20, chunk_size=32), rtol=1e-5)


def test_knn_bad_inputs_raise():
  bank, labels, queries, _ = _random_case()
  with pytest.raises(ValueError, match="feature dim"):
    knn.knn_classify(bank, labels, queries[:, :5], 10)
  with pytest.raises(ValueError, match="bank_labels"):
    knn.knn_classify(bank, labels[:-1], queries, 10)
  with pytest.raises(ValueError, match="chunk_size"):
    knn.knn_classify(bank, labels, queries, 10, chunk_size=0)
