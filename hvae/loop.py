"""`train_and_evaluate(config, workdir)`: the training run behind `launch.py --mode=train`.

Why one file past ~350 lines: the step loop's order of writes, checkpoint saves, agreements
between processes and stop checks is one protocol (docs/reliability.md); its parts that stand
alone already live elsewhere (hvae/loop_eval.py, hvae/rollback.py, hvae/preemption.py).

Resumes by default: params, optimiser, EMA, step, RNG (derived from the step) and the data
iterator position all come back from the latest checkpoint that loads (a damaged newer one is
moved to checkpoints/corrupt/, see hvae/checkpoint.py). Metrics are fetched from the devices
only at logging and evaluation steps (and one scalar a step, below); SIGTERM / SIGINT save a
checkpoint and exit cleanly, also during an evaluation (dropped between two jitted calls and
done first by the resumed run; hvae/preemption.py, hvae/loop_eval.py). One training at a time
holds the workdir (hvae/lock.py). A file of the run that cannot be written (a full disk) ends it
with `FileWriteError`, one line naming the file and the newest checkpoint; with several
processes only process 0 writes, and its failure reaches every process at the agreement right
after the writes (`preemption.HeldWrites`), so none waits in a collective. A checkpoint that
cannot be written (`CheckpointWriteError`, on any process) is agreed the same way, at the next
step that logs a row or saves a checkpoint.

Repeated skipped updates: every step's count of skipped updates in a row is read one step late
(after the next step is dispatched; its copy to the host starts as soon as its step is), so the
check runs at every step without making the host wait for the step it has just dispatched. At
`optim.max_consecutive_skips` the run checkpoints and stops with `TrainingError`, or rolls back
(`optim.on_repeated_skips`, hvae/rollback.py).
"""

from __future__ import annotations

import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hvae import (
  atomic,
  config_file,
  data,
  eta,
  loop_eval,
  metric_names,
  preemption,
  rollback,
  run_info,
  sampling,
)
from hvae import lock as workdir_lock
from hvae.checkpoint import Checkpointer
from hvae.errors import (
  ConfigError,
  FileWriteError,
  TrainingError,  # noqa: F401  (re-exported: hvae.loop.TrainingError)
)
from hvae.mesh import make_mesh, replicate, shard_batch
from hvae.metrics_file import read_metrics
from hvae.model.ladder import HVAE
from hvae.train import create_optimizer, create_train_state, make_train_step
from hvae.typed_config import LossConfig, ModelConfig, per_level
from hvae.writers import MetricWriter, periodic_actions, writing


def validate(config) -> tuple[ModelConfig, LossConfig]:
  """Checks every field the run depends on, before anything is compiled."""
  model_cfg = ModelConfig.from_config(config)
  loss_cfg = LossConfig.from_config(config)  # checks every loss.* and per-level regularize.* key
  if config.data.train_mask != "centre" and model_cfg.has_latents and \
      not model_cfg.posterior_sees_mask:
    raise ConfigError("model.posterior_sees_mask: must be True when data.train_mask is "
                      f"{config.data.train_mask!r} (the posterior cannot see the hole otherwise)")
  create_optimizer(config)
  if rollback.mode(config) not in rollback.MODES:
    raise ConfigError(f"optim.on_repeated_skips: {rollback.mode(config)!r} is not one of "
                      f"{', '.join(rollback.MODES)}")
  schedule_steps = config.optim.get("schedule_steps", 0)
  if config.optim.schedule == "cosine" and 0 < schedule_steps < config.train.num_steps:
    logging.warning("optim.schedule_steps = %d < train.num_steps = %d: the learning rate is 0 "
                    "from step %d on.", schedule_steps, config.train.num_steps, schedule_steps)
  for name in ("num_steps", "batch_size", "log_every_steps", "checkpoint_every_steps"):
    if config.train[name] <= 0:
      raise ConfigError(f"train.{name}: must be > 0, got {config.train[name]}")
  if config.train.batch_size % jax.device_count():
    raise ConfigError(f"train.batch_size: {config.train.batch_size} is not divisible by the "
                      f"{jax.device_count()} devices")
  _validate_fill_ins(config, model_cfg.num_levels)
  return model_cfg, loss_cfg


