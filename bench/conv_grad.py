"""One 3x3 convolution of ResNet-18's first stage: forward, input gradient, weight gradient.

  python bench/conv_grad.py                       # batch 128 (64 pairs), 32x32, 64 -> 64
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python bench/conv_grad.py

A training step runs each convolution three ways; this times each alone, jitted, and
prints GFLOP/s (2 * N * H * W * K * K * Cin * Cout per pass), so a backend that is slow
in one direction shows it. Imports no TensorFlow. The last line is
`weight_grad_vs_forward=<ratio of times>`.
"""
import argparse
import time

import jax


def timed_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
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
  gflop = 2 * n * s * s * 9 * c * c / 1e9
  ms = {}
  print(f"conv 3x3 {n}x{s}x{s}x{c} -> {c} on {jax.devices()[0].device_kind}, "
        f"{gflop:.2f} GFLOP per pass")
  for name, (fn, fn_args) in passes.items():
    ms[name] = timed_ms(fn, *fn_args, repeats=args.repeats)
    print(f"  {name:16s} {ms[name]:9.1f} ms  {gflop / ms[name] * 1e3:7.1f} GFLOP/s")
  print(f"weight_grad_vs_forward={ms['weight gradient'] / ms['forward']:.1f}")


if __name__ == "__main__":
  main()
