"""The barrier between processes in orbax's background saves, which stops waiting once a save has
failed on any process (docs/reliability.md, "A failed write with several processes").

orbax finishes a save in background threads. Each process writes its own files, waits at a
barrier for the others, then process 0 commits the step, and every process waits at a last
barrier. When the files of one process cannot be written (a full disk), that process skips the
first barrier and waits at the last one, while the others wait at the first. Nothing can pass,
so every process's next save or `wait()` blocks until orbax's timeout (20 minutes), and each then
fails with a different message. Tried on two processes, process 1 under a file-size limit: both
blocked in their next save.

`SaveBarrier` replaces that barrier (orbax's `AsyncOptions.barrier_sync_fn`) with one kept in the
job's key-value store (JAX's distributed client). Each process posts its arrival and waits until
every process has arrived. A process whose save fails posts the reason first (`fail`; the
checkpointer does it in orbax's background thread, before that thread's last barrier), and a
process waiting at a barrier raises `PeerSaveFailed` as soon as a failure is posted. So the save
fails on every process at the same call, within a poll interval, with the same reason (the first
one posted). The training loop then agrees on that failure like a failed write of process 0
(`hvae.preemption.agree`). With one process the barrier returns at once and `fail` returns the
reason it is given.

Not covered: orbax's other barriers (before a save's background part: `save_start`, the
creation of the step's temporary folder, deleting old steps) are JAX's own, which know nothing
of a posted failure. A save that raises on one process in that synchronous part (not a full
disk, whose writes fail in the background) leaves the others there until JAX's barrier timeout.
"""

from __future__ import annotations

import itertools
import threading
import time

import jax

_PREFIX = "hvae_checkpoint"
_POLL_SECONDS = 0.05
# Numbers the writing checkpointers of a process. Every process opens its writers in the same
# order (opening one is collective), so the same number is the same checkpointer on every
# process, and two checkpointers of one job never share keys. Readers open no barrier, so one
# that a process opens first (e.g. to read a checkpoint) shifts nothing. Not the directory's
# path: hosts may mount one directory at different paths.
_WRITERS = itertools.count(1)


class PeerSaveFailed(RuntimeError):
  """A barrier of a save stopped waiting because a save failed on some process; the message is
  that failure's reason ("process 1: ValueError: ...")."""


def _distributed_client():
  """JAX's client of the job's coordination service (orbax reaches it the same way)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("several processes but no distributed client: call "
                       "jax.distributed.initialize() first")
  return client


class SaveBarrier:
  """orbax's barrier for the background part of a save (`key`, `timeout_ms`), which raises
  `PeerSaveFailed` instead of waiting once any process has posted a failed save (`fail`)."""

  def __init__(self, client=None, *, process_index: int | None = None,
               process_count: int | None = None, instance: str | None = None):
    """One per writing checkpointer. `client` (JAX's distributed client, by default),
    `process_index`, `process_count` and `instance` (the keys' prefix in the job, instead of
    the writer's number) are given by tests that play several processes in one."""
    self._prefix = f"{_PREFIX}/{next(_WRITERS) if instance is None else instance}"
    self._count = jax.process_count() if process_count is None else process_count
    self._index = jax.process_index() if process_index is None else process_index
    if client is None and self._count > 1:
      client = _distributed_client()
    self._client = client
    self._rounds: dict[str, int] = {}  # how often each key was used (orbax reuses some)
    self._passed: list[str] = []  # this process's arrival keys of the last barriers passed
    self._lock = threading.Lock()

  def __call__(self, *, key: str, timeout_ms: int) -> None:
    if self._count == 1:
      return
    with self._lock:
      n = self._rounds[key] = self._rounds.get(key, 0) + 1
    arrivals = f"{self._prefix}/barrier/{key}/{n}/"
    mine = arrivals + str(self._index)
    self._client.key_value_set(mine, "")
    deadline = time.monotonic() + timeout_ms / 1000
    while len(self._client.key_value_dir_get(arrivals)) < self._count:
      failure = self.failure()
      if failure is not None:
        raise PeerSaveFailed(failure)
      if time.monotonic() > deadline:
        raise TimeoutError(f"Timed out after {timeout_ms / 1000:.0f} s at the barrier {key!r} "
                           "of a checkpoint save.")
      time.sleep(_POLL_SECONDS)
    # Every process calls the barriers in the same order, so every process that reaches this
    # one has left the one before: the arrival two barriers back is read by nobody any more.
    with self._lock:
      self._passed.append(mine)
      done, self._passed = self._passed[:-2], self._passed[-2:]
    for old in done:
      self._client.key_value_delete(old)

  def fail(self, reason: str) -> str:
    """Posts that a save failed on this process, unless a failure was posted before.

    Returns:
      With several processes the first failure posted for this checkpointer ("process I:
      REASON"): a failure ends the checkpointer's saves on every process (each later barrier
      raises at once), as it ends the run. With one process `reason`, as given.
    """
    if self._count == 1:
      return reason
    text = f"process {self._index}: {reason}"
    try:
      self._client.key_value_set(f"{self._prefix}/failed", text)
    except jax.errors.JaxRuntimeError:  # ALREADY_EXISTS: another failure came first
      pass
    return self.failure() or text

  def failure(self) -> str | None:
    """The first failure posted for this checkpointer, or None (always None with one process)."""
    if self._count == 1:
      return None
    try:
      return self._client.key_value_try_get(f"{self._prefix}/failed")
    except jax.errors.JaxRuntimeError:  # NOT_FOUND
      return None
