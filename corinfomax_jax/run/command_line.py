"""The command line's `--config` flags: a workdir's config.json, keys of earlier versions,
unknown keys.

`--config=<workdir>/config.json` is rewritten by `record_config_flag` to the config file
that reads a record (configs/run_record.py), so that ml_collections loads it as any
config file, `--config.<key>` overrides on top.

Keys that moved (settings.MOVED_KEYS: flat model keys, top-level CorInfoMax keys, flat
`eval.*` keys) are rewritten to their new place (settings.moved_key) by
`translate_moved_flags` before ml_collections reads the flags; an unknown key is named
with the closest existing ones by `unknown_override`, in the message settings gives
any key nothing reads (settings.unknown_key). The values themselves are checked by
`settings.resolve`.
"""
from __future__ import annotations

import ast
import re

from corinfomax_jax import models
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.run import settings


def record_config_flag(argv: list[str], record_config_file: str) -> list[str]:
  """`argv` with --config=<path>.json (a workdir's config.json, or an earlier generation
  config.json.<n>) as --config=<record_config_file>:<path>; other argv unchanged.

  record_config_file: the config file whose get_config(path) reads a record
  (configs/run_record.py); ml_collections passes it what follows the first colon, so a
  URL (gs://...) arrives whole.
  """
  out = list(argv)
  for i, arg in enumerate(out[1:], start=1):
    if arg.startswith("--config="):
      value, at, prefix = arg[len("--config="):], i, "--config="
    elif arg == "--config" and i + 1 < len(out):
      value, at, prefix = out[i + 1], i + 1, ""
    else:
      continue
    # A config file's own argument may end in .json too (configs/x.py:labels.json).
    if re.search(r"\.json(\.\d+)?$", value) and ".py:" not in value:
      out[at] = f"{prefix}{record_config_file}:{value}"
    break
  return out


def translate_moved_flags(argv: list[str], notices: list[str] | None = None) -> list[str]:
  """Rewrites `--config.<old key>` flags to their new place (settings.moved_key).

  `--config.projector=2048-2048-64` becomes `--config.model.projector=(2048,2048,64)`;
  a projector string given to the new key is converted the same way. Each move is
  appended to `notices` ("--config.alpha is now --config.corinfomax.alpha."), for the
  caller to log once logging is set up. ConfigError when a key is given by its old
  name and its new one with different values.
  """
  out, i = [], 0
  given = {}  # new key -> [(flag as given, value, whether by its old name)]
  while i < len(argv):
    arg = argv[i]
    match = re.fullmatch(r"--config\.([A-Za-z_.]+)(=.*)?", arg)
    if not match or i == 0:
      out.append(arg)
      i += 1
      continue
    key, value = match.group(1), match.group(2)
    if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      value, i = "=" + argv[i + 1], i + 1
    i += 1
    given_as = f"--config.{key}{value or ''}"
    new = settings.moved_key(key)
    old = new != key
    if old:
      if notices is not None:
        notices.append(f"--config.{key} is now --config.{new}.")
      key = new
    if value is None:
      out.append(f"--config.{key}")
      continue
    value = value[1:]
    if key == "model.projector":
      value = _projector_tuple_flag(value)
    given.setdefault(key, []).append((given_as, value, old))
    out.append(f"--config.{key}={value}")
  _check_no_conflict(given)
  return out


def _check_no_conflict(given: dict) -> None:
  """ConfigError when a key is given by its old name and its new one with different
  values: which one a user meant cannot be known."""
  for key, flags in given.items():
    olds = [f for f in flags if f[2]]
    news = [f for f in flags if not f[2]]
    for old_flag, old_value, _ in olds:
      for new_flag, new_value, _ in news:
        if _flag_value(old_value) != _flag_value(new_value):
          raise ConfigError(
              f"{old_flag} and {new_flag} set the same key (config.{key}, whose earlier "
              f"name is config.{old_flag[len('--config.'):].split('=')[0]}) to different "
              f"values: give it once, as --config.{key}=VALUE.")


def _flag_value(text: str):
  """A flag's value as Python reads it ("10" and "10.0" alike), else the text."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _projector_tuple_flag(value: str) -> str:
  """"2048-2048-64" -> "(2048,2048,64,)"; any other flag value is left to the config."""
  try:
    sizes = models.parse_projector(value)
  except ValueError:
    return value
  return "(" + ",".join(str(s) for s in sizes) + ",)"


def dotted_keys(config, prefix: str = "") -> list[str]:
  """Every key path of a ConfigDict, sections and leaves: ["eval", "eval.knn_k", ...]."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items") and not isinstance(value, dict):  # a nested ConfigDict
      out.extend(dotted_keys(value, prefix + key + "."))
  return out


def unknown_override(config, argv: list[str]) -> str | None:
  """A one-line error for the first `--config.<key>` in argv that config lacks, or None.

  It names the key and the closest existing key paths (settings.unknown_key).
  """
  known = dotted_keys(config)
  for arg in argv[1:]:
    match = re.fullmatch(r"--config\.([^=\[]+)(\[.*)?(=.*)?", arg)
    if match and match.group(1) not in known:
      return settings.unknown_key(match.group(1), known, given=arg)
  return None
