"""Orbax checkpoints of the training state and the data-iterator position (WORKDIR/checkpoints).

One `Checkpointer` owns an orbax `CheckpointManager` with two items per step:

* `state`: any pytree of arrays (the flax `TrainState`), saved with `StandardSave`;
* `data_state`: a JSON object `{"data_state": <dict or null>}` with the input pipeline's position,
  so resuming continues the data stream where the crashed run left it.

Retention (DESIGN §7 "Workdir"): the latest `keep` checkpoints *and* the best one by
`best_metric` (lower is better) survive, through orbax's
`AnyPreservationPolicy([LatestN(keep), BestN(n=1)])`. Checkpoints saved without metrics count
towards the latest ones only; they can never push the best one out.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
only after every file (and `commit_success.txt`) is written. Step discovery ignores the tmp names,
so a process killed mid-save leaves the previous checkpoint as the latest usable one; the leftover
tmp directory is deleted when the next `Checkpointer` opens the directory
(`cleanup_tmp_directories`). This protects against a killed *process*; it does not fsync, so it
makes no promise about a machine losing power mid-write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_STATE = "state"
_DATA = "data_state"


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


def _metric_value(metrics: Mapping[str, Any], name: str) -> float:
  """The ranking value of one checkpoint's metrics; NaN ranks as the worst (+inf)."""
  value = float(metrics[name])
  # A diverged evaluation (NaN) must never be chosen as the best checkpoint.
  return value if not math.isnan(value) else math.inf


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
    )
    self._manager = ocp.CheckpointManager(self._directory, item_names=(_STATE, _DATA),
                                          options=options)

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
    saved = self._manager.save(step, args=args, metrics=metrics, force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s.", step, self._directory)
    return bool(saved)

  def wait(self) -> None:
    """Blocks until every started save is committed (call before exiting or reading back)."""
    self._manager.wait_until_finished()

  def _resolve(self, step: int | str | None) -> int:
    """Maps None/"latest"/"best"/int to an existing committed step, or raises a clear error."""
    available = self.all_steps()
    if step is None or step == "latest":
      resolved = self.latest_step()
      if resolved is None:
        raise FileNotFoundError(f"No checkpoints in {self._directory}.")
      return resolved
    if step == "best":
      resolved = self.best_step()
      if resolved is None:
        raise FileNotFoundError(
            f"No checkpoint in {self._directory} has metric {self._best_metric!r}; "
            f"available steps: {available}.")
      return resolved
    if isinstance(step, str):
      if not step.isdigit():
        raise ValueError(f"step must be an int, 'latest' or 'best'; got {step!r}.")
      step = int(step)
    if step not in available:
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self._directory}; available steps: {available}.")
    return int(step)

  def restore(self, target_state: Any, step: int | str | None = None
              ) -> tuple[Any, dict | None, int]:
    """Restores a committed checkpoint.

    Args:
      target_state: a pytree with the structure of the saved state; its leaves (concrete arrays
        or `jax.ShapeDtypeStruct`s) give the dtypes, shapes and shardings to restore into.
      step: None or "latest" for the newest checkpoint, "best" for the lowest `best_metric`, or
        an int step.

    Returns:
      (state, data_state, step): the restored pytree (structure of `target_state`), the saved
      data_state dict (or None) and the step restored.

    Raises:
      FileNotFoundError: the step does not exist (the message lists the available steps).
    """
    # A save still in flight in this process must be committed before it can be read back.
    self.wait()
    resolved = self._resolve(step)
    # Concrete leaves are fine as targets: orbax reads only their shape, dtype and sharding.
    restored = self._manager.restore(resolved, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target_state),
        _DATA: ocp.args.JsonRestore(),
    }))
    data_state = (restored[_DATA] or {}).get(_DATA)
    logging.info("Restored checkpoint for step %d from %s.", resolved, self._directory)
    return restored[_STATE], data_state, resolved

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
