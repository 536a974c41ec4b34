"""One `train` per workdir: the lock file WORKDIR/train.lock (docs/reliability.md).

Two trainings on one workdir would overwrite each other's checkpoints and interleave their
`metrics.jsonl` rows without an error, so `hvae.loop.train_and_evaluate` holds this lock for the
whole run. Evaluation, inpainting and reports only read a workdir and never take it.

The lock file holds one JSON object naming its holder: `pid`, `host`, `start_ticks` (the
process's start time in clock ticks after boot, from /proc, so a reused pid is recognised),
`started` and `command`. Taking the lock:

1. open (or create) the file and take an exclusive, non-blocking `flock` on it, re-opening if the
   file was replaced meanwhile. A live holder keeps its flock, so this fails at once while it
   runs, on any host of a file system that supports flock;
2. read the holder named inside: a process that is alive on this host (same pid, same start
   time) keeps the lock: `WorkdirLockedError` names it. A holder that is not alive on this host
   left a stale lock (killed with SIGKILL, or the machine rebooted; also a record of this very
   pid in a file we could flock: a container restarted with the same pids): it is taken over
   with a warning. A holder on another host is taken over (with a warning) when we obtained the
   flock, which it would still hold if it ran (a job restarted on a new node resumes); where
   flock is not supported, its liveness cannot be checked from here and it keeps the lock;
3. write our own record. On exit (normal, exception, SIGTERM, Ctrl-C) the file is removed.

A lock file that cannot be created or written (a full disk, a quota or file-size limit) stops
the training before it starts with `FileWriteError`, one line naming the file, as any other
file of a run does; a half-written record is removed. With several processes only process 0
takes the lock, and tells the others what happened (`hold_job`).

While the lock is held and no other handler is installed, SIGTERM raises `SystemExit` in the main
thread, so a run stopped before its training loop starts (data preparation, compilation) still
releases the lock; the training loop installs its own handler (checkpoint, then stop).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator

import jax
from absl import logging

from hvae import preemption
from hvae.errors import USER_ERRORS, FileWriteError, WorkdirLockedError
from hvae.writers import writing

LOCK_FILE = "train.lock"


def _start_ticks(pid: int) -> int | None:
  """The process's start time (clock ticks after boot, /proc/PID/stat field 22), or None."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      stat = f.read()
  except OSError:
    return None
  try:  # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    return int(stat.rsplit(")", 1)[1].split()[19])
  except (IndexError, ValueError):
    return None


def _alive(pid: int, start_ticks: int | None) -> bool:
  """Whether process `pid` of this host is running and is the one that wrote the lock."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    pass
  now = _start_ticks(pid)
  return start_ticks is None or now is None or now == start_ticks


def _describe(holder: dict) -> str:
  since = f", started {holder['started']}" if holder.get("started") else ""
  return f"pid {holder.get('pid')} on host {holder.get('host')}{since}"


def _read(fd: int) -> dict | None:
  """The holder recorded in the open lock file; None when empty or unreadable."""
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while chunk := os.read(fd, 65536):
    raw += chunk
  if not raw.strip():
    return None
  try:
    holder = json.loads(raw)
    return holder if isinstance(holder, dict) and "pid" in holder else None
  except ValueError:
    return None


def _open_locked(path: str) -> tuple[int, bool]:
  """(fd of the lock file, whether it is flock-ed by us); raises when a live process flocks it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read(fd)
        os.close(fd)
        raise WorkdirLockedError(_refusal(path, holder)) from None
      # A file system without flock (some cluster mounts): the holder record alone decides.
      logging.warning("%s: file locking is not supported here (%s); relying on the pid in the "
                      "lock file.", path, e)
      return fd, False
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      return fd, True
    os.close(fd)  # the holder removed (released) the file between our open and flock: retry


