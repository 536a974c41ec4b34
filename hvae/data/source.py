"""What every data source hands the input pipeline: one split as a random-access record list.

A source module (`celeb_a`, `folder`, `embedded`, `synthetic`) exposes
`open_split(config, split) -> SplitSource` and `split_names(config)`. The pipeline shuffles and
shards `records`, turns each record into a training image with `train_image(record, rng)`
(random crop variance lives there, flips and masks are the pipeline's), and builds evaluation
examples with `eval_image(index)`, which is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from hvae.errors import DataUnavailableError  # noqa: F401 (re-exported)

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """One split of one source.

  Attributes:
    records: random access (`len(records)`, `records[i]`): what training shuffles over
      (examples for finite sources, photos for `embedded`). Must be picklable for grain workers.
    train_image: (record, np.random.Generator) -> uint8 [64, 64, 3]; picklable.
    eval_image: example index -> uint8 [64, 64, 3], identical on every call.
    num_examples: examples in the split; None = infinitely many (random crops).
  """

  records: Any
  train_image: Callable[[Any, np.random.Generator], np.ndarray]
  eval_image: Callable[[int], np.ndarray]
  num_examples: int | None


def check_split(source: str, split: str, available: tuple[str, ...]) -> None:
  """Raises ValueError when `split` is not one of `available` (naming them)."""
  if split not in available:
    raise ValueError(
      f"data source {source!r} has no split {split!r}; its splits: {', '.join(available)}"
    )
