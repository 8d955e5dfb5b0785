"""XLA options the training steps compile with, chosen by platform.

On XLA:CPU (jaxlib 0.10) the YNNPACK library fusions of dots and elementwise chains
slow a ResNet training step, while its fused reductions (the BatchNorm statistics) help:
measured on one pinned core beside the PyTorch reference's step (docs/benchmarks.md,
`bench/train_step.py --reference`), keeping only the reduce fusions made a full-width
ResNet-18 CIFAR step (batch 64) 9 to 15% faster and the 1/8-width `cifar10_cpu` step 0
to 4% faster than XLA's default set; disabling YNNPACK altogether made the full-width
step 5% faster but the narrow one 20% slower. So CPU steps compile with reduce fusions only; GPU and TPU steps with
XLA's defaults. The option changes which kernels run, not the arithmetic's order in a
way that matters: tests/test_compiler.py checks the step's results against the default
compilation.
"""
from __future__ import annotations

import functools
import os

import jax
from absl import logging

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_YNN_FUSIONS = "LIBRARY_FUSION_TYPE_REDUCE"


def step_options(platform: str | None = None) -> dict[str, str]:
  """`compiler_options` for `jax.jit` of a training step on `platform`.

  Args:
    platform: "cpu", "gpu", "tpu", ...; None: JAX's default backend.

  Returns:
    On CPU, the YNNPACK fusion set measured fastest for the ResNet steps, unless the
    environment's XLA_FLAGS already sets it (the user's choice wins) or this jaxlib
    does not know the option; elsewhere, no options.
  """
  platform = platform or jax.default_backend()
  if platform != "cpu" or YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
    return {}
  return {YNN_FUSION_OPTION: CPU_YNN_FUSIONS} if _cpu_option_known() else {}


@functools.lru_cache(maxsize=None)
def _cpu_option_known() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options={YNN_FUSION_OPTION: CPU_YNN_FUSIONS}
            ).lower(1.0).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.info("This jaxlib does not take %s=%s (%s); CPU steps compile with XLA's "
                 "defaults.", YNN_FUSION_OPTION, CPU_YNN_FUSIONS,
                 str(e).splitlines()[0][:200])
    return False
  return True
