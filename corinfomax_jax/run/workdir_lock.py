"""The workdir lock: one run at a time writes a workdir's checkpoints.

  with workdir_lock.WorkdirLock(workdir, mode="pretrain") as lock:
    run, mesh = startup.begin(config, workdir, ..., lock=lock)  # takes it
    ...                                                          # released on exit

<workdir>/lock.json names its holder: host, pid, since (UTC), mode and command line, and
on Linux the boot id and the process's start time (/proc/<pid>/stat, field 22), which
tell a restarted holder from the one that wrote the lock. The writing modes (pretrain,
linear_eval, finetune) take it; the reading modes (knn_eval, export, embed) do not, and
may run beside a writer. A lock of this host is stale, and taken over with a warning,
when its process is no longer running: its pid is gone, is this process's own (a
container restarted with the same pid), or belongs to a process started at another time
or before another boot (the pid reused). A lock of another host cannot be checked and is
refused. With several processes only process 0 holds it, and every process learns from
process 0 whether it was taken.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import sys
import time
import uuid

import jax
import numpy as np
from absl import logging

from corinfomax_jax import files
from corinfomax_jax.errors import WorkdirBusyError
from corinfomax_jax.errors import WorkdirError

LOCK_FILE = "lock.json"
_READ_TRIES = 20  # reads of a lock whose JSON is not written yet, 0.05 s apart


class WorkdirLock:
  """The lock of one workdir: `acquire` takes it, leaving the `with` block releases it."""

  def __init__(self, workdir: str, mode: str):
    self._workdir, self._mode = workdir, mode
    self._path = files.as_path(workdir) / LOCK_FILE
    self._held = None  # the record this process wrote, while it holds the lock

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self) -> None:
    """Takes the lock (process 0), or raises WorkdirBusyError naming its holder.

    A workdir that does not exist is not locked: a mode that needs one stops at its
    missing checkpoint, and nothing in it can be overwritten.
    """
    failure = None
    if jax.process_index() == 0 and self._path.parent.is_dir():
      try:
        self._take()
      except Exception as e:  # pylint: disable=broad-except
        failure = e  # raised below, once the other processes know
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      # Every process must stop if process 0 was refused, not hang at the first step.
      refused = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
      if refused and failure is None:
        failure = WorkdirBusyError(
            f"--workdir {self._workdir!r} is in use by another run: process 0 could not "
            f"take its {LOCK_FILE} (process 0's error line names the holder).")
    if failure is not None:
      raise failure

  def release(self) -> None:
    """Removes the lock file when it still names this process; never raises."""
    if self._held is None:
      return
    held, self._held = self._held, None
    try:
      if _read(self._path) == held:
        self._path.unlink()
      else:
        logging.warning("%s no longer names this run (pid %d); left in place.",
                        self._path, os.getpid())
    except Exception as e:  # pylint: disable=broad-except
      # The mode's own outcome (or error) matters more than a lock left behind.
      logging.warning("Could not remove %s: %s; delete it before the next run.",
                      self._path, e)

  def _take(self) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "mode": self._mode, "command": shlex.join(sys.argv),
              **process_identity(os.getpid())}
    for _ in range(3):  # a stale lock set aside, then ours made in its place
      holder = self._create(record)
      if holder is None:
        self._held = record
        return
      why = stale_reason(holder)
      if why is None:
        raise WorkdirBusyError(self._busy(holder))
      logging.warning("Taking over the stale lock %s: %s (pid %s on this host, since %s) "
                      "is no longer running (%s).", self._path, holder.get("mode"),
                      holder.get("pid"), holder.get("since"), why)
      self._remove_stale(holder)
    raise WorkdirBusyError(f"--workdir {self._workdir!r}: other runs keep taking its "
                           f"{LOCK_FILE}; start one run at a time.")

  def _create(self, record: dict) -> dict | None:
    """None when `record` became the lock, else the holder's record ({}: unreadable)."""
    text = json.dumps(record, indent=1) + "\n"
    for _ in range(3):  # a holder that releases between our try and our read
      if files.is_url(self._path):
        # An object store has no exclusive create: exists-then-write is best effort, and
        # two runs started within the same second may both pass.
        if not self._path.exists():
          self._path.write_text(text)
          return None
      else:
        try:
          fd = os.open(os.fspath(self._path), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                       0o644)
        except FileExistsError:
          pass
        else:
          with os.fdopen(fd, "w") as f:
            f.write(text)
          return None
      holder = _read(self._path)
      if holder is not None:
        return holder
    return {}

  def _remove_stale(self, holder: dict) -> None:
    if files.is_url(self._path):
      self._path.unlink(missing_ok=True)
      return
    # Set aside by a rename (atomic), so that of two runs taking over at once only one
    # removes the stale lock and neither removes the other's new one.
    aside = self._path.parent / f"{LOCK_FILE}.stale_{uuid.uuid4().hex}"
    try:
      os.rename(self._path, aside)
    except FileNotFoundError:
      return
    if _read(aside) != holder:  # another run's new lock: put it back
      try:
        os.link(aside, self._path)
      except FileExistsError:
        pass
    os.remove(aside)

  def _busy(self, holder: dict) -> str:
    if not holder:
      return (f"--workdir {self._workdir!r} has an unreadable {self._path}: delete it if "
              "no run uses this workdir.")
    who = (f"{holder.get('mode')} (pid {holder.get('pid')} on {holder.get('host')}, "
           f"since {holder.get('since')})")
    if holder.get("host") != socket.gethostname():
      return (f"--workdir {self._workdir!r} is locked by {who}, which this host "
              f"({socket.gethostname()}) cannot check: if that run is gone, delete "
              f"{self._path}; else wait for it or use another --workdir.")
    if _verified(holder):
      return (f"--workdir {self._workdir!r} is in use by {who}: wait for it to finish "
              f"or stop it (kill {holder.get('pid')}), or use another --workdir; "
              "knn_eval, export and embed may run beside it.")
    # A lock without the holder's start time (an earlier version's): its pid is alive,
    # but may be another process by now, so no advice to kill it.
    return (f"--workdir {self._workdir!r} is locked by {who}, whose pid is alive but may "
            f"now belong to another process: if that run is gone, delete {self._path}; "
            "else wait for it or use another --workdir; knn_eval, export and embed may "
            "run beside it.")


