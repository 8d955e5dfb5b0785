"""The device mesh: one data-parallel axis over every device of every process."""
import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corinfomax_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def platform(mesh: jax.sharding.Mesh) -> str:
  """The platform of the mesh's devices: "cpu", "gpu", "tpu", ..."""
  return mesh.devices.flat[0].platform


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Parameters, optimizer and loss state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A global batch: its leading axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divides(batch_size: int, num_devices: int, num_processes: int,
                        key: str = "batch_size") -> None:
  """The global batch `config.<key>` must split evenly over processes and devices."""
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
    raise ConfigError(f"config.{key} = {batch_size!r} is invalid: expected a positive "
                      "integer")
  for count, what in ((num_processes, "processes"), (num_devices, "devices")):
    if batch_size % count:
      need = math.lcm(num_devices, num_processes)
      raise ConfigError(
          f"config.{key} = {batch_size} does not divide over the {count} {what}: "
          f"use a multiple of {need} (e.g. {max(need, batch_size // need * need)})")
