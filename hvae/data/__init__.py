"""Input data for hvae: sources (celeb_a, folder, embedded, synthetic), masks and the pipeline.

The training loop uses three functions, re-exported here from `hvae.data.pipeline`:
`create_train_iterator`, `eval_batches` and `num_examples`. See docs/data.md.

Importing it installs hvae's console filter (`hvae.console.quiet_libraries`): the TFDS and orbax
messages that make an offline folder look like a download are dropped, nothing else.
"""

from hvae import console
from hvae.data.pipeline import (
  SOURCES,
  TrainIterator,
  create_train_iterator,
  eval_batches,
  num_examples,
)
from hvae.data.source import DataUnavailableError

console.quiet_libraries()  # drops known library chatter (see hvae/console.py); idempotent

__all__ = [
  "SOURCES",
  "DataUnavailableError",
  "TrainIterator",
  "create_train_iterator",
  "eval_batches",
  "num_examples",
]
