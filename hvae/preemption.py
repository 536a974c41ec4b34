"""Stop requests (SIGTERM / SIGINT) and the checks that honour them between jitted calls; how
every process of a job stops together (on a stop request, or on a write that failed).

A cluster preempts a job with SIGTERM and kills it (SIGKILL) some seconds later. `StopRequest`
turns SIGTERM and SIGINT into a flag; every long host loop of an evaluation asks
`check(interrupt)` between its jitted calls (the evaluation batches, the chunks of the IW bound,
the swap pass, each step of the posterior refinement, the memorisation pass) and raises
`Interrupted` once the flag is set. Training then checkpoints and stops (hvae/loop.py);
`--mode=eval`, which has nothing to resume from, writes nothing and exits with one line
(launch.py, `hvae.errors.Stopped`).

Asynchronous dispatch would defeat the checks: a host loop that only enqueues its calls has
queued all of them before the signal comes. `Pacer` keeps at most one call queued behind the
running one, so a stop request is honoured after at most two jitted calls.

Several processes (hosts) must stop at the same point, or the others wait forever in their next
collective. `agree` is the one collective that decides it: every process gives its stop flag and
whether a write of its own failed; all learn whether any asked to stop, and a failed write is
raised on every process as the same one-line error of the same kind (`FileWriteError`, or
`CheckpointWriteError` for a checkpoint save; the failing process's message, broadcast). Only
process 0 writes a run's files, and a checkpoint save can fail on any process, so `HeldWrites`
keeps such a failure until the next `agree` instead of raising it while the others go on
(docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from hvae.errors import CheckpointWriteError, FileWriteError

_MESSAGE_BYTES = 4096  # the longest message `broadcast_message` carries
# The failures `agree` raises on every process, by the index each process sends.
_FAILURES = (FileWriteError, CheckpointWriteError)


class Interrupted(Exception):
  """An evaluation stopped between two jitted calls because its `interrupt()` said so (a stop
  request); nothing of it is kept."""


def check(interrupt) -> None:
  """Raises `Interrupted` when `interrupt` (None, or a callable) says to stop."""
  if interrupt is not None and interrupt():
    raise Interrupted


class Pacer:
  """Keeps a host loop of jitted calls at most one call ahead of the device, when it checks for
  stop requests (`interrupt` given); otherwise it does nothing and the loop enqueues freely.

  Call it with each call's output right after dispatching the call: it waits for the previous
  call's output, so the device always has the next call queued and the host is never more than
  that one call ahead."""

  def __init__(self, interrupt):
    self._active = interrupt is not None
    self._last = None

  def __call__(self, out):
    if self._active:
      if self._last is not None:
        jax.block_until_ready(self._last)
      self._last = out
    return out


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag (`requested`, and the signal's number `signum`) while
  entered; `agreed()` is the flag the loops check.

  Only the main thread can install handlers: elsewhere (some notebooks) the signals keep their
  usual effect and the flag stays False."""

  def __init__(self, action: str):
    """`action`: what the process does on a request, for the log line ("saving a checkpoint and
    stopping")."""
    self.action = action
    self.requested = False
    self.signum = None
    self._old = {}

  def __enter__(self) -> StopRequest:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("Signal %d received: %s.", signum, self.action)
    self.requested = True
    self.signum = self.signum or signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def agreed(self) -> bool:
    """Whether a stop was requested on any process: with several, a collective (every process
    must ask at the same points, as the evaluation loops do; `agree`)."""
    return agree(self.requested)


def agree(requested: bool, failure: FileWriteError | CheckpointWriteError | None = None) -> bool:
  """Whether any process asks to stop (`requested`), unless a write failed on one of them.

  With several processes this is one collective, which every process must reach at the same
  point; with one it is `requested` (or `failure` raised).

  Raises:
    FileWriteError, CheckpointWriteError: `failure` on the process that holds it, and on every
      other process an error of the same kind with its message (that of the lowest-numbered
      failing process).
  """
  if jax.process_count() == 1:
    if failure is not None:
      raise failure
    return requested
  kind = next((i for i, k in enumerate(_FAILURES) if isinstance(failure, k)), 0)
  mine = np.asarray([bool(requested), failure is not None,
                     bool(getattr(failure, "no_space", True)), kind], np.int32)
  flags = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
  failed = np.flatnonzero(flags[:, 1])
  if not failed.size:
    return bool(flags[:, 0].any())
  source = int(failed[0])
  here = jax.process_index() == source
  message = broadcast_message(str(failure) if here else "", is_source=here)
  if here:
    raise failure
  error = _FAILURES[int(flags[source, 3])](
      message or f"process {source} could not write one of the run's files")
  error.no_space = bool(flags[source, 2])  # what to do about it (hvae.writers.write_error)
  raise error


def broadcast_message(message: str, *, is_source: bool | None = None) -> str:
  """The source's `message` ('' for none; process 0 unless `is_source` says otherwise, which
  must be True on exactly one process) on every process: with several, a collective."""
  if jax.process_count() == 1:
    return message
  raw = np.frombuffer(message.encode()[:_MESSAGE_BYTES], np.uint8).astype(np.int32)
  buffer = np.zeros(_MESSAGE_BYTES, np.int32)
  buffer[:raw.size] = raw
  received = multihost_utils.broadcast_one_to_all(buffer, is_source=is_source)
  return bytes(np.asarray(received).astype(np.uint8)).rstrip(b"\0").decode(errors="replace")


class HeldWrites:
  """Writes whose failure every process must hear of: process 0's writes of the run's files, and
  every process's checkpoint saves.

  With several processes only process 0 writes the run's files. Raising its `FileWriteError` at
  once would leave the other processes waiting for it in their next collective, so `held()`
  keeps the failure of a write inside it and the next `agree()` (a collective every process
  reaches at the same point, before any other) raises it on every process. A checkpoint save
  that fails on one process mostly fails on all of them at the same call
  (hvae/checkpoint_sync.py), but not always: a failure once the step is committed (deleting an
  old step, which process 0 does) is not posted, and surfaces at that process's `wait()` alone.
  So its `CheckpointWriteError` is held the same way, and `agree()` raises the same line
  everywhere.
  With one process the failure is raised at once and `agree()` is free."""

  def __init__(self):
    self._failure = None

  @contextlib.contextmanager
  def held(self):
    """Around process 0's writes and the checkpoint saves: see the class docstring. The rest of
    the block is skipped after a failure; what follows must not need it before `agree()`."""
    try:
      yield
    except (FileWriteError, CheckpointWriteError) as e:
      if jax.process_count() == 1:
        raise
      logging.error("%s", e)
      self._failure = self._failure or e

  def agree(self, request: StopRequest | None = None) -> bool:
    """`agree`, with `request`'s flag (False without one) and the failure held since the last
    call: whether to stop, or the held `FileWriteError` raised on every process."""
    failure, self._failure = self._failure, None
    return agree(bool(request and request.requested), failure)
