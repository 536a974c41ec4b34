"""hvae's command line: train, evaluate, inpaint or report (docs/design.md §7).

  python launch.py --config=experiments/quickstart.py
  python launch.py --config=experiments/celeba_l4.py --config.train.batch_size=256
  python launch.py --mode=train --workdir=runs/quickstart        # resume from config.json
  python launch.py --mode=report --workdir=runs/a --workdir=runs/b  # reports + comparison
  python launch.py --config=experiments/ablate_levels.py:cpu --sweep --workdir=runs/levels_cpu

`--workdir` defaults to runs/NAME for --config=experiments/NAME.py; running `train` again on the
same workdir resumes. Modes other than train may omit --config and read WORKDIR/config.json.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, experiments/NAME.py[:ARG].", lock_config=True)
_WORKDIR = flags.DEFINE_multi_string(
    "workdir", None, "Run directory (default runs/NAME); --mode=report takes several.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "inpaint", "report"], "What to do.")
# --mode=eval and --mode=inpaint (docs/evaluation.md).
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "eval/inpaint: best | latest | STEP.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test", "train"],
                           "eval: the split to evaluate (test only when asked for).")
_MASK = flags.DEFINE_string(
    "mask", None, "eval: centre | boxes | freeform (default data.eval_mask); inpaint and eval "
    "--input: also box:X,Y,W,H or a mask image (black = missing).")
_INPUT = flags.DEFINE_string(
    "input", None, "inpaint: an image file or a folder of images; eval: score these complete "
    "images instead of the split.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "inpaint: output folder (default WORKDIR/inpaint); eval: default "
    "WORKDIR/eval, or WORKDIR/eval/INPUT_NAME with --input.")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "eval/inpaint: fill-ins per context (default eval.num_samples).")
_TEMPERATURE = flags.DEFINE_string(
    "temperature", None, "eval/inpaint: latent temperature, one value or one per level "
    "(default eval.temperature, else hvae.sampling.DEFAULT_TEMPERATURE).")
_PIXELS = flags.DEFINE_string(
    "pixels", None, "eval/inpaint: pixels of a fill-in sample: sample (drawn from p(x|z)), "
    "sample:T (at pixel temperature T, e.g. sample:0.3) or mean (E[x|z]) (default eval.pixels, "
    "else hvae.sampling.DEFAULT_PIXELS).")
_RANK = flags.DEFINE_bool("rank", False, "inpaint: order fill-ins by the model's likelihood.")
_REFINE_STEPS = flags.DEFINE_integer(
    "refine_steps", None, "eval: S steps of per-example posterior refinement: the encoder/decoder "
    "split of the held-out gap per level (default eval.refine_steps; 0 = off).", lower_bound=0)
_FILL = flags.DEFINE_string(
    "fill", "all", "inpaint: all, or a comma-separated subset of samples, mode, mean.")
_BASELINES = flags.DEFINE_string(
    "baselines", "biharmonic,ring_mean", "eval/inpaint: classical fill-ins to compare with "
    "(biharmonic, ring_mean; the first is the paired reference), or none.")
# Sweeps (docs/sweeps.md): the experiment file's sweep(arg), one point per subdirectory.
_SWEEP = flags.DEFINE_bool("sweep", False, "train every point of the experiment's sweep(arg).")
_SWEEP_INDEX = flags.DEFINE_integer(
    "sweep_index", None, "sweep: run only point I (e.g. $SLURM_ARRAY_TASK_ID); implies --sweep.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "sweep: print the points, run nothing.")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "train: write a profiler trace of a few steps to the workdir "
    "(TensorBoard's profile tab).")
_CACHE = flags.DEFINE_string(
    "jax_cache", os.path.expanduser("~/.cache/hvae/jax"),
    "Folder of JAX's persistent compilation cache, on by default ('' = off): programs that took "
    "over 1 s to compile (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS if set) are kept there, so "
    "re-runs and resumes skip most compilation.")
# Multi-host (README "Multi-device and multi-host"): passed to jax.distributed.initialize. On
# SLURM, Open MPI and Cloud TPU pods JAX detects all three; elsewhere give them on every process.
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "multi-host: how many processes the job has (default: detected on "
    "SLURM, Open MPI, Cloud TPU).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "multi-host: this process's index, 0 .. num_processes-1 (default: "
    "detected as for --num_processes).", lower_bound=0)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: HOST:PORT of process 0, the same on every "
    "process (default $JAX_COORDINATOR_ADDRESS, else detected as for --num_processes).")


def _default_workdir() -> str:
  path = flags.FLAGS["config"].config_filename
  if not path:
    raise app.UsageError("--workdir is required when --config is not given")
  name = os.path.splitext(os.path.basename(path.split(":")[0]))[0]
  return os.path.join("runs", name)


def _multi_host_environment() -> str | None:
  """The cluster environment that makes this a multi-host job, or None (one process)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU"
  return None


