"""How long a run will take: the step time measured from the run's own first steps.

`StepTimer` logs one line near the start of every training run (hvae/loop.py), e.g.

  step time 0.51 s (31 images/s); 1000 steps ≈ 8.5 min, plus 4 evaluations

It times the run's second step (the first one compiles), from the moment the first step's
results are ready to the moment the second's are: data, dispatch and compute, as the run will
see them. No extra compile, no extra work: it waits for two steps the run makes anyway. The
evaluations are counted, not timed (clu's progress lines report their share later;
`benchmarks/train_step.py` estimates it before a run). `benchmarks/train_step.py` prints the same
figures, with a steadier median over many steps.
"""

from __future__ import annotations

import math
import time

import jax
from absl import logging


def xla_flops(stage) -> float | None:
  """XLA's cost-analysis FLOPs of a lowered or compiled jit stage (None where it has none).

  Use the lowered stage (`jax.jit(f).lower(...)`): the program as written, for the global
  batch, the same on every backend. A compiled stage counts one device's share and misses what
  the backend hands to libraries (on a GPU, cuDNN's convolutions: ~99 % of this model's FLOPs).
  """
  try:
    cost = stage.cost_analysis()
  except Exception:  # noqa: BLE001  (backends raise various "not implemented" errors)
    return None
  cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
  value = (cost or {}).get("flops")
  return float(value) if value is not None and math.isfinite(value) and value > 0 else None


def format_duration(seconds: float) -> str:
  """A duration for people: "42 s", "8.5 min", "3.2 h", "2.1 days"."""
  if not math.isfinite(seconds):
    return "unknown"
  seconds = max(seconds, 0.0)
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.1f} min"
  if seconds < 48 * 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} days"


def num_evaluations(num_steps: int, every_steps: int, start: int = 0) -> int:
  """Evaluations of steps start+1 .. num_steps: every `every_steps`-th step and the last."""
  if num_steps <= start:
    return 0
  every = max(int(every_steps), 1)
  count = num_steps // every - start // every
  return count + (1 if num_steps % every else 0)


def eta_line(step_seconds: float, batch_size: int, steps: int, evaluations: int | None = None,
             resumed: bool = False) -> str:
  """The log line: step time, images/s and the time of `steps` steps at that rate.

  Args:
    step_seconds: one step, s.
    batch_size: global images per step.
    steps: steps the run has to do.
    evaluations: evaluations among them (counted, not in the time); None: not mentioned.
    resumed: the run resumed; the steps are those to go.
  """
  rate = batch_size / step_seconds if step_seconds > 0 else float("inf")
  line = (f"step time {step_seconds:.3g} s ({rate:.3g} images/s); {steps} steps"
          f"{' to go' if resumed else ''} ≈ {format_duration(steps * step_seconds)}")
  if evaluations:
    line += f", plus {evaluations} evaluation{'s' if evaluations != 1 else ''}"
  return line


class StepTimer:
  """Times the second step of a run and logs `eta_line` once.

  The loop calls `before_step(step, previous)` at the top of each iteration (`step` steps done,
  `previous` that step's outputs) and `after_step(step, outputs)` right after a step. Both wait
  for the outputs only at the two steps measured.
  """

  def __init__(self, config, start: int):
    self.start, self.num_steps = int(start), int(config.train.num_steps)
    self.batch_size = int(config.train.batch_size)
    self.evaluations = num_evaluations(self.num_steps, config.eval.every_steps, self.start)
    self._t0: float | None = None
    self.step_seconds: float | None = None  # set once measured (the line is logged then)

  def before_step(self, step: int, previous) -> None:
    """At step start + 1 (the compiled one done): the clock starts when its outputs are ready."""
    if self.step_seconds is None and step == self.start + 1 and previous is not None:
      jax.block_until_ready(previous)
      self._t0 = time.perf_counter()

  def after_step(self, step: int, outputs) -> None:
    """At step start + 2: waits for its outputs, logs the line."""
    if self.step_seconds is not None or step != self.start + 2 or self._t0 is None:
      return
    jax.block_until_ready(outputs)
    self.step_seconds = time.perf_counter() - self._t0
    logging.info("%s", eta_line(self.step_seconds, self.batch_size, self.num_steps - self.start,
                                self.evaluations, resumed=self.start > 0))
