"""`train_and_evaluate(config, workdir)`: the training run behind `launch.py --mode=train`.

Why one file past ~350 lines: the loop and what it must do between two steps (skip
counting, preemption, the lock and its agreement across processes, the dropped-evaluation
redo) share its state; each helper is a module-level function a test can call.

Resumes by default: params, optimiser, EMA, step, RNG (derived from the step) and the data
iterator position all come back from the latest checkpoint that loads (a damaged newer one is
moved to checkpoints/corrupt/, see hvae/checkpoint.py). Metrics are fetched from the devices
only at logging and evaluation steps (and one scalar a step, below); SIGTERM / SIGINT save a
checkpoint and exit cleanly, also during an evaluation (it stops between two jitted calls, a
batch or a refinement step, and is dropped; the resumed run evaluates that step first;
hvae/preemption.py). One training at a time holds the workdir (hvae/lock.py). A file of the run
that cannot be written (a full disk) ends it with `FileWriteError`, one line naming the file and
the newest checkpoint.

Repeated skipped updates: every step's count of skipped updates in a row is read one step late
(after the next step is dispatched, when it is computed or about to be; its copy to the host
starts as soon as its step is dispatched), so the check runs at every step without making the
host wait for the step it has just dispatched. At
`optim.max_consecutive_skips` the run writes a checkpoint (skipped updates change no parameter,
so it holds the last good state) and stops with `TrainingError` (one line, exit 2 in launch.py),
or, with `optim.on_repeated_skips = "rollback"`, restores the last checkpoint and trains on at a
lower learning rate (hvae/rollback.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from hvae import (
  atomic,
  config_file,
  data,
  eta,
  evaluation,
  grids,
  metric_names,
  preemption,
  rollback,
  sampling,
)
from hvae import lock as workdir_lock
from hvae.checkpoint import Checkpointer
from hvae.errors import (  # TrainingError: re-exported
  ConfigError,
  FileWriteError,
  TrainingError,
  WorkdirLockedError,
)
from hvae.mesh import make_mesh, replicate, shard_batch
from hvae.metrics_file import read_metrics
from hvae.model.ladder import HVAE
from hvae.train import create_optimizer, create_train_state, make_train_step
from hvae.typed_config import LossConfig, ModelConfig, per_level
from hvae.writers import MetricWriter, eval_summary, periodic_actions, writing

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain",
             "ml-collections", "clu", "numpy")


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


def _git(*args: str) -> str | None:
  try:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                          cwd=os.path.dirname(__file__))
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() if proc.returncode == 0 else None


def _git_commit() -> tuple[str | None, bool | None]:
  """(HEAD, whether tracked files differ from it): a run from an uncommitted tree says so."""
  commit = _git("rev-parse", "HEAD") or None
  status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
  return commit, (bool(status) if status is not None else None)


def _write_run_info(workdir: str) -> None:
  versions = {}
  for p in _PACKAGES:
    try:
      versions[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      versions[p] = None
  commit, dirty = _git_commit()
  info = {"command": sys.argv, "git_commit": commit, "git_dirty": dirty,
          "python": platform.python_version(),
          "packages": versions, "devices": [str(d) for d in jax.devices()],
          "process_count": jax.process_count(),
          "start_time": datetime.datetime.now(datetime.UTC).isoformat()}
  path = os.path.join(workdir, "run_info.json")
  with writing(path):
    atomic.write_json(path, info, indent=2)


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
  """
  model_cfg, loss_cfg = validate(config)
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    with _hold_lock(workdir):
      _train(config, workdir, model_cfg, loss_cfg, profile=profile)
  finally:
    if created and not os.listdir(workdir):
      os.rmdir(workdir)  # failed before writing anything (e.g. missing data): leave no trace


_MESSAGE_BYTES = 4096  # the longest error message process 0 broadcasts to the others


def _broadcast_message(message: str) -> str:
  """Process 0's `message` ('' for none) on every process: a collective with several."""
  if jax.process_count() == 1:
    return message
  raw = np.frombuffer(message.encode()[:_MESSAGE_BYTES], np.uint8).astype(np.int32)
  buffer = np.zeros(_MESSAGE_BYTES, np.int32)
  buffer[:raw.size] = raw
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer)).astype(np.uint8)
  return bytes(received).rstrip(b"\0").decode(errors="replace")


