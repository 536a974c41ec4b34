"""The evaluations of a training run (hvae/loop.py): at which steps, the `Evaluator` of
`config.eval`, one evaluation with its images, and the one a stop request dropped.

An evaluation runs every `eval.every_steps` steps and at the last step. A stop request (SIGTERM,
SIGINT) honoured during one drops it: nothing of it is logged or drawn, the step is checkpointed
without metrics, and the resumed run evaluates that step first (`dropped_evaluation`), merging
the result into the step's row of training metrics.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from hvae import data, evaluation, grids, preemption
from hvae.console import eval_summary
from hvae.model.ladder import HVAE
from hvae.writers import MetricWriter, writing


def is_eval_step(config, step: int) -> bool:
  return step % config.eval.every_steps == 0 or step == config.train.num_steps


def dropped_evaluation(config, start: int, rows: list[dict]) -> dict | None:
  """The row to complete when the evaluation of the restored step `start` was dropped (a stop
  request interrupted it): that step's training metrics, if logged ({} if not); else None."""
  if start == 0 or not is_eval_step(config, start):
    return None
  here = [r for r in rows if r["step"] == start]
  if any("eval/bpd" in r for r in here):
    return None
  return {k: v for r in here for k, v in r.items() if k != "step"}


def evaluate(evaluator: evaluation.Evaluator, workdir: str, writer: MetricWriter, state,
             step: int, row: dict, interrupt, writes: preemption.HeldWrites) -> dict | None:
  """The evaluation of `step`: its images written (process 0; a failed write is held in
  `writes`), its metrics added to `row` and returned.

  Returns None, recording nothing, when a stop request interrupts it (between batches).
  """
  try:
    eval_metrics, eval_images = evaluator(state.ema_params, step, interrupt=interrupt)
  except preemption.Interrupted:
    logging.warning("Stop requested during the evaluation of step %d: it is dropped (not "
                    "logged); the next run evaluates step %d first.", step, step)
    return None
  if jax.process_index() == 0:
    with writes.held():
      _write_images(workdir, writer, step, eval_images)
  row.update(eval_metrics)
  # A short line; every metric goes to metrics.jsonl and TensorBoard.
  logging.info("%s", eval_summary(step, eval_metrics, evaluator.flagged,
                                  eval_metrics["eval/wall_time"]))
  return eval_metrics


def make_evaluator(config, model: HVAE, mesh, rng, grid_rng, history) -> evaluation.Evaluator:
  """The evaluation of `config.eval`: held-out and training-split examples, the fill-in grid."""
  e = config.eval
  eval_sets = {"eval": data.eval_batches(config, "validation", e.num_examples, e.batch_size),
               "eval_train": data.eval_batches(config, "train", e.num_examples, e.batch_size)}
  # The same grid examples on every host (process_count=1): the grid's jitted calls see
  # identical inputs everywhere, and process 0 writes the picture.
  grid_batch = data.eval_batches(config, "validation", e.num_grid_examples,
                                 e.num_grid_examples, process_index=0, process_count=1)[0]
  return evaluation.Evaluator(config, model, mesh, eval_sets, grid_batch, rng=rng,
                              grid_rng=grid_rng, history=history)


def _write_images(workdir: str, writer: MetricWriter, step: int, pictures: dict) -> None:
  """WORKDIR/images/*.png of one evaluation; the fill-in grid also to TensorBoard."""
  for name, picture in pictures.items():
    path = os.path.join(workdir, "images", evaluation.image_filename(name, step))
    with writing(path):
      grids.save_png(path, picture)
  writer.write_images(step, {evaluation.FILL_INS: pictures[evaluation.FILL_INS]})
