"""sources: TensorFlow kept off the accelerators, recursive and unlabelled image folders."""
import pathlib
import subprocess
import sys

from corinfomax_jax import sources

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _RecordingTfConfig:
  """A stand-in for tf.config with a GPU and a TPU, recording what is hidden."""

  def __init__(self, devices=("GPU", "TPU"), initialised=False):
    self.visible = {kind: [f"/physical_device:{kind}:0"] for kind in devices}
    self.initialised = initialised
    self.calls = []

  def list_physical_devices(self, kind):
    return list(self.visible.get(kind, []))

  def get_visible_devices(self, kind):
    return list(self.visible.get(kind, []))

  def set_visible_devices(self, devices, kind):
    self.calls.append((list(devices), kind))
    if self.initialised:
      raise RuntimeError("Visible devices cannot be modified after being initialized")
    self.visible[kind] = list(devices)


def test_helper_hides_gpus_and_tpus():
  config = _RecordingTfConfig()
  sources.hide_accelerators_from_tensorflow(config)
  assert config.calls == [([], "GPU"), ([], "TPU")]
  assert config.visible == {"GPU": [], "TPU": []}
  sources.hide_accelerators_from_tensorflow(config)  # already hidden: no second call
  assert len(config.calls) == 2


def test_helper_leaves_absent_kinds_alone_and_survives_initialised_tf(caplog):
  config = _RecordingTfConfig(devices=("GPU",), initialised=True)
  sources.hide_accelerators_from_tensorflow(config)
  assert config.calls == [([], "GPU")]  # no TPU listed: not touched
  assert config.visible["GPU"]  # too late, and said so
  assert "GPU devices" in caplog.text


def test_importing_the_pipeline_leaves_tensorflow_no_gpu():
  code = ("import corinfomax_jax.pipeline, tensorflow as tf; "
          "assert tf.config.get_visible_devices('GPU') == [], "
          "tf.config.get_visible_devices('GPU')")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