@contextlib.contextmanager
def _hold_lock(workdir: str):
  """WORKDIR/train.lock for the job: process 0 takes it (the others write no workdir file of
  their own) and tells every process whether it could, so a refusal is the same one-line
  `WorkdirLockedError` everywhere instead of the others waiting in a collective."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lock.hold(workdir))
      except Exception as e:  # pylint: disable=broad-except  (every process must hear of it)
        error = e
    refusal = _broadcast_message("" if error is None else str(error) or type(error).__name__)
    if error is not None:
      raise error
    if refusal:
      raise WorkdirLockedError(refusal)
    yield


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
  (`CheckpointWriteError` if one of them cannot be: that message names the intact step)."""
  ckpt.wait()
  steps = ckpt.all_steps()
  what = "free some space" if getattr(error, "no_space", True) else "fix that"
  then = (f"the newest checkpoint (step {max(steps)}) is intact: {what} and run the same "
          "command to resume from it" if steps else
          f"no checkpoint was written yet: {what} and run the same command again")
  text = str(error)
  joined = f"{text} {then[0].upper()}{then[1:]}" if text.endswith("?") else f"{text}; {then}"
  return FileWriteError(joined + ".")


def _run(config, workdir: str, model_cfg: ModelConfig, loss_cfg: LossConfig, train_iter,
         ckpt: Checkpointer, *, profile: bool = False) -> None:
  """`_train` once the data and the checkpoint directory are open."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, "config.json")
    with writing(path):
      config_file.save_config(config, path)
    _write_run_info(workdir)

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
  redo = _dropped_evaluation(config, start, rows)
  writer = MetricWriter(workdir, resume_step=start, replace_step=start if redo else None)
  done_path = os.path.join(workdir, "DONE")
  if start < num_steps and os.path.exists(done_path) and jax.process_index() == 0:
    os.remove(done_path)  # train.num_steps was raised: the run is not done any more
  if start >= num_steps and redo is None:
    logging.info("Nothing to do: step %d >= train.num_steps = %d.", start, num_steps)
    _finish(workdir)
    return

  writer.write_hparams(config.to_dict())  # TensorBoard's hparams tab (process 0 writes)
  # Progress (steps/s, % done, ETA, the evaluations' share of the time) and the optional trace.
  actions = periodic_actions(num_steps, config.train.log_every_steps, start,
                             profile_dir=workdir if profile and jax.process_index() == 0 else None)
  progress = actions[0]
  p_train_step = make_train_step(run_config, model, tx, mesh, loss_cfg)
  evaluator = _evaluator(config, model, mesh, eval_rng, grid_rng, history=rows)
  train_rng = replicate(train_rng, mesh)

  history, window_start, t_start = [], time.perf_counter(), time.perf_counter()
  step_timer = eta.StepTimer(config, start)  # logs the step time and the ETA at step start + 2
  max_skips = config.optim.max_consecutive_skips
  previous = None  # the last step's metrics: its skip count is read one step late
  with preemption.StopRequest("saving a checkpoint and stopping") as stop_request:
    interrupt = stop_request.agreed
    if redo is not None:
      logging.info("Evaluating step %d first: its evaluation was interrupted.", start)
      if _evaluate(evaluator, workdir, writer, state, start, redo, interrupt) is None:
        writer.close()
        return
      writer.write_scalars(start, redo)
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
      stop = _stop_requested(stop_request, step, config.train.log_every_steps)
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
          writer.write_scalars(step, row)
          streak = _streak(step, jax.device_get(metrics),
                           None if lagged is None else jax.device_get(lagged))
          if rollback.mode(config) == "rollback" and len(rollbacks) < rollback.MAX_ROLLBACKS:
            state, step, rollbacks = _roll_back(
                config, workdir, ckpt, state, train_iter, step, streak, rollbacks,
                initial=lambda tx=tx: (create_train_state(model, tx, init_rng), first_data))
            run_config = rollback.lowered(config, len(rollbacks))
            tx = create_optimizer(run_config)
            p_train_step = make_train_step(run_config, model, tx, mesh, loss_cfg)
            state = replicate(state, mesh)
            writer.close()  # the rows after the restored step go (trained again, differently)
            writer = MetricWriter(workdir, resume_step=step)
            evaluator.history = [r for r in evaluator.history if r["step"] <= step]
            actions = periodic_actions(num_steps, config.train.log_every_steps, step)
            progress, previous = actions[0], None
            history, window_start = [], time.perf_counter()
            continue
          _stop_after_skips(config, ckpt, writer, step, state, train_iter.get_state(), streak,
                            rollbacks)
        history, window_start = [], time.perf_counter()
      eval_metrics = None
      if _is_eval_step(config, step):
        with progress.timed("eval", wait_jax_async_dispatch=False):
          eval_metrics = _evaluate(evaluator, workdir, writer, state, step, row, interrupt)
        stop = stop or eval_metrics is None  # interrupted: checkpoint and stop, below
      if row:
        writer.write_scalars(step, row)
      if (step % config.train.checkpoint_every_steps == 0 or is_last or stop
          or eval_metrics is not None):
        ckpt.save(step, state, data_state=train_iter.get_state(), metrics=eval_metrics,
                  force=is_last or stop)
      if stop:
        ckpt.wait()
        writer.flush()
        logging.warning("Stopped at step %d on request; run the same command to resume.", step)
        return
  ckpt.wait()
  writer.close()
  _finish(workdir)


def _is_eval_step(config, step: int) -> bool:
  return step % config.eval.every_steps == 0 or step == config.train.num_steps


def _dropped_evaluation(config, start: int, rows: list[dict]) -> dict | None:
  """The row to complete when the evaluation of the restored step `start` was dropped (a stop
  request interrupted it): that step's training metrics, if logged ({} if not); else None."""
  if start == 0 or not _is_eval_step(config, start):
    return None
  here = [r for r in rows if r["step"] == start]
  if any("eval/bpd" in r for r in here):
    return None
  return {k: v for r in here for k, v in r.items() if k != "step"}


