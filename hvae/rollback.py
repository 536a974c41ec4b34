"""`optim.on_repeated_skips = "rollback"`: the record of roll-backs and the learning rate they set.

When `optim.max_consecutive_skips` updates in a row are skipped, the default ("stop") writes a
checkpoint and stops. With "rollback" the training loop (hvae/loop.py) instead restores the last
checkpoint (the initial state when there is none), multiplies the learning rate by
`LR_FACTOR` and trains on, at most `MAX_ROLLBACKS` times per run; one more streak then stops as
"stop" does. This is what VDVAE users ask for when every update starts being skipped
(openai/vdvae#25): the parameters have drifted somewhere the gradients explode, and the same
data at a smaller step size usually gets past it.

Each roll-back is one entry of WORKDIR/rollbacks.json (`step` where the streak was noticed,
`restored_step`, `learning_rate` from then on, `skipped` steps). The file is what makes a
resumed run train at the lowered rate: the learning rate of a run is `optim.learning_rate` x
`LR_FACTOR` ** (number of entries). Delete the file to train at the configured rate again.
"""

from __future__ import annotations

import copy
import json
import os

from hvae import atomic

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
  """
  entries = read(workdir) + [entry]
  atomic.write_json(os.path.join(workdir, FILE), entries, indent=1)
  return entries


def lowered(config, count: int):
  """A copy of `config` whose `optim.learning_rate` is lowered by `count` roll-backs (`config`
  itself when there were none)."""
  if not count:
    return config
  config = copy.deepcopy(config)
  config.optim.learning_rate = float(config.optim.learning_rate) * LR_FACTOR ** count
  return config