def _refusal(path: str, holder: dict | None) -> str:
  workdir = os.path.dirname(path)
  who = _describe(holder) if holder else "another process"
  return (f"{workdir} is being trained by {who} (lock {path}): wait for it to finish or stop it, "
          f"or train into another --workdir. If that process is not running any more, delete "
          f"{path}.")


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/train.lock for the duration (see the module docstring).

  Args:
    workdir: the run directory (must exist).

  Raises:
    WorkdirLockedError: another live process holds the lock (the message names its pid and
      host, and what to do).
    FileWriteError: the lock file could not be created or written (a full disk, a quota or
      file-size limit, no permission): one line; no partial lock file is left.
  """
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  host, pid = socket.gethostname(), os.getpid()
  try:
    with writing(path):
      fd, flocked = _open_locked(path)
  except FileWriteError as e:
    raise _not_started(e) from e
  try:
    holder = _read(fd)
    if holder is not None:
      other_host = holder.get("host") != host
      # Our own pid in a file we could flock: an earlier process that had our pid (containers
      # restart with the same pids), since this process would hold the flock.
      earlier_self = not other_host and holder.get("pid") == pid and flocked
      if other_host and not flocked:  # its liveness cannot be checked from here
        raise WorkdirLockedError(_refusal(path, holder))
      if not other_host and not earlier_self and _alive(int(holder.get("pid", -1)),
                                                        holder.get("start_ticks")):
        raise WorkdirLockedError(_refusal(path, holder))
      why = ("its host no longer holds the file lock (a job restarted on another node?)"
             if other_host else "that process is not running")
      logging.warning("Taking over the stale lock %s of %s: %s.", path, _describe(holder), why)
    mine = {"pid": pid, "host": host, "start_ticks": _start_ticks(pid),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": sys.argv}
    try:
      with writing(path):
        _write_record(fd, mine)
    except FileWriteError as e:
      with contextlib.suppress(OSError):
        os.remove(path)  # our half-written record (a stale one was taken over: logged above)
      raise _not_started(e) from e
  except BaseException:
    os.close(fd)
    raise
  old_handler = _raise_on_sigterm()
  try:
    yield
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    try:
      holder = _read(fd)
      if holder and holder.get("pid") == pid and holder.get("host") == host:
        os.remove(path)  # while still flock-ed: a waiting opener sees a new file (samestat)
    except OSError as e:
      logging.warning("Could not remove the lock %s: %s", path, e)
    os.close(fd)  # releases the flock


def _write_record(fd: int, record: dict) -> None:
  """Replaces the open lock file's content with `record` (a write may be cut short near a
  file-size limit: the rest is written, or the next write raises)."""
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  rest = memoryview(json.dumps(record).encode() + b"\n")
  while rest:
    rest = rest[os.write(fd, rest):]
  os.fsync(fd)


def _not_started(error: FileWriteError) -> FileWriteError:
  """`error` (one line naming the lock file), and what to do: nothing else was written yet."""
  what = "free some space" if getattr(error, "no_space", True) else "fix that"
  then = f"the training did not start: {what} and run the same command again."
  text = str(error)
  joined = FileWriteError(f"{text} {then[0].upper()}{then[1:]}" if text.endswith("?") else
                          f"{text}; {then}")
  joined.no_space = getattr(error, "no_space", True)
  return joined


_KINDS = {kind.__name__: kind for kind in USER_ERRORS}  # what `hold_job` re-raises elsewhere


@contextlib.contextmanager
def hold_job(workdir: str) -> Iterator[None]:
  """`hold` for a job of one or several processes: process 0 takes the lock (the others write
  no workdir file of their own) and tells every process whether it could, so a refusal or a
  failed write is the same one-line error everywhere instead of the others waiting in a
  collective (`preemption.broadcast_message`)."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(hold(workdir))
      except Exception as e:  # pylint: disable=broad-except  (every process must hear of it)
        error = e
    said = preemption.broadcast_message(
        "" if error is None else f"{type(error).__name__}\n{error}")
    if error is not None:
      raise error
    if said:
      kind, _, message = said.partition("\n")
      raise _KINDS.get(kind, RuntimeError)(message or kind)
    yield


def _raise_on_sigterm():
  """Makes SIGTERM raise SystemExit (so `finally` blocks run); returns the old handler or None."""
  if threading.current_thread() is not threading.main_thread():
    return None
  if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
    return None

  def _exit(signum, frame):
    del frame
    logging.warning("Signal %d received: stopping.", signum)
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, _exit)
  return signal.SIG_DFL