def _validate_fill_ins(config, num_levels: int) -> None:
  """eval.temperature and eval.pixels, used first at the first evaluation: checked now.

  Raises:
    ConfigError: a temperature that is not one or `num_levels` non-negative numbers, or pixels
      that `sampling.parse_pixels` refuses.
  """
  e = config.eval
  try:
    tau = sampling.default_temperature(config)
  except (TypeError, ValueError):
    raise ConfigError(f"eval.temperature: {e.get('temperature')!r} is not a number or a "
                      "comma-separated list of non-negative numbers") from None
  taus = per_level("eval.temperature", tau, num_levels)
  if any(t < 0 for t in taus):
    raise ConfigError(f"eval.temperature: {e.get('temperature')!r} has a negative value")
  try:
    sampling.default_pixels(config)
  except ValueError as err:  # sampling.parse_pixels names the value and the choices
    raise ConfigError(f"eval.{err} (or '' for the default)") from None


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  """One device->host transfer for a whole logging window."""
  stacked = jax.device_get({k: jnp.stack([h[k] for h in history]) for k in history[0]})
  out = metric_names.prefixed("train", {k: float(np.mean(v)) for k, v in stacked.items()
                                        if k not in ("skipped", "consecutive_skips")})
  out["train/skipped"] = float(np.sum(stacked["skipped"]))
  out["train/max_consecutive_skips"] = float(np.max(stacked["consecutive_skips"]))
  return out


def train_and_evaluate(config, workdir: str, *, profile: bool = False) -> None:
  """Trains (or resumes) the run in `workdir` to `config.train.num_steps`.

  With `profile`, process 0 also writes a profiler trace of a few steps to the workdir
  (`launch.py --profile`; `hvae.writers.periodic_actions`).

  Raises:
    WorkdirLockedError: another live training holds `workdir` (before anything is written).
    TrainingError: `optim.max_consecutive_skips` updates in a row were skipped (after writing a
      checkpoint of the last good state).
    FileWriteError: one of the run's files (the lock included) could not be written.
  """
  model_cfg, loss_cfg = validate(config)
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    with workdir_lock.hold_job(workdir):
      _train(config, workdir, model_cfg, loss_cfg, profile=profile)
  finally:
    if created and not os.listdir(workdir):
      os.rmdir(workdir)  # failed before writing anything (e.g. missing data): leave no trace


def _train(config, workdir: str, model_cfg: ModelConfig, loss_cfg: LossConfig, *,
           profile: bool = False) -> None:
  """`train_and_evaluate` once the workdir is locked.

  Raises:
    FileWriteError: one of the run's files could not be written (a full disk); the checkpoint
      saves in flight are finished first, and the message names the newest one.
  """
  train_iter = data.create_train_iterator(config)  # missing data fails here, before any state
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
  try:
    _run(config, workdir, model_cfg, loss_cfg, train_iter, ckpt, profile=profile)
  except FileWriteError as e:
    raise _with_newest_checkpoint(e, ckpt) from e


def _with_newest_checkpoint(error: FileWriteError, ckpt: Checkpointer) -> FileWriteError:
  """`error`'s message and what a rerun resumes from, once the saves in flight are committed
  (`CheckpointWriteError` if one of them cannot be: that message names the intact step). A
  failed `DONE` (`training_finished`, set by `_finish`) comes after the last checkpoint: the
  rerun only writes `DONE`."""
  ckpt.wait()
  steps = ckpt.all_steps()
  what = "free some space" if getattr(error, "no_space", True) else "fix that"
  if getattr(error, "training_finished", False) and steps:
    then = (f"the training finished and its checkpoints are intact (the last is step "
            f"{max(steps)}): {what} and run the same command to write DONE; nothing is trained "
            "again")
  elif steps:
    then = (f"the newest checkpoint (step {max(steps)}) is intact: {what} and run the same "
            "command to resume from it")
  else:
    then = f"no checkpoint was written yet: {what} and run the same command again"
  text = str(error)
  joined = f"{text} {then[0].upper()}{then[1:]}" if text.endswith("?") else f"{text}; {then}"
  return FileWriteError(joined + ".")


