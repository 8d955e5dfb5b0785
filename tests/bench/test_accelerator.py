"""bench/accelerator.py: its plain-dict settings are the config files', its peak table
picks the right chip, and it runs where TensorFlow and ml_collections cannot be imported."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest

from corinfomax_jax.run import settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "accelerator.py")
_spec = importlib.util.spec_from_file_location("bench_accelerator", SCRIPT)
accelerator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerator)


def _config_file(name):
  spec = importlib.util.spec_from_file_location(
      f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_base_config_is_configs_default():
  assert accelerator.base_config() == _config_file("default").to_dict()


@pytest.mark.parametrize("ours, theirs", [("cifar10_config", "cifar10"),
                                          ("imagenet1k_config", "imagenet1k")])
def test_step_settings_are_the_config_files(ours, theirs):
  """Every section the train step reads resolves as from the config file itself."""
  a = settings.resolve(getattr(accelerator, ours)())
  b = settings.resolve(_config_file(theirs))
  assert a.model == b.model
  assert a.method == b.method
  assert a.data == b.data
  assert a.optimizer == b.optimizer
  assert a.train.batch_size == b.train.batch_size


@pytest.mark.parametrize("name, base, batch, dtype", [
    ("r18_fp32", "cifar10_config", 512, "float32"),
    ("r18_bf16", "cifar10_config", 512, "bfloat16"),
    ("r50_bf16", "imagenet1k_config", 2 * 64, "bfloat16")])
def test_variants_change_only_batch_and_dtype(name, base, batch, dtype):
  expected = copy.deepcopy(getattr(accelerator, base)())
  expected["batch_size"] = batch
  expected["model"]["dtype"] = dtype
  assert accelerator.variant_config(name, 2, False, 64) == expected


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),  # TF32 tensor cores
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),  # v5e, not v5p's 459
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v6 lite", "float32", 918e12),  # one bf16 pass at the default precision
    ("cpu", "float32", None)])
def test_peak_flops_by_device_kind(kind, dtype, peak):
  assert accelerator.peak_flops(kind, dtype) == peak


def test_smoke_runs_without_tensorflow_and_ml_collections():
  """--smoke in a Python whose imports of tensorflow and ml_collections fail. One of the
  three variants (ResNet-18 float32, with the reference step's branch) keeps it short."""
  blocked = ("import runpy, sys; "
             "sys.modules['tensorflow'] = None; sys.modules['ml_collections'] = None; "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-c", blocked, SCRIPT, "--smoke", "--variants", "r18_fp32"],
      cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  last = done.stdout.strip().splitlines()[-1]
  fields = dict(f.split("=", 1) for f in last.split())
  assert fields["accelerator"] == "cpu"
  assert float(fields["r18_fp32_pairs_per_s"]) > 0
  assert "r18_bf16_pairs_per_s" not in fields and "r50_bf16_pairs_per_s" not in fields
  assert "reference step: not timed" in done.stdout or "ours / reference" in done.stdout