def _maybe_initialize_distributed() -> None:
  """Joins the multi-host job named by the flags or the environment (one process: nothing).

  Raises:
    MultiHostError: the job cannot be joined (a missing process count or id, a bad address,
      the coordinator not reachable); one line that says which flag to give.
  """
  import jax

  from hvae import errors

  given = {"num_processes": _NUM_PROCESSES.value, "process_id": _PROCESS_ID.value,
           "coordinator_address": _COORDINATOR.value}
  given = {k: v for k, v in given.items() if v is not None}
  source = "--" + ", --".join(given) if given else _multi_host_environment()
  if source is None or given.get("num_processes") == 1:
    return
  if _PROCESS_ID.value is not None and _NUM_PROCESSES.value is not None and \
      _PROCESS_ID.value >= _NUM_PROCESSES.value:
    raise errors.MultiHostError(f"--process_id={_PROCESS_ID.value} must be below "
                                f"--num_processes={_NUM_PROCESSES.value}")
  try:
    jax.distributed.initialize(**given)
  except (ValueError, TypeError, RuntimeError) as e:
    message = " ".join(str(e).split())
    hint = ("give --num_processes, --process_id and --coordinator_address=HOST:PORT (process "
            "0's address) on every process, or run under SLURM, Open MPI or a Cloud TPU pod, "
            "where JAX detects them (README 'Multi-device and multi-host')")
    raise errors.MultiHostError(
        f"cannot join the multi-host job ({source}): {message[:300]}; {hint}") from e
  logging.info("process %d of %d (%d of %d devices local)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _setup_jax() -> None:
  """The persistent compilation cache, then multi-host initialisation."""
  import jax

  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  _maybe_initialize_distributed()


class _QuietLibraries:
  """Drops INFO lines of chatty libraries (orbax, XLA bridge) so progress lines stay readable."""

  _NOISY = ("orbax", "jax/_src", "tensorflow_datasets", "grain")

  def filter(self, record) -> bool:
    noisy = any(n in record.pathname for n in self._NOISY)
    # asyncio reports the failed writes of a failed orbax save again, at exit ("Task exception
    # was never retrieved", naming orbax's coroutine).
    stray = record.name == "asyncio" and "orbax" in record.getMessage()
    if (noisy or stray) and record.exc_info and logging.get_verbosity() < logging.DEBUG:
      # orbax's tracebacks of a failed background save: the error reaches the caller (one line,
      # CheckpointWriteError); --verbosity=1 shows them.
      return False
    # record.levelno is a Python level (INFO = 20), not absl's (INFO = 0).
    return record.levelno > 20 or not noisy


def main(argv):
  """Runs the mode; a user's mistake (bad config, sweep index, missing data) is one line, exit 2."""
  from hvae import errors  # imports nothing: --mode=report stays free of JAX

  try:
    _main(argv)
  except errors.USER_ERRORS as e:
    logging.debug("user error", exc_info=True)  # the traceback, for --verbosity=1
    print(f"launch.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except errors.SweepPointsFailed as e:
    print(f"launch.py: {e}", file=sys.stderr)
    sys.exit(1)
  except errors.Stopped as e:
    print(f"launch.py: stopped: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)


def _main(argv):
  from hvae import errors

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  if _MODE.value == "report":  # reads files only: no JAX, no config (docs/report.md)
    from hvae import report

    report.main(_WORKDIR.value or [_default_workdir()])
    return
  if len(_WORKDIR.value or ()) > 1:
    raise app.UsageError(f"--mode={_MODE.value} takes one --workdir, got {len(_WORKDIR.value)}")
  if _MODE.value in ("eval", "inpaint") and _INPUT.value and not os.path.exists(_INPUT.value):
    raise errors.MissingPathError(f"--input: {_INPUT.value} does not exist")
  if _SWEEP.value or _SWEEP_INDEX.value is not None or _DRY_RUN.value:
    if _MODE.value != "train" or _CONFIG.value is None:
      raise app.UsageError("--sweep needs --mode=train and --config=experiments/FILE.py[:ARG]")
    from hvae import sweep

    text = sweep.main(flags.FLAGS["config"].config_filename, _CONFIG.value,
                      _WORKDIR.value[0] if _WORKDIR.value else _default_workdir(),
                      index=_SWEEP_INDEX.value, dry_run=_DRY_RUN.value, setup=_setup_jax)
    if text:
      print(text)
    return
  _setup_jax()
  workdir = _WORKDIR.value[0] if _WORKDIR.value else _default_workdir()
  config = _CONFIG.value
  if config is None:
    from hvae import config_file

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      what = ("give --config=experiments/NAME.py to start a run there" if _MODE.value == "train"
              else "give the --workdir of a trained run")
      state = "has no config.json" if os.path.isdir(workdir) else "does not exist"
      raise errors.MissingPathError(
          f"--workdir: {workdir} {state} and --config is not given; {what}")
    config = config_file.load_config(path)

  if _MODE.value in ("eval", "inpaint"):
    _check_fill_flags()
  if _MODE.value == "train":
    from hvae import loop

    loop.train_and_evaluate(config, workdir, profile=_PROFILE.value)
  elif _MODE.value == "eval":
    _evaluate(workdir, config)
  else:  # inpaint: --mode is an enum, and report returned above
    from hvae.modes import inpaint

    if not _INPUT.value:
      raise app.UsageError("--mode=inpaint needs --input=IMAGE_OR_FOLDER")
    inpaint.run(workdir, _INPUT.value, _OUTPUT.value or os.path.join(workdir, "inpaint"), config,
                mask=_MASK.value, num_samples=_NUM_SAMPLES.value or config.eval.num_samples,
                temperature=_TEMPERATURE.value, rank=_RANK.value, checkpoint=_CHECKPOINT.value,
                fill=_FILL.value, baseline_names=_BASELINES.value, pixels=_PIXELS.value)


def _evaluate(workdir: str, config) -> None:
  """--mode=eval. SIGTERM / SIGINT stop it between two jitted calls (a batch, an IW chunk, a
  refinement step): nothing is written, one line says so, and the exit status is 128 + the
  signal (errors.Stopped)."""
  import signal

  from hvae import errors, preemption
  from hvae.modes import evaluate

  if _INPUT.value and flags.FLAGS["split"].present:
    raise app.UsageError("--split does not apply with --input (the images given are scored)")
  with preemption.StopRequest("stopping the evaluation; nothing is written") as stop:
    try:
      evaluate.run(workdir, config, checkpoint=_CHECKPOINT.value, split=_SPLIT.value,
                   mask=_MASK.value, temperature=_TEMPERATURE.value,
                   num_samples=_NUM_SAMPLES.value, input_path=_INPUT.value, output=_OUTPUT.value,
                   baseline_names=_BASELINES.value, pixels=_PIXELS.value,
                   refine_steps=_REFINE_STEPS.value, interrupt=stop.agreed)
    except preemption.Interrupted:
      signum = int(stop.signum or signal.SIGTERM)  # or another process's signal (multi-host)
      raise errors.Stopped(
          f"signal {signum} during the evaluation of {workdir}: it was dropped and nothing was "
          "written (results.json and the rest are written at the end); run the same command "
          "again to evaluate.", signum) from None


def _check_fill_flags() -> None:
  """A bad --baselines, --fill, --temperature, --pixels, --mask or --checkpoint is a usage error
  before anything is loaded."""
  from hvae import baselines, sampling
  from hvae.modes import evaluate, inpaint

  try:
    baselines.parse(_BASELINES.value)
    if _MODE.value == "inpaint":
      inpaint.parse_fill(_FILL.value)
      inpaint.check_mask(_MASK.value)
    else:  # box:X,Y,W,H and mask images only with --input
      evaluate.check_mask(_MASK.value, _INPUT.value)
    if _TEMPERATURE.value is not None:
      sampling.parse_temperature(_TEMPERATURE.value)
    if _PIXELS.value is not None:
      sampling.parse_pixels(_PIXELS.value)
    if _CHECKPOINT.value not in ("best", "latest") and not _CHECKPOINT.value.isdigit():
      raise ValueError(f"--checkpoint: {_CHECKPOINT.value!r} is not best, latest or a step "
                       "number")
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def _innermost_message(e: BaseException) -> str:
  """The first line-joined message down an exception's cause chain (KeyError's repr unwrapped)."""
  while e.__cause__ is not None or (e.args and isinstance(e.args[0], BaseException)):
    e = e.__cause__ if e.__cause__ is not None else e.args[0]
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  return " ".join(text.replace("\\n", "\n").split())


def _flag_message(e: Exception) -> str:
  """absl's message; a traceback that ml_collections pastes into it is cut to its last line."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)


def _parse_flags(argv):
  """absl's parser, with a bad --config file, argument or override as one line (exit 1).

  The config file is loaded here, not at first use, so its errors come before anything runs.
  """
  try:
    args = flags.FLAGS(argv)
    if flags.FLAGS["config"].present:
      _CONFIG.value.keys()  # a file that failed to load raises here (ml_collections defers it)
    return args
  except flags.Error as e:
    print(f"launch.py: error: {_flag_message(e)}\n"
          "Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    print(f"launch.py: error: --config: {_innermost_message(e)}", file=sys.stderr)
  sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