def _run(config, workdir: str, model_cfg: ModelConfig, loss_cfg: LossConfig, train_iter,
         ckpt: Checkpointer, *, profile: bool = False) -> None:
  """`_train` once the data and the checkpoint directory are open. Process 0's writes and the
  checkpoint saves are `writes.held()`; every process calls `writes.agree()` after them, before
  any other collective (a save's failure: before the next save)."""
  writes = preemption.HeldWrites()
  if jax.process_index() == 0:
    with writes.held():
      path = os.path.join(workdir, "config.json")
      with writing(path):
        config_file.save_config(config, path)
      run_info.write(workdir)
  writes.agree()

  model = HVAE(model_cfg)
  rollbacks = rollback.read(workdir)  # earlier roll-backs lowered the learning rate for good
  run_config = rollback.lowered(config, len(rollbacks))
  if rollbacks:
    logging.warning("optim.learning_rate is %g after %d roll-back(s) (%s).",
                    run_config.optim.learning_rate, len(rollbacks),
                    os.path.join(workdir, rollback.FILE))
  tx = create_optimizer(run_config)
  mesh = make_mesh()
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng, eval_rng, grid_rng = jax.random.split(rng, 4)
  state = replicate(create_train_state(model, tx, init_rng), mesh)
  start, first_data = 0, train_iter.get_state()  # a roll-back with no checkpoint goes back here
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(state)
    state = replicate(state, mesh)
    if data_state is not None:
      train_iter.set_state(data_state)
    logging.info("Resumed from step %d.", start)
  num_steps = config.train.num_steps
  rows = [r for r in read_metrics(workdir) if r["step"] <= start]  # before the writer drops any
  # An evaluation that a stop request interrupted was dropped: it is done first now, and its row
  # replaces the step's row of training metrics (merged into it).
  redo = loop_eval.dropped_evaluation(config, start, rows)
  with writes.held():
    writer = MetricWriter(workdir, resume_step=start, replace_step=start if redo else None)
    done_path = os.path.join(workdir, "DONE")
    if start < num_steps and os.path.exists(done_path) and jax.process_index() == 0:
      with writing(done_path):
        os.remove(done_path)  # train.num_steps was raised: the run is not done any more
  writes.agree()
  if start >= num_steps and redo is None:
    logging.info("Nothing to do: step %d >= train.num_steps = %d.", start, num_steps)
    _finish(workdir, writes)
    return

  with writes.held():
    writer.write_hparams(config.to_dict())  # TensorBoard's hparams tab (process 0 writes)
  writes.agree()
  # Progress (steps/s, % done, ETA, the evaluations' share of the time) and the optional trace.
  primary = jax.process_index() == 0
  actions = periodic_actions(num_steps, config.train.log_every_steps, start,
                             profile_dir=workdir if profile and primary else None, primary=primary)
  progress = actions[0]
  p_train_step = make_train_step(run_config, model, tx, mesh, loss_cfg)
  evaluator = loop_eval.make_evaluator(config, model, mesh, eval_rng, grid_rng, history=rows)
  train_rng = replicate(train_rng, mesh)

  history, window_start, t_start = [], time.perf_counter(), time.perf_counter()
  step_timer = eta.StepTimer(config, start)  # logs the step time and the ETA at step start + 2
  max_skips = config.optim.max_consecutive_skips
  previous = None  # the last step's metrics: its skip count is read one step late
  with preemption.StopRequest("saving a checkpoint and stopping") as stop_request:
    interrupt = stop_request.agreed
    if redo is not None:
      logging.info("Evaluating step %d first: its evaluation was interrupted.", start)
      if loop_eval.evaluate(evaluator, workdir, writer, state, start, redo, interrupt,
                            writes) is None:
        _close(writer, writes)
        return
      with writes.held():
        writer.write_scalars(start, redo)
      writes.agree()
    step = start
    while step < num_steps:
      step_timer.before_step(step, previous)
      batch = shard_batch(next(train_iter), mesh)
      state, metrics = p_train_step(state, batch, train_rng)
      # Started now, so the next step's lagged read below finds the count already on the host.
      metrics["consecutive_skips"].copy_to_host_async()
      history.append(metrics)
      step += 1
      step_timer.after_step(step, metrics)
      for action in actions:
        action(step)
      # The previous step's count is computed by now (or about to be): reading it keeps one step
      # in flight, where reading this step's would wait for it (module docstring).
      lagged, previous = previous, metrics
      too_many = lagged is not None and float(lagged["consecutive_skips"]) >= max_skips
      is_last = step == num_steps
      stop = _stop_requested(stop_request)
      row = {}  # everything logged at this step: one metrics.jsonl row (docs/design.md §7)
      if step % config.train.log_every_steps == 0 or is_last or stop or too_many:
        scalars = _mean_metrics(history)
        now = time.perf_counter()
        rate = len(history) / max(now - window_start, 1e-9)
        scalars.update({"train/steps_per_sec": rate, "train/wall_time": now - t_start})
        row.update(scalars)
        logging.info("step %d/%d  loss %.4f  bpd %.4f  %.0f img/s", step, num_steps,
                     scalars["train/loss"], scalars["train/bpd"], rate * config.train.batch_size)
        if too_many or scalars["train/max_consecutive_skips"] >= max_skips:
          with writes.held():
            writer.write_scalars(step, row)
          writes.agree()
          streak = rollback.streak(step, jax.device_get(metrics),
                                   None if lagged is None else jax.device_get(lagged))
          if rollback.mode(config) == "rollback" and len(rollbacks) < rollback.MAX_ROLLBACKS:
            state, step, rollbacks = rollback.roll_back(
                config, workdir, ckpt, state, train_iter, step, streak, rollbacks,
                initial=lambda tx=tx: (create_train_state(model, tx, init_rng), first_data),
                writes=writes)
            run_config = rollback.lowered(config, len(rollbacks))
            tx = create_optimizer(run_config)
            p_train_step = make_train_step(run_config, model, tx, mesh, loss_cfg)
            state = replicate(state, mesh)
            with writes.held():
              writer.close()  # the rows after the restored step go (trained again, differently)
              writer = MetricWriter(workdir, resume_step=step)
            writes.agree()
            evaluator.history = [r for r in evaluator.history if r["step"] <= step]
            actions = periodic_actions(num_steps, config.train.log_every_steps, step,
                                       primary=primary)
            progress, previous = actions[0], None
            history, window_start = [], time.perf_counter()
            continue
          rollback.stop_after_skips(config, ckpt, writer, step, state, train_iter.get_state(),
                                    streak, rollbacks, writes)
        history, window_start = [], time.perf_counter()
      eval_metrics = None
      if loop_eval.is_eval_step(config, step):
        with progress.timed("eval", wait_jax_async_dispatch=False):
          eval_metrics = loop_eval.evaluate(evaluator, workdir, writer, state, step, row,
                                            interrupt, writes)
        stop = stop or eval_metrics is None  # interrupted: checkpoint and stop, below
      save_due = (step % config.train.checkpoint_every_steps == 0 or is_last
                  or eval_metrics is not None)
      if row:
        with writes.held():
          writer.write_scalars(step, row)
      if row or save_due:  # steps that sync anyway: a row is fetched, or a checkpoint saved
        stop = _agreed(stop_request, writes) or stop
      if save_due or stop:
        with writes.held():  # a save that failed before (on any process) fails here
          ckpt.save(step, state, data_state=train_iter.get_state(), metrics=eval_metrics,
                    force=is_last or stop)
      if stop:
        with writes.held():
          ckpt.wait()
        _close(writer, writes, flush_only=True)
        logging.warning("Stopped at step %d on request; run the same command to resume.", step)
        return
  with writes.held():
    ckpt.wait()
  _close(writer, writes)
  _finish(workdir, writes)


