"""CorInfoMax pretraining and evaluation.

  python main.py --config=configs/cifar10.py --workdir=DIR [--mode=pretrain]
  python main.py --config=configs/cifar10.py --workdir=DIR --config.batch_size=256

On TPU pods and GPU clusters run the same command on every host; JAX discovers the
topology. Elsewhere pass --coordinator_address, --num_processes and --process_id.
"""

import logging as logging_std
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from corinfomax_jax import configuration
from corinfomax_jax import errors
from corinfomax_jax import evaluators
from corinfomax_jax import exporting
from corinfomax_jax import finetune
from corinfomax_jax import linear_probe
from corinfomax_jax import pretrain

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, plots and results.")
MODES = {
    "pretrain": pretrain.train_and_evaluate,  # resumes from the workdir
    "knn_eval": evaluators.knn_eval,
    "linear_eval": linear_probe.linear_eval,
    "export": exporting.export_backbone,
    "embed": exporting.embed,
    "finetune": finetune.finetune,
}
flags.DEFINE_enum("mode", "pretrain", list(MODES),
                  "pretrain (resumes from the workdir); the others read the workdir's "
                  "latest pretraining checkpoint: knn_eval, linear_eval, export (backbone "
                  "for PyTorch and Flax), embed (features of a split), finetune (the whole "
                  "network on a labelled subset).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs JAX cannot discover.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still show)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  logging.info("JAX process %d of %d, %d local of %d devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)
  except (errors.ConfigError, errors.NonFiniteLossError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  jax.config.config_with_absl()
  # config_flags reads overrides from sys.argv itself: translate it in place.
  sys.argv = configuration.translate_moved_flags(sys.argv)
  app.run(main)
