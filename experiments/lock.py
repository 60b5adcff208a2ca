"""One writer per workdir: a run holds `<workdir>/run.lock` while it trains.

The lock file says who holds it (host, pid, the process's start time, when). It is created
atomically (O_EXCL), so of two runs started on one workdir (a job resubmitted while the first
still runs) the second stops at once, before compiling, with a message naming the holder. A
lock left by a run that died (`kill -9`, a lost machine) does not hold forever: on the same
host, a holder whose process is gone (or is another process with the same pid) is stale, and
the new run takes the lock over, logged. A lock from another host is refused with the command
that removes it; on shared storage only a person can tell whether that run is still alive.
With several processes, process 0 takes the lock for all of them.
"""

import contextlib
import json
import os
import socket
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

NAME = "run.lock"


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir."""


def _start_time(pid: int) -> str | None:
  """The process's start time (clock ticks since boot, Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  pid = int(holder.get("pid", -1))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # someone else's process: alive
  started = holder.get("started_ticks")
  return started is None or _start_time(pid) in (None, started)


def _try_take(path: str) -> str | None:
  """Takes the lock at `path`; None when taken, else why not (the message for the user)."""
  me = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started_ticks": _start_time(os.getpid()),
    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  for _ in range(2):  # a stale lock is removed once, then taken like a free one
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}  # being written, or cut short by a kill: judged by its age below
      same_host = holder.get("host") == me["host"]
      if holder and same_host and not _alive(holder):
        logging.warning("Taking over %s from a run that is gone: %s", path, holder)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      if not holder and time.time() - os.path.getmtime(path) > 60:
        logging.warning("Taking over %s: empty or unreadable for over a minute", path)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
      fix = (
        "wait for it to finish or stop it" if same_host else f"if that run is gone, remove {path}"
      )
      return (
        f"{os.path.dirname(path)} is in use by another run ({who}): one run writes a workdir "
        f"at a time. Use another --workdir, or {fix}."
      )
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return None
  return f"Could not take {path}: another run took it first."


@contextlib.contextmanager
def hold(workdir: str):
  """Holds `<workdir>/run.lock` for the block; raises WorkdirInUse, before anything else
  happens, when another live run holds it."""
  path = os.path.join(os.path.abspath(workdir), NAME)
  error = None
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    error = _try_take(path)
  if jax.process_count() > 1:  # every process stops, or none does
    ok = multihost_utils.broadcast_one_to_all(np.array(error is None))
    error = error or (None if ok else "process 0 could not take the workdir's lock")
  if error:
    raise WorkdirInUse(error)
  try:
    yield
  finally:
    if jax.process_index() == 0:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
