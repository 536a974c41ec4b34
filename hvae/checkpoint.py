"""Orbax checkpoints of the training state and the data-iterator position (WORKDIR/checkpoints).

Why one file past ~350 lines: saving, retention, restore and the fallback past damaged steps
are one protocol over one orbax manager (and agreed on across processes); split, each half
would need the other's invariants.

One `Checkpointer` owns an orbax `CheckpointManager` with two items per step:

* `state`: any pytree of arrays (the flax `TrainState`), saved with `StandardSave`;
* `data_state`: a JSON object `{"data_state": <dict or null>}` with the input pipeline's position,
  so resuming continues the data stream where the crashed run left it.

Retention (docs/design.md §7 "Workdir"): the latest `keep` checkpoints *and* the best one by
`best_metric` (lower is better) survive, through orbax's
`AnyPreservationPolicy([LatestN(keep), BestN(n=1)])`. Checkpoints saved without metrics count
towards the latest ones only; they can never push the best one out.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
only after every file (and `commit_success.txt`) is written. Step discovery ignores the tmp names,
so a process killed mid-save leaves the previous checkpoint as the latest usable one; the leftover
tmp directory is deleted by the next writing `Checkpointer` (`cleanup_tmp_directories`: started
when it opens the directory, finished before its first save). This protects against a killed
*process*; it does not fsync, so it makes no promise about a machine losing power mid-write. A
save that cannot be written (a full disk) raises `CheckpointWriteError` at the next save or
`wait()`, naming the step and the newest intact one. With several processes a save that fails on
one of them fails on every one at the same call, with the same reason, instead of leaving the
others blocked at one of orbax's barriers (`hvae.checkpoint_sync`).

Fallback (docs/reliability.md): a committed step that cannot be read back (a truncated or deleted
array file, a deleted `data_state/`, an empty step directory, bad JSON, ...) is skipped with a
warning naming the step and why, and the next candidate is tried: the next older step for
"latest", the next best by `best_metric` for "best". A writer (training) then moves each skipped
step to `checkpoints/corrupt/STEP` (never deleted), but only once an older step has loaded into
the same target: that proves the target (the config) is right and the skipped steps are damaged.
When no step loads nothing is moved (a changed model config fails on every step) and
`CheckpointUnavailableError` says what to do. Readers (`read_only`) never move anything.
With several processes, every step's outcome is agreed on before it is used: a step counts as
loaded only if it loaded on every process, so all restore the same step and move the same ones.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from hvae.checkpoint_sync import SaveBarrier
from hvae.errors import CheckpointUnavailableError, CheckpointWriteError, ConfigError

_STATE = "state"
_DATA = "data_state"
CORRUPT_DIR = "corrupt"  # damaged steps are moved to checkpoints/corrupt/STEP, never deleted
_REASON_CHARS = 200  # a restore error's message is cut to this in warnings and errors


def _to_json(value: Any) -> Any:
  """Converts numpy/jax scalars and arrays inside `value` to plain Python for JSON.

  Args:
    value: a (nested) dict/list/tuple of JSON-compatible values, numpy or jax scalars or arrays.

  Returns:
    The same structure with arrays as (nested) lists and scalars as Python int/float/bool.
  """
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_to_json(v) for v in value]
  if isinstance(value, jax.Array | np.ndarray | np.generic):
    return np.asarray(value).tolist()
  return value


def _reason(error: BaseException) -> str:
  """One short line on why a restore failed: the type and the message, long middles cut out."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = " ".join(re.split(r"\s\[tensorstore_spec", str(text))[0].split())  # cut the JSON specs
  if len(text) > _REASON_CHARS:  # tensorstore nests the file's path and the cause at the end
    head, tail = text.split(":", 1)[0][:40], text[-(_REASON_CHARS - 45):]
    text = f"{head}: ... {tail[tail.find(' ') + 1:]}"
  return f"{type(error).__name__}: {text}"


def _quiet_closed_loop_callbacks() -> None:
  """Silences the late callbacks of a failed orbax read or write (installed at the first failed
  read, and when a writing `Checkpointer` opens: a save fails in a background thread, and its
  callbacks print while the training goes on, before any call of ours sees the failure).

  After a restore (or a save) fails, tensorstore still completes the step's other reads (or
  writes) and their callbacks try to wake orbax's event loop, already closed: each prints a bare
  "RuntimeError: Event loop is closed" traceback through `sys.unraisablehook`, dozens of them
  around the one message that matters. Exactly those are dropped; every other unraisable
  exception reaches the old hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_hvae_quiet", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._hvae_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _metric_value(metrics: Mapping[str, Any], name: str) -> float:
  """The ranking value of one checkpoint's metrics; NaN ranks as the worst (+inf)."""
  value = float(metrics[name])
  # A diverged evaluation (NaN) must never be chosen as the best checkpoint.
  return value if not math.isnan(value) else math.inf


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process: a collective, so every process must call it."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _barrier(name: str) -> None:
  """Waits for every process (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# Reasons of a failed save that name a stalled job, not a full disk (SaveBarrier's timeout,
# JAX's coordination service).
_STALLED = ("TimeoutError", "DEADLINE_EXCEEDED", "UNAVAILABLE")


class _Manager(ocp.CheckpointManager):
  """orbax's manager, except that a step whose metrics JSON cannot be read counts as not
  evaluated (with a warning) instead of stopping every open of the directory, and that a save
  whose background part fails posts it to `barrier` (the other processes stop waiting for it)."""

  def __init__(self, *args, barrier: SaveBarrier | None, **kwargs):
    self._hvae_barrier = barrier
    super().__init__(*args, **kwargs)

  def _wait_for_checkpointers(self):
    # orbax's finalize thread calls this first, then (in a `finally`) waits at its last barrier:
    # the failure must be posted in between, or the other processes wait for this one there.
    try:
      super()._wait_for_checkpointers()
    except Exception as e:  # pylint: disable=broad-except  (re-raised)
      if self._hvae_barrier is not None:
        self._hvae_barrier.fail(_reason(e))
      raise

  def metrics(self, step: int) -> Any:
    try:
      return super().metrics(step)
    except ValueError as e:  # json.JSONDecodeError, or orbax's own parse error
      warned = self.__dict__.setdefault("_hvae_warned", set())  # set before __init__ returns
      if step not in warned:
        warned.add(step)
        logging.warning("Checkpoint step %d: its metrics cannot be read (%s); it is not ranked "
                        "as the best.", step, _reason(e))
      return None


class Checkpointer:
  """Saves and restores (state, data_state) per step; keeps the latest N and the best."""

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "eval/bpd",
               read_only: bool = False):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: where step directories live, normally WORKDIR/checkpoints.
      keep: how many of the most recent checkpoints to keep (the best one is kept on top).
      best_metric: the metric, lower is better, that picks the best checkpoint.
      read_only: for readers (evaluation, notebooks): never create, save, delete, or clean up
        the tmp directories of a training run that may be saving right now.
    """
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self._directory = os.path.abspath(os.fspath(directory))
    self._best_metric = best_metric
    self._read_only = read_only
    self._unfinished: list[int] = []  # steps whose save may still be in flight
    # orbax's barrier of a save, which stops waiting when a save fails; readers never save
    # (and open no barrier, so they cannot shift the writers' numbers: hvae/checkpoint_sync.py).
    self._barrier = None if read_only else SaveBarrier()
    if not read_only:
      _quiet_closed_loop_callbacks()
    get_metric = lambda m: _metric_value(m, best_metric)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        # reverse=True sorts descending, so the kept tail (`[-n:]`) holds the lowest value.
        # Metric-less checkpoints are LatestN's business; BestN must not pin them forever.
        ocp.checkpoint_managers.BestN(get_metric_fn=get_metric, reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        # best_fn/best_mode make the manager record metrics and answer best_step(); which
        # steps are deleted is decided by the preservation policy alone.
        best_fn=get_metric,
        best_mode="min",
        preservation_policy=policy,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
        async_options=ocp.AsyncOptions(barrier_sync_fn=self._barrier),
    )
    self._manager = _Manager(self._directory, item_names=(_STATE, _DATA), options=options,
                             barrier=self._barrier)

  @property
  def directory(self) -> str:
    return self._directory

  def all_steps(self) -> list[int]:
    """Returns: the checkpoint steps, ascending.

    The committed steps found on disk plus those this object has started saving (which are
    committed once `wait()` returns); unfinished tmp directories of other processes never count.
    """
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns: the newest step (including a save still in flight here), or None if none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Returns: the step with the lowest `best_metric`, or None if no checkpoint has metrics."""
    # The manager falls back to the latest step when no checkpoint carries metrics; "best"
    # must mean "evaluated and lowest", so check for metrics explicitly.
    if self._manager.latest_step() is None:
      return None
    step = self._manager.best_step()
    if step is None or self._manager.metrics(step) is None:
      return None
    return step

  def save(self, step: int, state: Any, *, data_state: dict | None = None,
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` and `data_state` at `step`.

    Call on every process; orbax makes process 0 write the shared metadata. The arrays are
    copied off the device before returning, so `state` may be donated/updated right after.

    Args:
      step: the training step the state belongs to.
      state: a pytree of jax/numpy arrays (e.g. the TrainState).
      data_state: a JSON-serialisable dict (numpy scalars/arrays allowed; arrays come back as
        lists) with the data iterator's position, or None.
      metrics: this step's eval metrics; only `best_metric` is used for ranking. None (or a dict
        without `best_metric`) saves a checkpoint that counts as "latest" only.
      force: save even if orbax's save-decision policy would skip this step.

    Returns:
      True if a save was started; False if the step was skipped (already saved, or not due).
    """
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists in %s; not saving again.", step,
                   self._directory)
      return False
    if metrics is not None and self._best_metric in metrics:
      # Only numbers go into orbax's metrics JSON; strings or per-example arrays are dropped.
      metrics = {k: float(v) for k, v in _to_json(dict(metrics)).items()
                 if isinstance(v, int | float)}
    else:
      metrics = None
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave({_DATA: _to_json(data_state)}),
    })
    # orbax first finishes the previous save: its failure (a full disk) is raised here too.
    saved = self._finishing(
        lambda: self._manager.save(step, args=args, metrics=metrics, force=force), step)
    if saved:
      logging.info("Saving checkpoint for step %d to %s.", step, self._directory)
      self._unfinished = [step]
    return bool(saved)

  def wait(self) -> None:
    """Blocks until every started save is committed (call before exiting or reading back).

    Raises:
      CheckpointWriteError: a save could not be written (a full disk, a quota or file-size
        limit); the steps committed before it are intact.
    """
    self._finishing(self._manager.wait_until_finished)
    self._unfinished = []

  def _finishing(self, call, step: int | None = None):
    """`call()`, a manager call that finishes the saves in flight (and starts `step`'s); any
    failure of it is a save that could not be written: `CheckpointWriteError`, one line. With
    several processes its reason is the first failure posted (`SaveBarrier.fail`), the same on
    every process."""
    try:
      return call()
    except Exception as e:  # pylint: disable=broad-except  (orbax raises ValueError, OSError...)
      _quiet_closed_loop_callbacks()  # the failed write's other callbacks, as after a bad read
      reason = _reason(e)
      if self._barrier is not None:
        reason = self._barrier.fail(reason)  # posted before any other call can wait for us
      failed = sorted(set(self._unfinished + ([step] if step is not None else [])))
      intact = [s for s in self._manager.all_steps() if s not in failed]
      # A barrier that timed out or a lost coordination service is not a full disk.
      stalled = any(m in reason for m in _STALLED)
      question, fix = (("did a process of the job stop or hang?", "see the other processes' "
                        "logs, then") if stalled else
                       ("is the disk full, or a quota or file-size limit reached?",
                        "free some space and"))
      then = (f"the previous checkpoint (step {max(intact)}) is intact: {fix} run the same "
              "command to resume from it" if intact else
              f"no earlier checkpoint exists: {fix} run the same command again")
      error = CheckpointWriteError(
          f"Checkpoint step {', '.join(map(str, failed)) or '?'} could not be written to "
          f"{self._directory} ({reason}): {question} Nothing of it is used; {then}.")
      error.no_space = not stalled
      raise error from e

  def _candidates(self, step: int | str | None) -> tuple[list[int], str]:
    """The steps to try, in order, for None/"latest"/"best"/int, and a name for messages.

    "latest": every step, newest first. "best": the evaluated steps by `best_metric` (the
    manager's best first), then the others newest first. An int: that step alone.

    Raises:
      CheckpointUnavailableError: no checkpoint at all, none evaluated ("best"), or no such step.
      ConfigError: a string step that is not "best", "latest" or digits.
    """
    available = self.all_steps()
    if step is None or step == "latest":
      if not available:
        raise CheckpointUnavailableError(
            f"No checkpoints in {self._directory}: train the run first (python launch.py "
            f"--workdir={os.path.dirname(self._directory)}).")
      return available[::-1], "latest"
    if step == "best":
      best = self.best_step()
      if best is None:
        raise CheckpointUnavailableError(
            f"No checkpoint in {self._directory} has metric {self._best_metric!r}; "
            f"available steps: {available}.")
      evaluated = [s for s in available if self._manager.metrics(s) is not None]
      ranked = sorted(evaluated, key=lambda s: (_metric_value(self._manager.metrics(s),
                                                              self._best_metric), -s))
      ranked = [best] + [s for s in ranked if s != best]
      return ranked + [s for s in available[::-1] if s not in ranked], "best"
    if isinstance(step, str):
      if not step.isdigit():
        raise ConfigError(f"--checkpoint: {step!r} is not best, latest or a step number.")
      step = int(step)
    if step not in available:
      raise CheckpointUnavailableError(
          f"No checkpoint for step {step} in {self._directory}; available steps: {available}.")
    return [int(step)], f"step {step}"

  def _restore_step(self, step: int, target_state: Any, data_state: bool) -> tuple[Any, Any]:
    items = {_STATE: ocp.args.StandardRestore(target_state)}
    if data_state:
      items[_DATA] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    data = (restored[_DATA] or {}).get(_DATA) if data_state else None
    return restored[_STATE], data

  def _set_aside(self, steps: Sequence[int]) -> None:
    """Moves damaged steps to `corrupt/STEP` (`STEP.1`, ... if taken); process 0 moves them.

    Called by every process with the same steps (`restore` agrees on each step's outcome);
    the barrier is reached on every process even when a move fails on process 0.
    """
    try:
      if jax.process_index() == 0:
        corrupt = os.path.join(self._directory, CORRUPT_DIR)
        os.makedirs(corrupt, exist_ok=True)
        for step in steps:
          dest, n = os.path.join(corrupt, str(step)), 0
          while os.path.exists(dest):
            n += 1
            dest = os.path.join(corrupt, f"{step}.{n}")
          os.rename(os.path.join(self._directory, str(step)), dest)
          logging.warning("Moved the unreadable checkpoint of step %d to %s (kept for "
                          "inspection; delete it when you no longer need it).", step, dest)
    finally:
      _barrier("hvae_checkpoint_set_aside")
    self._manager.reload()

  def restore(self, target_state: Any, step: int | str | None = None, *,
              data_state: bool = True) -> tuple[Any, dict | None, int]:
    """Restores a committed checkpoint, falling back past steps that cannot be read.

    Args:
      target_state: a pytree with the structure of the saved state; its leaves (concrete arrays
        or `jax.ShapeDtypeStruct`s) give the dtypes, shapes and shardings to restore into.
      step: None or "latest" for the newest checkpoint, "best" for the lowest `best_metric`, or
        an int step (no fallback: that step or an error).
      data_state: also read the data-iterator position (False: readers that need only the
        state, so a damaged `data_state/` does not stop them).

    Returns:
      (state, data_state, step): the restored pytree (structure of `target_state`), the saved
      data_state dict (or None) and the step restored.

    Raises:
      CheckpointUnavailableError (a FileNotFoundError): no checkpoint, the step does not exist
        (the message lists the available steps), or no candidate step can be restored (the
        message names each step, why, and what to do).
    """
    # A save still in flight in this process must be committed before it can be read back.
    self.wait()
    candidates, wanted = self._candidates(step)
    failed: list[tuple[int, str]] = []
    for candidate in candidates:
      reason = None
      try:
        # Concrete leaves are fine as targets: orbax reads only their shape, dtype, sharding.
        state, data = self._restore_step(candidate, target_state, data_state)
      except Exception as e:  # pylint: disable=broad-except  (any failure: try the next step)
        _quiet_closed_loop_callbacks()
        reason = _reason(e)
      # Every process takes the same decision for every step (a step counts only if it loaded
      # everywhere), so all restore the same step and all reach `_set_aside` together.
      if not _on_every_process(reason is None):
        failed.append((candidate, reason or "another process could not restore it"))
        logging.warning("Checkpoint step %d in %s cannot be restored (%s)%s", candidate,
                        self._directory, failed[-1][1],
                        "; trying the next one." if candidate != candidates[-1] else ".")
        continue
      if failed:
        if wanted == "best" and self._manager.metrics(candidate) is None:
          logging.warning("No evaluated checkpoint loads; using step %d (not evaluated).",
                          candidate)
        if self._read_only:
          logging.warning("Skipped unreadable checkpoint step(s) %s (left in place: this reader "
                          "is read-only).", ", ".join(str(s) for s, _ in failed))
        else:
          self._set_aside([s for s, _ in failed])
      logging.info("Restored checkpoint for step %d from %s.", candidate, self._directory)
      return state, data, candidate
    reasons = "; ".join(f"step {s}: {r}" for s, r in failed)
    if len(candidates) == 1 and wanted.startswith("step"):
      todo = f"choose another with --checkpoint (available steps: {self.all_steps()})"
    elif self._read_only:
      todo = ("if the model config changed since they were saved, use the run's own config "
              "(omit --config); if they are damaged, train the run again")
    else:
      todo = ("if the model config changed since they were saved, use the run's own config "
              "(omit --config) or a new --workdir; if they are damaged, move "
              f"{self._directory} aside to train again from step 0")
    raise CheckpointUnavailableError(
        f"No {wanted} checkpoint in {self._directory} can be restored ({reasons}); {todo}.")

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
