"""Plots the last logged covariance spectrum of several pretraining workdirs in one PNG.

  python tools/compare_spectra.py --out spectra.png workdir/cifar10_cpu \
      workdir/cifar10_cpu_vicreg workdir/cifar10_cpu_barlow_twins

Each workdir's latest checkpoint record carries the spectra its run logged (branch 1).
Eigenvalues are divided by their sum, so that methods whose projector outputs differ in
scale and dimension (CorInfoMax normalises its outputs, VICReg and Barlow Twins do not)
compare on one axis; the effective rank (exp of the entropy of those fractions) is in
each label. Prints one line per workdir: method, step, D, effective rank.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from corinfomax_jax import files  # noqa: E402
from corinfomax_jax.run import writers  # noqa: E402


def last_spectrum(workdir: str) -> tuple[str, int, np.ndarray]:
  """(method, step, eigenvalues) of the last spectrum in the latest checkpoint's record."""
  directory = files.as_path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps:
    raise SystemExit(f"error: no checkpoint in {directory}")
  run = directory / str(steps[-1]) / "run"
  record = json.loads((run / "metadata").read_text() if run.is_dir() else run.read_text())
  if not record.get("spectra"):
    raise SystemExit(f"error: the checkpoint of step {steps[-1]} in {directory} holds no "
                     "spectrum (spectrum_every_steps longer than the run?)")
  step, eigenvalues = record["spectra"][-1]
  return record.get("method", "corinfomax"), step, np.asarray(eigenvalues, np.float64)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--title", default="covariance spectrum at the end of pretraining")
  args = parser.parse_args()
  entries = []
  for workdir in args.workdirs:
    method, step, eigenvalues = last_spectrum(workdir)
    fractions = np.clip(eigenvalues, 0, None) / np.clip(eigenvalues, 0, None).sum()
    nonzero = fractions[fractions > 0]
    rank = float(np.exp(-(nonzero * np.log(nonzero)).sum()))
    print(f"{workdir}: {method} step {step} D={len(eigenvalues)} effective rank {rank:.1f}")
    entries.append((f"{method} (D={len(eigenvalues)}, eff. rank {rank:.1f})", fractions))
  writers.plot_spectra(entries, args.out, title=args.title, reference=None,
                       ylabel="eigenvalue / trace")


if __name__ == "__main__":
  main()
