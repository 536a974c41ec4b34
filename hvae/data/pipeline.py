"""The input pipeline: training batches (grain) and deterministic evaluation batches.

Batches are dicts of numpy arrays, per process:
  image  uint8   [B, 64, 64, 3]
  mask   float32 [B, 64, 64, 1]   1 = given, 0 = missing
  and, in evaluation batches only:
  weight float32 [B]   1 for real examples, 0 for padding (the last batch is padded to full size,
                       so every batch has one shape and jitted code compiles once)
  index  int32   [B]   example index within the split

Training order. Global example position n (= step * batch_size + row) reads record
shuffle_e(n mod N) of epoch e = n div N (grain's index shuffle, reseeded every epoch), with its
random crop, flip and mask drawn from a generator seeded by (seed, n). Process p of P takes rows
[p·B/P, (p+1)·B/P) of every global batch (grain's strided slice over mini-batches of B/P), so
the global batch at a step is the same for any process count, shards are disjoint, and the state
of the iterator is one position: `get_state()` is a small JSON-serialisable dict, and a resumed
run (`set_state`) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import json
import os
import types

import grain
import numpy as np
from absl import flags

from hvae.data import celeb_a, embedded, folder, masks, synthetic
from hvae.data import source as source_lib
from hvae.errors import ConfigError

# Each module provides open_split(config, split) and split_names(config).
SOURCES: dict[str, types.ModuleType] = {
  "celeb_a": celeb_a,
  "folder": folder,
  "embedded": embedded,
  "synthetic": synthetic,
}
_DATA_STREAM = 0x64617461  # keeps the data-order seed apart from other uses of config.seed
_SUBSET_STREAM = 0x73756273  # the fixed permutation `data.train_subset` draws from
_PREFETCH_BATCHES = 4


def _source(config) -> types.ModuleType:
  name = config.data.source
  try:
    module = SOURCES[name]
  except KeyError:
    raise ValueError(
      f"data.source: unknown source {name!r}; valid sources: {', '.join(SOURCES)}"
    ) from None
  if config.data.get("eval_path", "") and name != "folder":
    raise ConfigError(f"data.eval_path: only data.source='folder' reads it (data.source is "
                      f"{name!r}); leave it empty")
  return module


def open_split(config, split: str) -> source_lib.SplitSource:
  """Opens `split` of `config.data.source` (preparing it if needed).

  Args:
    config: the experiment config.
    split: train | validation | test.

  Returns:
    The split's SplitSource (for `train`, `data.train_subset` of it when that is > 0).

  Raises:
    ValueError: unknown source, or a split the source does not have.
  """
  source = _source(config).open_split(config, split)
  subset = int(config.data.get("train_subset", 0) or 0)
  return train_subset(source, subset) if split == "train" and subset > 0 else source


def _subset_image(eval_image, indices, i: int):
  return eval_image(int(indices[i]))


def train_subset(source: source_lib.SplitSource, n: int) -> source_lib.SplitSource:
  """n examples of a finite training split, for studying overfitting at a chosen data size.

  The same n examples for every `seed` (a fixed permutation, independent of the run's seed), and
  the first m < n of them are a subset of the n: growing `data.train_subset` adds examples. Both
  training and the training-split evaluation (`eval_train/`) use only them.

  Raises:
    ConfigError: the split is infinite (the embedded photographs' random crops).
  """
  if source.num_examples is None:
    raise ConfigError("data.train_subset: this source's training split has infinitely many "
                      "examples (random crops); it applies to celeb_a, folder and synthetic")
  indices = np.random.default_rng(_SUBSET_STREAM).permutation(source.num_examples)[:n]
  return source_lib.SplitSource(
    records=[source.records[int(i)] for i in indices], train_image=source.train_image,
    eval_image=functools.partial(_subset_image, source.eval_image, indices),
    num_examples=len(indices))


def num_examples(config, split: str) -> int | None:
  """Number of examples of `split`; None for infinite sources (embedded random crops).

  Args:
    config: the experiment config.
    split: train | validation | test.

  Returns:
    The count, or None.
  """
  module = _source(config)
  subset = int(config.data.get("train_subset", 0) or 0)
  if split == "train" and subset > 0:
    return open_split(config, split).num_examples
  if hasattr(module, "num_examples"):  # answers from metadata, without opening files
    return module.num_examples(config, split)
  return module.open_split(config, split).num_examples


def _shard(batch_size: int, process_index: int | None, process_count: int | None):
  """Returns (per-process batch size, process index, process count)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(
      f"batch size {batch_size} (global) is not divisible by {process_count} processes"
    )
  return batch_size // process_count, process_index, process_count


def data_seed(seed: int) -> int:
  """The 32-bit seed of data order and augmentation (grain needs [0, 2^32))."""
  return int(np.random.SeedSequence([_DATA_STREAM, int(seed) % 2**63]).generate_state(1)[0])


class TrainTransform:
  """record -> {"image", "mask"}: the source's (random) image, a random flip, a training mask.

  A class rather than a closure so grain worker processes can pickle it.
  """

  def __init__(self, to_image, mask_name: str, flip: bool, size: int):
    self._to_image = to_image
    self._make_mask = masks.get_maker(mask_name)
    self._flip, self._size = flip, size

  def __call__(self, record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = self._to_image(record, rng)
    if self._flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {
      "image": np.ascontiguousarray(image, dtype=np.uint8),
      "mask": self._make_mask(rng, self._size),
    }


class TrainIterator:
  """Infinite iterator of per-process training batches with a checkpointable position."""

  def __init__(self, dataset: grain.IterDataset):
    self._dataset = dataset
    self._iterator = iter(dataset)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    """The position, as a JSON-serialisable dict (store it with the checkpoint)."""
    return json.loads(json.dumps(self._iterator.get_state(), default=_to_builtin))

  def set_state(self, state: dict) -> None:
    """Moves to a position saved by `get_state` (of an iterator built from the same config)."""
    self._iterator.set_state(state)

  def close(self) -> None:
    """Stops grain's prefetch threads and worker processes (optional; also done on deletion)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _to_builtin(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"grain iterator state holds a {type(value).__name__}, not JSON-serialisable")


def create_train_iterator(
  config, *, process_index: int | None = None, process_count: int | None = None
) -> TrainIterator:
  """The training input: infinite, shuffled, this process's shard of every global batch.

  Args:
    config: the experiment config (`seed`, `data.*`, `train.batch_size` = GLOBAL batch size).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    A TrainIterator of batches {"image": uint8 [b,64,64,3], "mask": float32 [b,64,64,1]} with
    b = batch_size // process_count.
  """
  local, p, count = _shard(int(config.train.batch_size), process_index, process_count)
  split = open_split(config, "train")
  transform = TrainTransform(
    split.train_image, config.data.train_mask, bool(config.data.flip), int(config.data.image_size)
  )
  ds = grain.MapDataset.source(split.records).seed(data_seed(config.seed))
  ds = ds.shuffle().repeat().random_map(transform)
  # Mini-batches of the local size, dealt round-robin: process p gets rows [p*b, (p+1)*b) of
  # every global batch, which is therefore the same for any process count.
  ds = ds.batch(local, drop_remainder=True)[p::count]
  threads = max(1, min(4, os.cpu_count() or 1))
  iter_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=threads, prefetch_buffer_size=_PREFETCH_BATCHES)
  )
  workers = int(config.data.get("num_workers", 0))
  if workers > 0:
    # grain's worker processes read grain's absl flags; launch.py parses them (absl.app), but a
    # notebook or a test has not, so use their defaults there instead of failing.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return TrainIterator(iter_ds)


def eval_batches(
  config,
  split: str,
  num_examples: int,
  batch_size: int,
  *,  # pylint: disable=redefined-outer-name
  process_index: int | None = None,
  process_count: int | None = None,
) -> list[dict[str, np.ndarray]]:
  """Deterministic evaluation batches: the first `num_examples` examples of `split`.

  Images have no flips and no randomness beyond each source's fixed per-index crop; masks come
  from `config.data.eval_mask`, seeded by (config.seed, example index) only, so `train` and
  `validation` passes use the same holes and every call returns identical arrays. The last
  batch is padded to full size with `weight` 0. A finite split smaller than `num_examples` is
  used whole (its size is then the number of weighted examples).

  Args:
    config: the experiment config.
    split: train | validation | test (`test` only when explicitly asked for).
    num_examples: examples to use (global).
    batch_size: GLOBAL evaluation batch size; each process gets batch_size // process_count rows.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    A list of batches {"image", "mask", "weight", "index"} (this process's rows of each).
  """
  local, p, count = _shard(int(batch_size), process_index, process_count)
  source = open_split(config, split)
  total = num_examples if source.num_examples is None else min(num_examples, source.num_examples)
  size = int(config.data.image_size)
  make_mask = masks.get_maker(config.data.eval_mask)
  batches = []
  for start in range(0, total, batch_size):
    indices = np.arange(start + p * local, start + (p + 1) * local)
    weight = (indices < total).astype(np.float32)
    # Padding rows repeat real examples (any valid input works; their weight is 0).
    indices = np.where(indices < total, indices, indices % max(total, 1)).astype(np.int32)
    batches.append(
      {
        "image": np.stack([source.eval_image(int(i)) for i in indices]).astype(np.uint8),
        "mask": np.stack([make_mask(masks.eval_rng(config.seed, int(i)), size) for i in indices]),
        "weight": weight,
        "index": indices,
      }
    )
  return batches
