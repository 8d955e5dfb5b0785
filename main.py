"""CorInfoMax pretraining and evaluation.

  python main.py --config=configs/cifar10.py --workdir=DIR [--mode=pretrain]
  python main.py --config=configs/cifar10.py --workdir=DIR --config.batch_size=256
  python main.py --config=DIR/config.json --workdir=DIR --mode=knn_eval  # as recorded

On TPU pods and GPU clusters run the same command on every host; JAX discovers the
topology. Elsewhere pass --coordinator_address, --num_processes and --process_id.
"""

import logging as logging_std
import os
import sys
import traceback

# TensorFlow reads images and writes events only; its C++ warnings (a decode op
# "aborting" before the error line that names the image) are noise for a user. Set
# TF_CPP_MIN_LOG_LEVEL=0 to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from corinfomax_jax import errors
from corinfomax_jax import files
from corinfomax_jax.modes import embed
from corinfomax_jax.modes import export
from corinfomax_jax.modes import finetune
from corinfomax_jax.modes import import_weights
from corinfomax_jax.modes import knn_eval
from corinfomax_jax.modes import linear_eval
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import checkpoints
from corinfomax_jax.run import command_line

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Configuration file (configs/*.py, or configs/*.py:semi1 / :semi10), "
    "or a workdir's config.json: the configuration that pretraining recorded.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, plots and results.")
MODES = {
    "pretrain": pretrain.train_and_evaluate,  # resumes from the workdir
    "knn_eval": knn_eval.knn_eval,
    "linear_eval": linear_eval.linear_eval,
    "export": export.export_backbone,
    "embed": embed.embed,
    "finetune": finetune.finetune,
    "import": lambda config, workdir: import_weights.import_weights(config, workdir,
                                                                    FLAGS.weights),
}
flags.DEFINE_enum("mode", "pretrain", list(MODES),
                  "pretrain (resumes from the workdir); the others read the workdir's "
                  "latest pretraining checkpoint: knn_eval, linear_eval, export (backbone "
                  "for PyTorch and Flax), embed (features of a split), finetune (the whole "
                  "network on a labelled subset); import writes a new workdir from "
                  "--weights.")
flags.DEFINE_string("weights", None,
                    "--mode=import: a torchvision ResNet state_dict, as .safetensors or "
                    "torch.save .pth/.pt (read without torch).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs JAX cannot discover.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...).")
flags.mark_flags_as_required(["config", "workdir"])

ERROR_LOG = "error.log"  # the traceback of the error main.py printed in one line
_MOVED_FLAGS = []  # "--config.alpha is now --config.corinfomax.alpha.", logged by main
# Reads a workdir's config.json as a config file (--config=<workdir>/config.json).
RECORD_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                  "run_record.py")


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still show).

  Errors that orbax's background threads log (a failed save) keep their one-line message
  but lose their traceback, unless --verbosity=1: main.py names the cause in its one
  `error:` line.
  """

  def filter(self, record):
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno >= logging_std.ERROR and FLAGS.verbosity < 1:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging_std.WARNING


def _fail(error: BaseException, workdir: str | None) -> None:
  """Prints `error: ...` as one line on stderr and exits 1; the traceback goes to the log
  at --verbosity=1 and to <workdir>/error.log when the workdir can take it."""
  trace = "".join(traceback.format_exception(error))
  logging.debug("%s", trace)  # shown with --verbosity=1
  message = " ".join(str(error).split()) or type(error).__name__
  if not isinstance(error, (errors.ConfigError, errors.NonFiniteLossError,
                            errors.DivergenceError, errors.CheckpointSaveError)):
    message = f"{message} ({type(error).__name__})"
  # A WorkdirError says the workdir cannot take files (or hangs): no log goes there.
  if (workdir and not isinstance(error, errors.WorkdirError)
      and jax.process_index() == 0):
    _append_error_log(workdir, f"error: {message}\n{trace}\n")
  _exit_now(1, f"error: {message}\n")


def _exit_now(status: int, last_line: str) -> None:
  """Flushes the logs, writes `last_line` to stderr and ends the process at once.

  The mode's own `finally` blocks have run by now (checkpoints finished or aborted,
  writers closed); what is left are background threads (tf.data's, orbax's) whose
  teardown at interpreter shutdown can take long or never end, as after an unreadable
  image, and a failed save's threads may still be failing on the same disk (and
  printing): stderr is pointed at the null device before the line is written, and
  nothing is waited for between the line and the exit, so it stays the last.
  The last good checkpoint is intact, and a partial one is removed at the next start.
  """
  # From here other threads' output goes nowhere, so none can land after the line. The
  # flushes come after the switch: logging handlers flush each record as they emit it, so
  # what is still buffered for stderr is part of another thread's line (stderr is
  # line-buffered), which must not come before the error line.
  terminal = os.dup(2)
  quiet = os.open(os.devnull, os.O_WRONLY)
  os.dup2(quiet, 2)
  for handler in logging_std.getLogger().handlers + [logging.get_absl_handler()]:
    try:
      handler.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  sys.stdout.flush()
  sys.stderr.flush()
  os.write(terminal, last_line.encode("utf-8", "replace"))
  os._exit(status)


def _append_error_log(workdir: str, text: str) -> None:
  """Adds `text` to <workdir>/error.log when the workdir exists and takes it."""
  try:
    path = files.as_path(workdir)
    if path.is_dir():
      with (path / ERROR_LOG).open("a") as f:
        f.write(text)
  except Exception:  # pylint: disable=broad-except
    pass  # a full disk or a failing store: the error line still goes out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  for notice in _MOVED_FLAGS:
    logging.info("%s", notice)
  # A failed asynchronous save leaves orbax's sibling futures unread; asyncio would log
  # a traceback for each at exit. The one error line names the cause.
  logging_std.getLogger("asyncio").addFilter(checkpoints.UnretrievedFutures())
  sys.unraisablehook = checkpoints.closed_loop_callbacks_silenced()
  try:
    if FLAGS.coordinator_address:
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                 num_processes=FLAGS.num_processes,
                                 process_id=FLAGS.process_id)
    elif FLAGS.distributed:
      jax.distributed.initialize()
    logging.info("JAX process %d of %d, %d local of %d devices (%s).", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    if FLAGS.weights and FLAGS.mode != "import":
      raise errors.ConfigError(f"--weights is read by --mode=import only, not by "
                               f"--mode={FLAGS.mode}: drop it, or use --mode=import.")
    MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)
  except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and stops)
    # Background threads (checkpointing, input) must not keep it alive.
    _exit_now(130, "error: interrupted; nothing was saved since the last checkpoint.\n")
  except Exception as e:  # pylint: disable=broad-except
    _fail(e, FLAGS.workdir)


def _parse_flags(argv):
  """absl's flag parsing, with every flag error in one `error:` line: an unknown
  --config.<key> with the closest keys, anything else (a bad value, a missing flag, a
  config file's own error) by its message's last line."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = None
    path = _config_path(argv)
    if path:
      try:
        config = _load_config(path)
        message = command_line.unknown_override(config, argv)
      except Exception:  # pylint: disable=broad-except
        pass
    if message is None:
      if not isinstance(e, flags.Error):
        raise
      message = _flag_error_line(e)
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


def _flag_error_line(error: Exception) -> str:
  """One line of an absl flag error: its message, or, when that holds a traceback (a
  config file's get_config raised), the exception's own last line."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return f"{type(error).__name__} (python main.py --helpshort lists the flags)"
  if len(lines) == 1:
    return f"{lines[0]} (python main.py --helpshort lists the flags)"
  last = lines[-1]
  kind, _, text = last.partition(": ")
  return text if text and kind.isidentifier() else last


def _load_config(path: str):
  """get_config() of a config file "path[:argument]", as --config loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  file, *args = path.split(":", 1)
  spec = importlib.util.spec_from_file_location("corinfomax_config_check", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


if __name__ == "__main__":
  jax.config.config_with_absl()
  # config_flags reads overrides from sys.argv itself: translate it in place.
  try:
    sys.argv = command_line.record_config_flag(
        command_line.translate_moved_flags(sys.argv, _MOVED_FLAGS), RECORD_CONFIG_FILE)
  except errors.ConfigError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)
  app.run(main, flags_parser=_parse_flags)
