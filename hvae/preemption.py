"""Stop requests (SIGTERM / SIGINT) and the checks that honour them between jitted calls.

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
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


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
    must ask at the same points, as the evaluation loops do)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))
