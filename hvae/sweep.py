"""Running a sweep: `launch.py --config=experiments/FILE.py[:ARG] --sweep` (docs/sweeps.md).

The points (their names, configs and status) come from hvae/sweep_points.py, which needs no JAX.
Running a sweep skips points that are finished (`DONE` and `eval/results.json`), resumes the
others (`hvae.loop.train_and_evaluate` resumes by itself), and ends each point with an
importance-weighted evaluation on the validation split (`hvae.modes.evaluate.run`, written to
the point's `eval/results.json`); XLA's FLOPs per train step go to the point's `flops.json`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging

from hvae import atomic
from hvae.errors import SweepPointsFailed
from hvae.sweep_points import (
  EVAL_CHECKPOINT,
  FAILED_FILE,
  FLOPS_FILE,
  canonical,
  check_same_config,
  describe,
  load_points,
  point_config,
  select,
  status,
  write_manifest,
)
from hvae.typed_config import ModelConfig

# JAX is imported inside the functions: `--sweep --dry_run` imports this module and stays instant.


def train_step_flops(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """XLA's cost-analysis FLOPs of one jitted train step on the global batch, without running it.

  The step is lowered on abstract shapes (`jax.eval_shape`: no parameters are initialised) and
  costed on the lowered HLO, i.e. the whole global batch before SPMD partitioning. If the backend
  cannot cost lowered HLO (jax 0.11's GPU backend cannot), the same step is lowered for one CPU
  device: the lowered program, and so its FLOPs, do not depend on the backend. Only if that
  fails too, the compiled step's per-device figure times the device count is used (on a GPU it
  misses cuDNN's convolutions).
  """
  import jax
  import jax.numpy as jnp

  from hvae import eta, train
  from hvae.mesh import make_mesh
  from hvae.model.ladder import HVAE

  model = HVAE(ModelConfig.from_config(config))
  tx = train.create_optimizer(config)
  key = jax.random.PRNGKey(0)
  state = jax.eval_shape(lambda r: train.create_train_state(model, tx, r), key)
  b, s = int(config.train.batch_size), int(config.data.image_size)
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
           "mask": jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32)}

  def lower(devices=None):
    return train.make_train_step(config, model, tx, make_mesh(devices)).lower(
        state, batch, jax.ShapeDtypeStruct(key.shape, key.dtype))

  lowered = lower()
  flops, source = eta.xla_flops(lowered), "lowered HLO, global batch"
  if flops is None and jax.default_backend() != "cpu":
    try:
      flops = eta.xla_flops(lower(jax.devices("cpu")[:1]))
      source = "lowered HLO for the CPU, global batch"
    except RuntimeError:  # no CPU backend in this process
      flops = None
  if flops is None:
    flops, source = eta.xla_flops(lowered.compile()), "compiled HLO, per device x devices"
    flops = None if flops is None else flops * jax.device_count()
  return {"flops_per_step": flops, "source": source, "batch_size": b,
          "devices": jax.device_count(), "backend": jax.default_backend()}


def run_point(config: ml_collections.ConfigDict, point_dir: str) -> bool:
  """Trains (or resumes) one point, then its IW evaluation. Returns False if training stopped
  early (preemption: the caller should stop too)."""
  import jax

  from hvae import loop
  from hvae.modes import evaluate

  flops_path = os.path.join(point_dir, FLOPS_FILE)
  if not os.path.exists(flops_path):
    try:
      flops = train_step_flops(config)
    except Exception as e:  # noqa: BLE001  (a figure for the table: never worth losing the run)
      logging.warning("%s: no FLOPs per step (%s: %s)", point_dir, type(e).__name__, e)
      flops = {"flops_per_step": None, "source": f"failed: {type(e).__name__}: {e}"}
    if jax.process_index() == 0:
      os.makedirs(point_dir, exist_ok=True)
      atomic.write_json(flops_path, flops, default=list)
    logging.info("%s: %.3g FLOPs per train step (%s)", point_dir,
                 flops["flops_per_step"] or math.nan, flops["source"])
  if not os.path.exists(os.path.join(point_dir, "DONE")):
    loop.train_and_evaluate(config, point_dir)
    if not os.path.exists(os.path.join(point_dir, "DONE")):
      return False
  evaluate.run(point_dir, config, checkpoint=EVAL_CHECKPOINT, split="validation")
  return True


def main(experiment: str, config: ml_collections.ConfigDict, workdir: str, *,
         index: int | None = None, dry_run: bool = False,
         setup: Callable[[], None] | None = None) -> str | None:
  """What `launch.py --sweep` does.

  Args:
    experiment: the `--config=` value, `experiments/FILE.py[:ARG]`.
    config: `get_config(ARG)` with the command line's `--config.a.b=` flags applied.
    workdir: the sweep's directory; point `name` runs in WORKDIR/name.
    index: run only this point (`--sweep_index`), else all of them, one after another.
    dry_run: only describe the points.
    setup: called once before the first JAX computation (launch.py's cache and multi-host setup).

  Returns:
    The dry run's text (None when points were run).

  Raises:
    SweepError: a bad index.
    SweepPointsFailed: points that failed while training (the others still ran).
    ConfigError: a point's overrides do not fit the config (checked for every chosen point
      before anything runs).
  """
  points = load_points(experiment)
  chosen = select(points, index)
  configs = {p.index: point_config(config, p) for p in chosen}
  if dry_run:
    return describe(experiment, chosen, workdir)
  if setup is not None:
    setup()
  import jax

  from hvae import loop

  if jax.process_index() == 0:
    write_manifest(workdir, experiment, points)
  failed = []
  for p in chosen:
    point_dir = os.path.join(workdir, p.name)
    state = status(point_dir)
    if state == "done":
      logging.info("sweep point %d [0..%d] %s: done, skipped", p.index, len(points) - 1, p.name)
      continue
    check_same_config(point_dir, configs[p.index])
    logging.info("sweep point %d [0..%d] %s (%s): %s", p.index, len(points) - 1, p.name, state,
                 canonical(p.overrides))
    if state == "failed" and jax.process_index() == 0:
      os.remove(os.path.join(point_dir, FAILED_FILE))  # try again
    try:
      finished = run_point(configs[p.index], point_dir)
    except loop.TrainingError as e:  # one diverging point must not stop the others
      logging.error("sweep point %d %s failed: %s", p.index, p.name, e)
      if jax.process_index() == 0:
        with open(os.path.join(point_dir, FAILED_FILE), "w", encoding="utf-8") as f:
          f.write(f"{e}\n")
      failed.append(p)
      continue
    if not finished:
      logging.warning("Sweep stopped at point %d (%s); run the same command to resume.",
                      p.index, p.name)
      return None
  if failed:
    raise SweepPointsFailed("sweep points failed: "
                            + ", ".join(f"{p.index} ({p.name})" for p in failed)
                            + f"; see their {FAILED_FILE} files")
  logging.info("Sweep done: %s (python launch.py --mode=report --workdir=%s)", workdir, workdir)
  return None
