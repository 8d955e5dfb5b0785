"""The covariance spectrum plot (run/writers.plot_spectra)."""
import matplotlib.image
import numpy as np
import pytest

from corinfomax_jax.run import writers as metrics


def test_plot_spectra_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  spectra = [(0, rng.uniform(0.5, 2.0, 64)),
             (100, np.concatenate([np.logspace(0, -10, 60), [0.0, -1e-9, 0.0, 0.0]])),
             (200, rng.permutation(np.logspace(1, -6, 64)))]
  path = tmp_path / "plots" / "spectra.png"
  written = metrics.plot_spectra(spectra, path, title="test", figsize=(5, 3), dpi=80)
  assert written == path
  assert path.stat().st_size > 1000
  image = matplotlib.image.imread(path)
  assert image.shape == (240, 400, 4)
  assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_spectra_needs_data(tmp_path):
  with pytest.raises(ValueError, match="at least one"):
    metrics.plot_spectra([], tmp_path / "x.png")
