"""The errors that end a command with one line, in a module that imports nothing.

A user's mistake, a missing path, data or checkpoint, a workdir another training holds, a full
disk, or a run that cannot usefully continue: launch.py turns these into one line on stderr and
exit status 2, for every mode (each message says what to do): `--mode=report`
included, which must not import JAX, so they cannot live next to the code that raises them.
`Stopped` (a stop request ended `--mode=eval`) is one line too, with the status of the signal.
Each is re-exported where it belongs (`hvae.typed_config.ConfigError`,
`hvae.sweep_points.SweepError`, `hvae.data.DataUnavailableError`, `hvae.loop.TrainingError`).
"""


class ConfigError(ValueError):
  """A config field has a bad value; the message starts with the field's dotted name."""


class SweepError(ValueError):
  """A sweep cannot be expanded or run as asked (bad index, clashing names, unknown argument)."""


class SweepPointsFailed(RuntimeError):
  """Some sweep points failed while training (the others still ran); not a user's mistake."""


class DataUnavailableError(RuntimeError):
  """The data a source needs is not on this machine; the message says how to get it."""


class MissingPathError(FileNotFoundError):
  """A path the command names (a workdir, `--input`, a run's config.json) does not exist."""


class CheckpointUnavailableError(FileNotFoundError):
  """No checkpoint can be restored: none saved, the one asked for is absent, or none loads."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a quota or file-size limit); the message
  names the step and the newest intact one."""


class FileWriteError(OSError):
  """A run's own file (metrics.jsonl, a TensorBoard event file, config.json, run_info.json, an
  image, `--mode=eval`'s results) could not be written: a full disk, a quota or file-size limit.
  The message names the file, and (training) the newest checkpoint, which is intact."""


class WorkdirLockedError(RuntimeError):
  """Another live `train` holds the workdir (the message names its pid and host)."""


class TrainingError(RuntimeError):
  """Training cannot usefully continue (e.g. every update is being skipped); a checkpoint of the
  last good state is written first, and the message says what to try."""


class MultiHostError(RuntimeError):
  """The multi-host job cannot be joined (launch.py's --num_processes, --process_id,
  --coordinator_address or the cluster's environment); the message says which flag to give."""


class Stopped(RuntimeError):
  """A stop request (SIGTERM, SIGINT) ended a command that has nothing to resume from
  (`--mode=eval`) before it wrote anything: launch.py prints the message as one line and exits
  with 128 + the signal's number, the status of a process the signal ended."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


USER_ERRORS = (ConfigError, SweepError, DataUnavailableError, MissingPathError,
               CheckpointUnavailableError, CheckpointWriteError, FileWriteError, WorkdirLockedError,
               TrainingError, MultiHostError)
