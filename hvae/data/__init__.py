"""Input data for hvae: sources (celeb_a, folder, embedded, synthetic), masks and the pipeline.

The training loop uses three functions, re-exported here from `hvae.data.pipeline`:
`create_train_iterator`, `eval_batches` and `num_examples`. See docs/data.md.
"""

from hvae.data.pipeline import (
  SOURCES,
  TrainIterator,
  create_train_iterator,
  eval_batches,
  num_examples,
)
from hvae.data.source import DataUnavailableError

__all__ = [
  "SOURCES",
  "DataUnavailableError",
  "TrainIterator",
  "create_train_iterator",
  "eval_batches",
  "num_examples",
]
