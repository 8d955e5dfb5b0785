"""Test setup: 8 simulated CPU devices, so sharded code paths run in every test.

XLA reads XLA_FLAGS once, when jax first initialises its backends, so this must run
before any test module imports jax.
"""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (input pipeline only) should not spam the test log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
