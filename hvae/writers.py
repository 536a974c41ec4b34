"""Metrics to TensorBoard and WORKDIR/metrics.jsonl (docs/design.md §7 "Workdir", "Metric names").

`MetricWriter` writes every scalar twice, under the same names: TensorBoard event files (through
`clu.metric_writers`) for browsing, and one JSON object per logged step in `metrics.jsonl`
(`{"step": N, "eval/bpd": 3.1, ...}`) for reports and notebooks. Both are flushed after every
write, so a crash loses nothing already written and readers see runs in progress.

JSON has no NaN or infinity: non-finite values are written as `null` in `metrics.jsonl` (and as
themselves in TensorBoard). A reader cannot tell NaN from inf there; both mean "diverged".

Nothing goes to the console from here: the files hold every metric, and the training loop prints
a short line per evaluation (`hvae.console.eval_summary`). Only process 0 writes files; other
processes' writers do nothing.

A write that fails (a full disk, a quota or file-size limit) raises `FileWriteError`, one line
naming the file (`writing`, also used for config.json, run_info.json, images and `--mode=eval`'s
results); a row of metrics.jsonl is written whole or not at all (a failed append is cut off).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from hvae import atomic, console
from hvae.errors import FileWriteError
from hvae.metrics_file import METRICS_FILE, parse_lines, read_metrics  # noqa: F401  (re-exported)

# The errnos of a disk without room: full, over quota, over the file-size limit (RLIMIT_FSIZE).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(error: BaseException) -> bool:
  """An OSError, or TensorFlow's error from its event writer (it names neither file nor errno)."""
  if isinstance(error, OSError):
    return True
  tf = sys.modules.get("tensorflow")  # imported by clu when a writer exists
  errors = getattr(tf, "errors", None)
  return errors is not None and isinstance(error, errors.OpError)


def write_error(what: str, error: BaseException) -> FileWriteError:
  """The one-line error of a failed write of `what` (a path, or a description)."""
  if isinstance(error, OSError) and error.errno is not None:
    reason = f"{type(error).__name__}: [Errno {error.errno}] {os.strerror(error.errno)}"
  else:
    text = " ".join(str(error).split())[:200]
    reason = type(error).__name__ + (f": {text}" if text else "")
  space = not isinstance(error, OSError) or error.errno in NO_SPACE or error.errno is None
  hint = " is the disk full, or a quota or file-size limit reached?" if space else ""
  error = FileWriteError(f"{what} could not be written ({reason}):{hint}".rstrip(":"))
  error.no_space = space  # what to do about it: free some space, or fix the cause
  return error


@contextlib.contextmanager
def writing(what: str):
  """Turns a failed write inside the block into `FileWriteError` (one line naming `what`)."""
  try:
    yield
  except FileWriteError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (only write failures are converted)
    if not _write_failure(e):
      raise
    raise write_error(what, e) from e


def _json_value(value: float) -> float | None:
  return value if math.isfinite(value) else None


