"""Metric writers, the covariance-spectrum plot and result files: what a run leaves behind.

Only process 0 writes; the other processes' calls do nothing, so callers need not ask.
"""
from __future__ import annotations

import io
import json
import os
from typing import Sequence

import jax
import numpy as np

from corinfomax_jax import files
from corinfomax_jax import tensorflow_setup
from corinfomax_jax.methods import corinfomax as objective


class MetricWriter:
  """Scalars to TensorBoard event files in the workdir, from process 0 only.

  `logdir` may be a URL: tf.summary writes gs:// through TensorFlow's own file system.
  """

  def __init__(self, logdir: str | os.PathLike):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tensorflow_setup.hide_accelerators_from_tensorflow()  # before the writer's first TF op
      self._tf = tf
      self._writer = tf.summary.create_file_writer(os.fspath(logdir))

  def scalars(self, step: int, values: dict) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in values.items():
        self._tf.summary.scalar(name, float(value), step=step)
    self._writer.flush()

  def hparams(self, values: dict) -> None:
    """The run's configuration as TensorBoard hparams (skipped without the plugin)."""
    if self._writer is None:
      return
    try:
      from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
    with self._writer.as_default():
      hp.hparams(values)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def spectrum_summary(spectrum: objective.Spectrum, branch: int) -> dict:
  return {
      f"spectrum/effective_rank{branch}": spectrum.effective_rank,
      f"spectrum/max_eigenvalue{branch}": spectrum.max_eigenvalue,
      f"spectrum/min_eigenvalue{branch}": spectrum.min_eigenvalue,
      f"spectrum/num_below_1e-8_{branch}": spectrum.num_below,
      f"spectrum/num_above_1e-1_{branch}": spectrum.num_above,
  }


def dataset_title(dataset: str) -> str:
  """A data set's name for a plot title: an image folder by its last path component."""
  if dataset.startswith("folder:"):
    return f"{dataset.rstrip('/').rsplit('/', 1)[-1]} (folder)"
  return dataset


def write_json(path: str | os.PathLike, result: dict) -> None:
  """Writes `result` from process 0, whole (a reader never sees half a file)."""
  if jax.process_index() != 0:
    return
  files.write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def plot_spectra(spectra: Sequence[tuple[int | str, np.ndarray]],
                 path: str | os.PathLike, *, title: str = "Covariance eigenvalues",
                 ylabel: str = "eigenvalue", reference: float | None = 1e-8,
                 figsize=(6.4, 4.8), dpi: int = 100) -> str | os.PathLike:
  """Writes a PNG of eigenvalue spectra (descending, log y), one line per entry.

  Each entry is (step, eigenvalues), labelled "step N", or (label, eigenvalues).
  Eigenvalues below 1e-12 (collapsed directions, or tiny negative values from
  rounding) are drawn at 1e-12 so they show at the bottom instead of vanishing from a
  log axis; `reference` draws a dashed line (the objective's eps). The image is
  figsize * dpi pixels. Returns path.
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
  for key, eigenvalues in spectra:
    values = np.sort(np.asarray(eigenvalues, np.float64).ravel())[::-1]
    label = key if isinstance(key, str) else f"step {key}"
    ax.plot(np.arange(values.size), np.maximum(values, floor), label=label)
  if reference is not None:
    ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label=f"{reference:g}")
  ax.set_yscale("log")
  ax.set_xlabel("eigenvalue index (descending)")
  ax.set_ylabel(f"{ylabel} (clipped at {floor:g})")
  ax.set_title(title)
  ax.legend(fontsize="small")
  png = io.BytesIO()  # matplotlib writes local files only; `path` may be a URL
  fig.savefig(png, format="png", dpi=dpi)
  files.write_bytes(path, png.getvalue())
  return path
