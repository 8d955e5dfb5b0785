"""The configuration a workdir recorded: its config.json, read back as a config file.

main.py reads --config=<workdir>/config.json through this file, so that every mode runs
with the settings pretraining recorded, overrides included, and --config.<key>=<value>
still changes a key on top:
  python main.py --config=DIR/config.json --workdir=DIR --mode=knn_eval
The record is laid over configs/default.py: keys a later version added keep their
defaults, keys of earlier versions move to their places now (settings.MOVED_KEYS), and
JSON lists become tuples, as the config files write them. Earlier generations of the
record (config.json.1, ...) read the same way.
"""
import json

from ml_collections import config_dict

from configs import default
from corinfomax_jax import files
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.run import settings


def get_config(arg=None):
  if not arg:
    raise ConfigError("configs/run_record.py reads a workdir's record: give its path, "
                      "--config=<workdir>/config.json")
  path = files.as_path(arg)
  if not path.is_file():
    raise ConfigError(f"--config={arg}: no such file (pretraining writes "
                      "<workdir>/config.json when it starts)")
  try:
    record = json.loads(path.read_text())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ConfigError(f"--config={arg} is not a readable record: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120]}") from None
  if not isinstance(record, dict):
    raise ConfigError(f"--config={arg} is not a record: expected a JSON object of "
                      f"configuration keys, got {type(record).__name__}")
  c = default.get_config()
  _lay_over(c, settings.moved_keys_applied(record))
  return c


def _lay_over(config: config_dict.ConfigDict, values: dict) -> None:
  """Sets each key of `values` in `config`, section by section."""
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(config.get(key), config_dict.ConfigDict):
      _lay_over(config[key], value)
    else:
      config[key] = _config_value(value)


def _config_value(value):
  """A JSON value as a config file writes it: lists as tuples, objects as sections."""
  if isinstance(value, list):
    return tuple(_config_value(v) for v in value)
  if isinstance(value, dict):
    return config_dict.ConfigDict({k: _config_value(v) for k, v in value.items()})
  return value
