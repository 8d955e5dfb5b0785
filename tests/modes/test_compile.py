"""--mode=compile: the --topology flag, what would fit, and one real TPU compile.

The TPU compile runs main.py in the Python that has libtpu (CORINFOMAX_TPU_PYTHON, by
default the .venv-tpu that .ci/run builds): libtpu is kept out of the test process, whose
jax runs on 8 simulated CPU devices. Without libtpu the test skips, unless
CORINFOMAX_REQUIRE_LIBTPU=1 (set by .ci/run), where it fails.
"""
import json
import os
import subprocess

import pytest

from corinfomax_jax import errors
from corinfomax_jax.modes import compile as compile_lib
from corinfomax_jax.run import tpu_compile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_PYTHON = os.environ.get("CORINFOMAX_TPU_PYTHON",
                            os.path.join(ROOT, ".venv-tpu", "bin", "python"))


def _tpu_python() -> str:
  """The Python with libtpu; skips (fails under CORINFOMAX_REQUIRE_LIBTPU=1) without."""
  ok = os.path.exists(TPU_PYTHON) and subprocess.run(
      [TPU_PYTHON, "-c", "import libtpu"], capture_output=True).returncode == 0
  if not ok:
    why = (f"no libtpu in {TPU_PYTHON} (.ci/run builds it: python3 -m venv "
           "--system-site-packages .venv-tpu && .venv-tpu/bin/pip install "
           "\"jax[tpu]==<jax version>\")")
    if os.environ.get("CORINFOMAX_REQUIRE_LIBTPU") == "1":
      pytest.fail(why)
    pytest.skip(why)
  return TPU_PYTHON


def test_compile_mode_compiles_a_tiny_config_for_a_v5e_slice(tmp_path):
  python = _tpu_python()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "XLA_FLAGS"))}
  env["JAX_PLATFORMS"] = "cpu"
  # ResNet-18 at width 2 on 16 px, 4 pairs per chip: about 35 s of compiling (a
  # full-width step takes 10 to 20 minutes).
  out = subprocess.run(
      [python, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(
          ROOT, "configs", "cifar10.py"), f"--workdir={tmp_path}", "--mode=compile",
       "--topology=v5litepod-4", "--config.image_size=16", "--config.model.width=2",
       "--config.model.projector=(16,16,8)", "--config.batch_size=16",
       "--config.eval.batch_size=16"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "fits: true"
  result = json.loads((tmp_path / "compile.json").read_text())
  assert (result["jax_topology"], result["chips"], result["hosts"]) == ("v5e:2x2", 4, 1)
  assert result["device_kind"] == "TPU v5 lite" and result["fits"] is True
  train, features = result["steps"]
  assert (train["step"], features["step"]) == ("train", "features")
  assert (train["per_chip_batch"], features["per_chip_batch"]) == (4, 4)
  for step in (train, features):
    mem = step["memory_bytes"]
    assert step["hbm_needed_bytes"] == (mem["arguments"] + mem["outputs"] - mem["aliased"]
                                        + mem["temporaries"] + mem["code"])
    assert 0 < step["hbm_needed_bytes"] <= step["hbm_bytes"] == 16 * 2**30
    assert step["gflop_per_unit"] > 0 and step["step_seconds"] > 0
    assert step["per_second_per_slice"] == pytest.approx(4 * step["per_second_per_chip"])
  # The donated state is aliased: the whole state, as large as the outputs bar metrics.
  assert 0 < train["memory_bytes"]["aliased"] <= train["memory_bytes"]["outputs"]
  assert features["memory_bytes"]["aliased"] == 0
  # Every gradient crosses the chips: the all-reduces carry at least the parameters.
  params = _parameter_bytes(width=2, projector=(16, 16, 8))
  reduced = train["collectives"]["all-reduce"]
  before = train["collectives_before_combining"]["all-reduce"]
  assert reduced["bytes"] >= params
  assert before["count"] >= reduced["count"] > 0
  # Inference needs no collective: each chip's images are its own.
  assert features["collectives"] == {}


def _parameter_bytes(**model) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import models  # pylint: disable=g-import-not-at-top
  net = models.create_model(backbone="resnet18", cifar_stem=True, **model)
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0),
                                           np.zeros((1, 16, 16, 3), np.float32),
                                           train=False))["params"]
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def test_topology_flag_goes_with_compile_mode_only():
  compile_lib.check_topology_flag("compile", "v5e-4")
  compile_lib.check_topology_flag("pretrain", None)
  with pytest.raises(errors.ConfigError, match="--mode=compile needs --topology"):
    compile_lib.check_topology_flag("compile", None)
  with pytest.raises(errors.ConfigError, match="not by --mode=knn_eval: drop it"):
    compile_lib.check_topology_flag("knn_eval", "v5e-4")


def test_a_step_that_does_not_fit_names_the_batch_and_dtype_that_would():
  gib = tpu_compile.GIB
  report = {"memory_bytes": {"temporaries": 20 * gib}, "hbm_needed_bytes": 24 * gib,
            "hbm_bytes": 16 * gib, "per_chip_batch": 128, "fits": False}
  run = type("Run", (), {"model": type("Model", (), {"kwargs": {"dtype": "float32"}})})
  assert compile_lib.advice(report, run, chips=16) == (
      "per-chip batch 72 (global 1152) by linear extrapolation of the temporaries, not "
      "compiled; or --config.model.dtype=bfloat16")
  assert compile_lib.advice({**report, "fits": True}, run, chips=16) is None
