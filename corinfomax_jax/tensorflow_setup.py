"""TensorFlow's place in this library: data and event files only, never an accelerator.

Imported by the layers that use TensorFlow (the data sources, the metric writers); it
imports TensorFlow only when called.
"""
from absl import logging


def hide_accelerators_from_tensorflow(config=None) -> None:
  """Keeps TensorFlow (data and event files only) off the GPUs and TPUs that JAX uses.

  Without this, TF would reserve GPU memory the moment it first runs an op. Called
  where TF first enters: the data sources at import, the metric writer before its first op.
  """
  if config is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    config = tf.config
  for kind in ("GPU", "TPU"):
    try:
      if config.list_physical_devices(kind) and config.get_visible_devices(kind):
        config.set_visible_devices([], kind)
    except RuntimeError:  # TF already initialised its devices: too late to hide them
      logging.warning("TensorFlow already holds its %s devices; they stay visible to it.",
                      kind)
    except ValueError:  # this TF build has no such device type
      pass