def _evaluate(evaluator: evaluation.Evaluator, workdir: str, writer: MetricWriter, state,
              step: int, row: dict, interrupt) -> dict | None:
  """The evaluation of `step`: its images written, its metrics added to `row` and returned.

  Returns None, recording nothing, when a stop request interrupts it (between batches).
  """
  try:
    eval_metrics, eval_images = evaluator(state.ema_params, step, interrupt=interrupt)
  except preemption.Interrupted:
    logging.warning("Stop requested during the evaluation of step %d: it is dropped (not "
                    "logged); the next run evaluates step %d first.", step, step)
    return None
  if jax.process_index() == 0:
    _write_images(workdir, writer, step, eval_images)
  row.update(eval_metrics)
  # A short line; every metric goes to metrics.jsonl and TensorBoard.
  logging.info("%s", eval_summary(step, eval_metrics, evaluator.flagged,
                                  eval_metrics["eval/wall_time"]))
  return eval_metrics


def _streak(step: int, last: dict, before: dict | None) -> tuple[int, dict]:
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


def _roll_back(config, workdir: str, ckpt: Checkpointer, state, train_iter, step: int,
               streak: tuple[int, dict], rollbacks: list[dict], initial):
  """Restores the newest checkpoint (`initial()`'s state and data position when there is none)
  and records the roll-back (hvae/rollback.py).

  Returns:
    (the restored state, not yet placed; its step; every roll-back so far, this one last).
  """
  ckpt.wait()
  if ckpt.latest_step() is None:
    restored, data_state = initial()
    restored_step = 0
  else:
    restored, data_state, restored_step = ckpt.restore(state)
  if data_state is not None:
    train_iter.set_state(data_state)
  learning_rate = rollback.lowered(config, len(rollbacks) + 1).optim.learning_rate
  entry = {"step": step, "restored_step": restored_step, "learning_rate": learning_rate,
           "skipped": int(streak[1]["consecutive_skips"])}
  if jax.process_index() == 0:
    rollback.record(workdir, entry)
  logging.warning("%s: rolled back to step %d and lowered the learning rate to %g (roll-back %d "
                  "of %d, optim.on_repeated_skips = rollback; recorded in %s).",
                  _streak_text(config, streak), restored_step, learning_rate,
                  len(rollbacks) + 1, rollback.MAX_ROLLBACKS, os.path.join(workdir, rollback.FILE))
  return restored, restored_step, rollbacks + [entry]


def _stop_after_skips(config, ckpt: Checkpointer, writer: MetricWriter, step: int, state,
                      data_state, streak: tuple[int, dict], rollbacks: list[dict]) -> None:
  """Checkpoints the state (skipped updates leave it at the last good one) and raises."""
  ckpt.save(step, state, data_state=data_state, force=True)
  ckpt.wait()
  writer.close()
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


def _evaluator(config, model: HVAE, mesh, rng, grid_rng, history) -> evaluation.Evaluator:
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


def _stop_requested(request: preemption.StopRequest, step: int, log_every: int) -> bool:
  """Whether to checkpoint and stop now. With several processes, every host must agree (a
  checkpoint save is collective), so the flag is combined across hosts at logging steps."""
  if jax.process_count() > 1 and step % log_every:
    return False
  return request.agreed()


def _finish(workdir: str) -> None:
  if jax.process_index() == 0:
    path = os.path.join(workdir, "DONE")
    with writing(path), open(path, "w") as f:
      f.write(datetime.datetime.now(datetime.UTC).isoformat() + "\n")
  logging.info("Done: %s", workdir)
