"""A 2-D map of embedded features, coloured by class: what --mode=embed draws as map.png.

The layout is UMAP (umap-learn) where it is installed, else t-SNE (scikit-learn): both
are optional, in the extra `map` (pip install "corinfomax-jax[map]" gives scikit-learn;
umap-learn is used when present). With neither, `layout` returns None and the caller
says how to get the map. Splits larger than `max_points` are subsampled with a seed.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Optional, Sequence

import numpy as np

from corinfomax_jax import files

INSTALL_HINT = ('pip install "corinfomax-jax[map]" (scikit-learn, for t-SNE) or '
                "pip install umap-learn")


@dataclasses.dataclass(frozen=True)
class Layout:
  """2-D coordinates of the rows `index` of the features, by `algorithm`."""
  xy: np.ndarray  # float32 [m, 2]
  index: np.ndarray  # int64 [m], ascending rows of the features
  algorithm: str  # "UMAP" or "t-SNE"
  total: int  # rows of the features before subsampling


def algorithm() -> Optional[str]:
  """"UMAP" or "t-SNE", whichever is installed first, or None."""
  for name, module in (("UMAP", "umap"), ("t-SNE", "sklearn.manifold")):
    try:
      __import__(module)
      return name
    except ImportError:
      continue
  return None


def sampled_rows(n: int, *, max_points: int, seed: int) -> np.ndarray:
  """The rows a map shows: all n, or `max_points` drawn without replacement by `seed`,
  ascending."""
  if n <= max_points:
    return np.arange(n, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def layout(features: np.ndarray, *, seed: int, max_points: int) -> Optional[Layout]:
  """The 2-D layout of `features` [n, d] (at most `max_points` rows, drawn without
  replacement by `seed`), or None when neither UMAP nor t-SNE is installed."""
  name = algorithm()
  if name is None:
    return None
  n = len(features)
  index = sampled_rows(n, max_points=max_points, seed=seed)
  x = np.asarray(features[index], np.float32)
  if name == "UMAP":
    import umap  # pylint: disable=g-import-not-at-top
    xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
  else:
    from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
    # Perplexity must stay below the number of points; 30 is scikit-learn's default.
    xy = TSNE(n_components=2, init="pca", random_state=seed,
              perplexity=float(min(30.0, max(1.0, (len(x) - 1) / 3)))).fit_transform(x)
  return Layout(xy=np.asarray(xy, np.float32), index=index.astype(np.int64),
                algorithm=name, total=n)


def plot_map(points: Layout, labels: Optional[np.ndarray], class_names: Sequence[str],
             path: str | os.PathLike, *, title: str, seed: int,
             figsize=(7.2, 6.4), dpi: int = 100) -> str | os.PathLike:
  """Writes the map as a PNG: one colour per class (labels [n] of every row, or None
  for an unlabelled split), a legend of class names up to 20 classes, and a line
  under the title saying how many points of how many, drawn with which seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=figsize, dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  size = max(2.0, min(20.0, 8000.0 / len(points.index)))
  if labels is None:
    ax.scatter(points.xy[:, 0], points.xy[:, 1], s=size, color="tab:blue", linewidths=0)
  else:
    chosen = np.asarray(labels)[points.index]
    classes = np.unique(chosen)
    colours = [f"C{i % 10}" for i in range(len(classes))] if len(classes) <= 10 else (
        [matplotlib.colormaps["tab20" if len(classes) <= 20 else "turbo"](
            i / max(len(classes) - 1, 1)) for i in range(len(classes))])
    for colour, c in zip(colours, classes):
      rows = chosen == c
      name = class_names[c] if 0 <= c < len(class_names) and class_names[c] else str(c)
      ax.scatter(points.xy[rows, 0], points.xy[rows, 1], s=size, color=colour,
                 linewidths=0, label=name)
    if len(classes) <= 20:
      ax.legend(fontsize="small", markerscale=max(1.0, 12.0 / size), loc="best",
                framealpha=0.8)
  sampled = (f"{len(points.index)} of {points.total} points, drawn with seed {seed}"
             if len(points.index) < points.total else f"all {points.total} points")
  ax.set_title(f"{title}\n{points.algorithm} of the backbone features; {sampled}",
               fontsize="medium")
  ax.set_xticks([])
  ax.set_yticks([])
  png = io.BytesIO()  # matplotlib writes local files only; `path` may be a URL
  fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
  files.write_bytes(path, png.getvalue())
  return path
