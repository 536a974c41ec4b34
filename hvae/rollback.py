"""`optim.on_repeated_skips`: what a run does when updates keep being skipped, and the record of
roll-backs and the learning rate they set.

When `optim.max_consecutive_skips` updates in a row are skipped (the training loop, hvae/loop.py,
notices it), the default ("stop", `stop_after_skips`) writes a checkpoint and stops with one
line. With "rollback" (`roll_back`) the run instead restores the last
checkpoint (the initial state when there is none), multiplies the learning rate by
`LR_FACTOR` and trains on, at most `MAX_ROLLBACKS` times per run; one more streak then stops as
"stop" does. This is what VDVAE users ask for when every update starts being skipped
(openai/vdvae#25): the parameters have drifted somewhere the gradients explode, and the same
data at a smaller step size usually gets past it.

Each roll-back is one entry of WORKDIR/rollbacks.json (`step` where the streak was noticed,
`restored_step`, `learning_rate` from then on, `skipped` steps). The file is what makes a
resumed run train at the lowered rate: the learning rate of a run is `optim.learning_rate` x
`LR_FACTOR` ** (number of entries). Delete the file to train at the configured rate again. A
full disk while writing it stops the run with `FileWriteError` (one line; the old file stays).
"""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING

import jax
from absl import logging

from hvae import atomic
from hvae.errors import TrainingError
from hvae.writers import writing

if TYPE_CHECKING:
  from hvae.checkpoint import Checkpointer
  from hvae.preemption import HeldWrites
  from hvae.writers import MetricWriter

MODES = ("stop", "rollback")
LR_FACTOR = 0.5  # the learning rate is multiplied by this at each roll-back
MAX_ROLLBACKS = 3  # per run (WORKDIR); a streak after the last one stops the run
FILE = "rollbacks.json"


def mode(config) -> str:
  """`optim.on_repeated_skips` ("stop" for configs written before it existed)."""
  return config.optim.get("on_repeated_skips", "stop")


def read(workdir: str) -> list[dict]:
  """The roll-backs recorded in `workdir` so far, oldest first ([] when none)."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def record(workdir: str, entry: dict) -> list[dict]:
  """Appends one roll-back to WORKDIR/rollbacks.json (atomically; call on process 0 only).

  Returns:
    Every roll-back recorded, this one last.

  Raises:
    FileWriteError: the file could not be written (a full disk); it is left as it was.
  """
  entries = read(workdir) + [entry]
  path = os.path.join(workdir, FILE)
  with writing(path):
    atomic.write_json(path, entries, indent=1)
  return entries


def lowered(config, count: int):
  """A copy of `config` whose `optim.learning_rate` is lowered by `count` roll-backs (`config`
  itself when there were none)."""
  if not count:
    return config
  config = copy.deepcopy(config)
  config.optim.learning_rate = float(config.optim.learning_rate) * LR_FACTOR ** count
  return config


def streak(step: int, last: dict, before: dict | None) -> tuple[int, dict]:
  """(the step the streak of skipped updates ends at, that step's metrics): `step`, or (read one
  step late) the one before it."""
  if last["consecutive_skips"] >= 1 or before is None:
    return step, last
  return step - 1, before


def _streak_text(config, streak: tuple[int, dict]) -> str:
  end, info = streak
  count = int(info["consecutive_skips"])
  o = config.optim
  return (f"{count} updates in a row were skipped (steps {end - count + 1}-{end}, "
          f"optim.max_consecutive_skips = {o.max_consecutive_skips}; at step {end} the gradient "
          f"norm was {float(info['grad_norm']):.4g} and the loss {float(info['loss']):.4g}, "
          f"optim.skip_threshold = {o.skip_threshold})")


def roll_back(config, workdir: str, ckpt: Checkpointer, state, train_iter, step: int,
              streak: tuple[int, dict], rollbacks: list[dict], initial, writes: HeldWrites):
  """Restores the newest checkpoint (`initial()`'s state and data position when there is none)
  and records the roll-back (process 0; its failure reaches every process through `writes`).

  Returns:
    (the restored state, not yet placed; its step; every roll-back so far, this one last).
  """
  with writes.held():
    ckpt.wait()  # a save that failed (on any process) stops every process here, not in restore
  writes.agree()
  if ckpt.latest_step() is None:
    restored, data_state = initial()
    restored_step = 0
  else:
    restored, data_state, restored_step = ckpt.restore(state)
  if data_state is not None:
    train_iter.set_state(data_state)
  learning_rate = lowered(config, len(rollbacks) + 1).optim.learning_rate
  entry = {"step": step, "restored_step": restored_step, "learning_rate": learning_rate,
           "skipped": int(streak[1]["consecutive_skips"])}
  if jax.process_index() == 0:
    with writes.held():
      record(workdir, entry)
  writes.agree()
  logging.warning("%s: rolled back to step %d and lowered the learning rate to %g (roll-back %d "
                  "of %d, optim.on_repeated_skips = rollback; recorded in %s).",
                  _streak_text(config, streak), restored_step, learning_rate,
                  len(rollbacks) + 1, MAX_ROLLBACKS, os.path.join(workdir, FILE))
  return restored, restored_step, rollbacks + [entry]


def stop_after_skips(config, ckpt: Checkpointer, writer: MetricWriter, step: int, state,
                     data_state, streak: tuple[int, dict], rollbacks: list[dict],
                     writes: HeldWrites) -> None:
  """Checkpoints the state (skipped updates leave it at the last good one) and raises."""
  with writes.held():  # a failed save (on any process) is agreed with the writes below
    ckpt.save(step, state, data_state=data_state, force=True)
    ckpt.wait()
  with writes.held():
    writer.close()
  writes.agree()
  o = config.optim
  tried, other = "", ", or set optim.on_repeated_skips = rollback"
  if rollbacks:
    tried = (f" It had rolled back {len(rollbacks)} time(s) already (optim.on_repeated_skips = "
             f"rollback; the learning rate is now {rollbacks[-1]['learning_rate']:g}).")
    other = ""
  raise TrainingError(
      f"{_streak_text(config, streak)}: stopped at step {step} with a checkpoint of the last "
      f"good state (skipped updates change no parameter).{tried} Try a lower "
      f"optim.learning_rate (now {o.learning_rate}), or raise optim.skip_threshold / "
      f"optim.grad_clip (now {o.grad_clip}){other}, then run the same command to resume.")