def _hparam_value(value: Any) -> bool | int | float | str:
  """TensorBoard's hparams plugin takes only bool/int/float/str; everything else as text."""
  if isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, np.generic):
    return value.item()
  return str(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts to dotted keys ("optim.learning_rate"), as on the --config.a.b command line."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name))
    else:
      flat[name] = value
  return flat


class MetricWriter:
  """Writes scalars to TensorBoard and metrics.jsonl, images and hparams to TensorBoard."""

  def __init__(self, workdir: str, *, process_index: int | None = None,
               resume_step: int | None = None, replace_step: int | None = None):
    """Opens the writers; on process 0, prepares metrics.jsonl for appending.

    Args:
      workdir: the run's working directory (event files and metrics.jsonl go in it).
      process_index: this process's index; only 0 writes. Defaults to jax.process_index().
      resume_step: the step a resumed run restarts from. Rows with a larger step, logged by the
        crashed run after its last checkpoint, are dropped so the file stays monotone.
      replace_step: rows already written at this step are dropped (the step about to be
        written again: a re-run of `--mode=eval` replaces its row instead of adding one).
        TensorBoard keeps both points; it shows the newer one.
    """
    self._workdir = workdir
    index = jax.process_index() if process_index is None else process_index
    self._primary = index == 0
    self._file = None
    if self._primary:
      with writing(self.metrics_path):
        os.makedirs(workdir, exist_ok=True)
        self._repair(resume_step, replace_step)
        # Unbuffered: a row reaches the file at once, and a failed one can be cut off.
        self._file = open(self.metrics_path, "ab", buffering=0)
    self._writer = None
    if self._primary:
      console.quiet_libraries()
      console.import_tensorflow()  # clu imports it; without its C++ start-up banner
      from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

      # TensorBoard only: clu's LoggingWriter would print every metric on the console.
      with writing(self._events):
        self._writer = metric_writers.SummaryWriter(workdir)

  @property
  def _events(self) -> str:
    return f"TensorBoard's event file in {self._workdir}"

  @property
  def metrics_path(self) -> str:
    return os.path.join(self._workdir, METRICS_FILE)

  def _repair(self, resume_step: int | None, replace_step: int | None = None) -> None:
    """Drops a truncated last line, (with resume_step) rows past the restored step and (with
    replace_step) the rows of that step."""
    path = self.metrics_path
    if not os.path.exists(path):
      return
    with open(path, encoding="utf-8") as f:
      text = f.read()
    rows, good = parse_lines(text, path)
    if resume_step is not None:
      keep = [row for row in rows if row["step"] <= resume_step]
      if len(keep) < len(rows):
        logging.info("Dropping %d rows of %s with step > %d (resuming from step %d).",
                     len(rows) - len(keep), path, resume_step, resume_step)
        good = "".join(json.dumps(row) + "\n" for row in keep)
        rows = keep
    if replace_step is not None and any(row["step"] == replace_step for row in rows):
      logging.info("Replacing the rows of step %d in %s.", replace_step, path)
      good = "".join(json.dumps(row) + "\n" for row in rows if row["step"] != replace_step)
    # Appending after a partial line would glue the next row onto it, so rewrite first.
    if good != text:
      atomic.write_text(path, good)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one step's scalars to TensorBoard and as one line of metrics.jsonl.

    Args:
      step: the training step.
      scalars: name -> Python/numpy/jax scalar. Names follow docs/design.md §7 "Metric names".
    """
    if "step" in scalars:
      raise ValueError("'step' is reserved for the row's step in metrics.jsonl.")
    values = {name: console.to_float(value) for name, value in scalars.items()}
    step = int(step)
    if not self._primary:
      return
    with writing(self._events):
      self._writer.write_scalars(step, values)
      self._writer.flush()
    row = {"step": step, **{name: _json_value(v) for name, v in values.items()}}
    # allow_nan=False: a stray NaN would make the file unreadable by strict JSON parsers.
    with writing(self.metrics_path):
      self._append((json.dumps(row, allow_nan=False) + "\n").encode())

  def _append(self, data: bytes) -> None:
    """Appends `data` whole, or (a write failed: a full disk) cuts the file back and raises."""
    size = os.fstat(self._file.fileno()).st_size
    try:
      view = memoryview(data)
      while view:
        written = self._file.write(view)
        if not written:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
    except OSError:
      with contextlib.suppress(OSError):
        os.ftruncate(self._file.fileno(), size)  # no half row for the next reader
      raise

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes images to TensorBoard.

    Args:
      step: the training step.
      images: name -> uint8 [H, W, 3] or [N, H, W, 3] (float arrays are clipped to 0..255).
    """
    batch = {}
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
      if image.ndim not in (3, 4):
        raise ValueError(f"image {name!r} must be [H, W, C] or [N, H, W, C]; got {image.shape}")
      batch[name] = image
    if self._primary:
      with writing(self._events):
        self._writer.write_images(int(step), batch)
        self._writer.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes the (nested) config to TensorBoard's hparams tab under dotted names.

    Args:
      hparams: a nested dict of hyper-parameters (e.g. config.to_dict()).
    """
    flat = {name: _hparam_value(value) for name, value in _flatten(hparams).items()}
    if self._primary:
      with writing(self._events):
        self._writer.write_hparams(flat)
        self._writer.flush()

  def flush(self) -> None:
    """Flushes both outputs (each write already does; this is for callers that want to be sure)."""
    if self._writer is not None:
      with writing(self._events):
        self._writer.flush()

  def close(self) -> None:
    """Flushes and closes both outputs; the writer is unusable afterwards."""
    if self._file is not None:
      self._file.close()  # unbuffered: nothing is left to write
      self._file = None
    if self._writer is not None:
      writer, self._writer = self._writer, None
      with writing(self._events):
        writer.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


PROFILE_FIRST, PROFILE_STEPS = 5, 5  # --profile traces steps start+5 .. start+10 (compiled by then)


class _Silent:
  """The progress action of a process other than 0: nothing to report, nothing to time."""

  def __call__(self, step: int) -> None:
    del step

  def timed(self, name: str, **kwargs):
    del name, kwargs
    return contextlib.nullcontext()


def periodic_actions(num_steps: int, every_steps: int, start: int, *,
                     profile_dir: str | None = None, primary: bool = True) -> list:
  """clu's periodic actions of a training run; call each with the step after every step.

  Args:
    num_steps: the run's last step.
    every_steps: how often the progress line is written (train.log_every_steps).
    start: the step the run (re)starts from.
    profile_dir: where a profiler trace goes (`DIR/plugins/profile/`, TensorBoard's profile
      tab), or None for none.
    primary: False on processes other than 0 of a multi-process job: their progress line would
      repeat process 0's, so they get a silent action with the same `timed` and no trace, and do
      not import clu's periodic actions, which import TensorFlow (~4 s and ~0.5 GB a process).

  Returns:
    [`ReportProgress`, then `Profile` with `profile_dir`] ([the silent action] if not
    `primary`). ReportProgress logs steps/s, the share
    of steps done and the ETA every `every_steps` steps, and the share of the time spent in
    parts run under its `timed(name)` (the evaluations). Profile traces `PROFILE_STEPS` steps
    from step `start + PROFILE_FIRST`; a run too short for that gets no trace (a warning says so).
  """
  if not primary:
    return [_Silent()]
  console.import_tensorflow()  # clu's periodic actions import it: without its banner
  from clu import periodic_actions as clu_actions  # pylint: disable=g-import-not-at-top

  actions = [clu_actions.ReportProgress(num_train_steps=num_steps, every_steps=every_steps,
                                        every_secs=None)]
  if profile_dir is not None:
    first = start + PROFILE_FIRST
    if first + PROFILE_STEPS > num_steps:
      logging.warning("--profile: the run ends at step %d, before steps %d..%d can be traced.",
                      num_steps, first, first + PROFILE_STEPS)
    else:
      actions.append(clu_actions.Profile(logdir=profile_dir, num_profile_steps=PROFILE_STEPS,
                                         profile_duration_ms=None, first_profile=first,
                                         every_secs=None))
  return actions
