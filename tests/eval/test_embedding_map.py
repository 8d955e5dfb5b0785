"""Tests for corinfomax_jax.eval.embedding_map: the 2-D map of embed's features."""
import numpy as np
import pytest
from PIL import Image

from corinfomax_jax.eval import embedding_map


def _clusters(n_per=60, dim=32, seed=0):
  """Three tight clusters far apart in `dim` dimensions, and their labels."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 10, (3, dim))
  x = np.concatenate([c + rng.normal(0, 0.5, (n_per, dim)) for c in centres])
  return x.astype(np.float32), np.repeat(np.arange(3), n_per).astype(np.int32)


def test_the_layout_keeps_classes_apart(one_thread):
  pytest.importorskip("sklearn")
  features, labels = _clusters()
  points = embedding_map.layout(features, seed=0, max_points=1000)
  assert points.algorithm in ("UMAP", "t-SNE") and points.total == 180
  np.testing.assert_array_equal(points.index, np.arange(180))
  assert points.xy.shape == (180, 2) and np.isfinite(points.xy).all()
  # Each point's nearest neighbour on the map is of its own cluster.
  d = np.linalg.norm(points.xy[:, None] - points.xy[None], axis=-1)
  np.fill_diagonal(d, np.inf)
  assert (labels[d.argmin(1)] == labels).mean() > 0.95


def test_large_splits_are_subsampled_with_the_seed():
  few = embedding_map.sampled_rows(180, max_points=50, seed=3)
  assert len(few) == 50 and len(set(few)) == 50 and np.all(np.diff(few) > 0)
  assert few.min() >= 0 and few.max() < 180
  np.testing.assert_array_equal(few, embedding_map.sampled_rows(180, max_points=50, seed=3))
  assert not np.array_equal(few, embedding_map.sampled_rows(180, max_points=50, seed=4))
  np.testing.assert_array_equal(embedding_map.sampled_rows(50, max_points=50, seed=3),
                                np.arange(50))


def test_without_umap_or_sklearn_there_is_no_layout(monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_layout_libraries(name, *args, **kwargs):
    if name.split(".")[0] in ("umap", "sklearn"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_layout_libraries)
  assert embedding_map.algorithm() is None
  assert embedding_map.layout(np.zeros((5, 3), np.float32), seed=0, max_points=10) is None


def test_the_png_shows_each_class_in_its_colour(tmp_path):
  xy = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], np.float32)
  points = embedding_map.Layout(xy=xy, index=np.array([0, 2, 5, 7]), algorithm="t-SNE",
                                total=8)
  labels = np.array([0, 9, 0, 9, 9, 1, 9, 1])  # rows 1, 3, 4, 6 are not drawn
  path = embedding_map.plot_map(points, labels, ("cat", "dog"), tmp_path / "map.png",
                                title="w, step 4: test split of f, corinfomax", seed=0)
  image = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert image.shape[0] > 300 and image.shape[1] > 300
  # matplotlib's C0 (blue, 31 119 180) for "cat", C1 (orange, 255 127 14) for "dog".
  for colour in ((31, 119, 180), (255, 127, 14)):
    assert (np.abs(image - colour).sum(-1) < 30).sum() > 20, colour
  # No third class colour: label 9 is on rows the map does not show.
  assert (np.abs(image - (44, 160, 44)).sum(-1) < 30).sum() == 0
