"""One 3x3 convolution of ResNet-18's first stage: forward, input gradient, weight gradient.

  python bench/conv_grad.py                       # batch 128 (64 pairs), 32x32, 64 -> 64
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python bench/conv_grad.py
  python bench/conv_grad.py --channels 8 --batch 256 --formulations

A training step runs each convolution three ways; this times each alone, jitted, and
prints GFLOP/s (2 * N * H * W * K * K * Cin * Cout per pass), so a backend that is slow
in one direction shows it. `--formulations` also times the weight gradient written as
dots instead of a convolution (checked equal to it first): nine shifted-slice dots, one
per kernel tap, and one im2col dot over the nine taps' patches. Imports no TensorFlow.
The last line is `weight_grad_vs_forward=<ratio of times>`.
"""
import argparse
import time

import jax
import jax.numpy as jnp


def timed_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def _taps(x):
  """The nine shifted [n, h, w, c] windows of x padded by one ("SAME"), tap by tap."""
  _, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]


def weight_grad_by_taps(x, dy):
  """dL/dw [3, 3, cin, cout] of the "SAME" 3x3 convolution: one dot per tap."""
  grads = [jnp.einsum("nhwc,nhwd->cd", tap, dy) for tap in _taps(x)]
  return jnp.stack(grads).reshape(3, 3, x.shape[-1], dy.shape[-1])


def weight_grad_im2col(x, dy):
  """dL/dw [3, 3, cin, cout]: the nine taps' patches as one [n*h*w, 9*cin] matrix."""
  patches = jnp.stack(_taps(x), axis=3).reshape(-1, 9 * x.shape[-1])
  grad = patches.T @ dy.reshape(-1, dy.shape[-1])
  return grad.reshape(3, 3, x.shape[-1], dy.shape[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--formulations", action="store_true",
                      help="also time the weight gradient as shifted-slice and im2col dots")
  args = parser.parse_args()
  n, s, c = args.batch, args.size, args.channels
  x = jax.random.normal(jax.random.PRNGKey(0), (n, s, s, c))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, c)) * 0.05
  dy = jax.random.normal(jax.random.PRNGKey(2), (n, s, s, c))

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  passes = {
      "forward": (jax.jit(conv), (x, w)),
      "input gradient": (jax.jit(lambda w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0]),
                         (w, dy)),
      "weight gradient": (jax.jit(lambda x, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0]),
                          (x, dy)),
  }
  if args.formulations:
    passes["weight grad, 9 dots"] = (jax.jit(weight_grad_by_taps), (x, dy))
    passes["weight grad, im2col"] = (jax.jit(weight_grad_im2col), (x, dy))
    expected = passes["weight gradient"][0](x, dy)
    for name in ("weight grad, 9 dots", "weight grad, im2col"):
      got = passes[name][0](x, dy)
      error = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
      if error > 1e-4:
        raise SystemExit(f"{name} differs from the convolution's weight gradient "
                         f"by {error:.1e} of its largest element")
  gflop = 2 * n * s * s * 9 * c * c / 1e9
  ms = {}
  print(f"conv 3x3 {n}x{s}x{s}x{c} -> {c} on {jax.devices()[0].device_kind}, "
        f"{gflop:.2f} GFLOP per pass")
  for name, (fn, fn_args) in passes.items():
    ms[name] = timed_ms(fn, *fn_args, repeats=args.repeats)
    print(f"  {name:19s} {ms[name]:9.1f} ms  {gflop / ms[name] * 1e3:7.1f} GFLOP/s")
  print(f"weight_grad_vs_forward={ms['weight gradient'] / ms['forward']:.1f}")


if __name__ == "__main__":
  main()
