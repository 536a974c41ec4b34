"""The errors a user's mistake raises, in a module that imports nothing.

launch.py turns these into one line on stderr and exit status 2, for every mode: `--mode=report`
included, which must not import JAX, so they cannot live next to the code that raises them.
Each is re-exported where it belongs (`hvae.config.ConfigError`, `hvae.sweep.SweepError`,
`hvae.data.DataUnavailableError`).
"""


class ConfigError(ValueError):
  """A config field has a bad value; the message starts with the field's dotted name."""


class SweepError(ValueError):
  """A sweep cannot be expanded or run as asked (bad index, clashing names, unknown argument)."""


class SweepPointsFailed(RuntimeError):
  """Some sweep points failed while training (the others still ran); not a user's mistake."""


class DataUnavailableError(RuntimeError):
  """The data a source needs is not on this machine; the message says how to get it."""


USER_ERRORS = (ConfigError, SweepError, DataUnavailableError)