def _read(path) -> dict | None:
  """The lock's record; None when there is no file, {} when it holds no JSON record.

  A lock just created may not hold its JSON yet, so unreadable text is read again.
  """
  for i in range(_READ_TRIES):
    try:
      record = json.loads(files.within_read_timeout(f"the lock {path}", path.read_text))
      return record if isinstance(record, dict) else {}
    except FileNotFoundError:
      return None
    except IsADirectoryError:
      raise WorkdirError(f"{path} is a directory, not the workdir's lock file: remove it "
                         "(rm -r) if no run uses this workdir, then run again.") from None
    except ValueError:
      if i + 1 < _READ_TRIES:
        time.sleep(0.05)
  return {}


def process_identity(pid: int) -> dict:
  """{"boot_id", "start_time"} of process `pid` on Linux ({} elsewhere, or when it is
  gone): with the pid they name one process across pid reuse and reboots."""
  start = _start_time(pid)
  boot_id = _boot_id()
  if start is None or boot_id is None:
    return {}
  return {"boot_id": boot_id, "start_time": start}


def _start_time(pid: int) -> int | None:
  """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) is in parentheses and may hold spaces: split after it.
  fields = stat[stat.rfind(")") + 2:].split()
  try:
    return int(fields[19])  # fields 3, 4, ... from index 0: field 22 is index 19
  except (IndexError, ValueError):
    return None


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip() or None
  except OSError:
    return None


def _verified(holder: dict) -> bool:
  """True when the holder's pid is the very process that wrote the lock (same boot,
  same start time)."""
  return ("start_time" in holder and process_identity(holder.get("pid", -1)) == {
      "boot_id": holder.get("boot_id"), "start_time": holder.get("start_time")})


def stale_reason(holder: dict) -> str | None:
  """Why the process of a lock of this host is no longer running, or None when it may
  be (or, for another host's lock, cannot be checked)."""
  pid = holder.get("pid")
  if (holder.get("host") != socket.gethostname() or not isinstance(pid, int)
      or isinstance(pid, bool) or pid <= 0):
    return None
  if pid == os.getpid():
    return "its pid is this process's own: a restart with the same pid"
  if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
    return "written before this host's last boot"
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return "its pid is gone"
  except PermissionError:  # alive, under another user
    pass
  start = _start_time(pid)
  if "start_time" in holder and start is not None and start != holder["start_time"]:
    return "its pid now belongs to a process started later"
  return None