def _stop_requested(request: preemption.StopRequest) -> bool:
  """Whether to checkpoint and stop now, before the step is logged: with several processes
  False, as they must agree (a save is collective), which they do after the step's row."""
  return request.requested if jax.process_count() == 1 else False


def _agreed(request: preemption.StopRequest, writes: preemption.HeldWrites) -> bool:
  """After the writes of a step's row, before its checkpoint. With several processes one
  collective: whether any asks to stop, or a failed write (process 0's, or a checkpoint save on
  any process) raised everywhere. With one process False (its flag was read by
  `_stop_requested`; a failed write was raised at once)."""
  return writes.agree(request if jax.process_count() > 1 else None)


def _close(writer: MetricWriter, writes: preemption.HeldWrites, *, flush_only: bool = False):
  """Flushes (or closes) the writer: its last events reach the disk, or every process raises."""
  with writes.held():
    writer.flush() if flush_only else writer.close()
  writes.agree()


def _finish(workdir: str, writes: preemption.HeldWrites) -> None:
  """WORKDIR/DONE (atomic: a failed write leaves no file), after the last checkpoint is
  committed; its failure is a `FileWriteError` marked `training_finished`."""
  try:
    if jax.process_index() == 0:
      with writes.held():
        path = os.path.join(workdir, "DONE")
        with writing(path):
          atomic.write_text(path, datetime.datetime.now(datetime.UTC).isoformat() + "\n")
    writes.agree()
  except FileWriteError as e:
    e.training_finished = True  # `_with_newest_checkpoint`: the rerun only writes DONE
    raise
  logging.info("Done: %s", workdir)
