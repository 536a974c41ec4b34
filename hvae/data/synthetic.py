"""Procedurally generated images, for tests and benchmarks only (never a default).

Example i of a split is a smooth two-colour gradient with 1 to 4 random coloured shapes drawn on
it, rendered from a generator seeded by (split, i) alone: the same index always gives the same
picture, on any process, with or without `config.seed`. Splits differ (the split is in the seed).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from hvae.data import source as source_lib

SIZES = {"train": 2048, "validation": 256, "test": 256}  # examples per split
_STREAM = 0x73796E74  # keeps these seeds apart from every other use of a generator
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def render(split_id: int, index: int, size: int = 64) -> np.ndarray:
  """Renders example `index` of the split numbered `split_id`.

  Args:
    split_id: 0 train, 1 validation, 2 test.
    index: example index.
    size: image side.

  Returns:
    uint8 [size, size, 3].
  """
  rng = np.random.default_rng([_STREAM, split_id, index])
  c0, c1 = rng.uniform(0, 255, size=(2, 3))
  angle = rng.uniform(0, 2 * np.pi)
  ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
  t = np.clip(0.5 + (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle), 0, 1)[..., None]
  image = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(1, 5)):
    x0, y0 = rng.uniform(-8, size, size=2)
    w, h = rng.uniform(size / 8, size / 2, size=2)
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    shape = rng.integers(3)
    if shape == 0:
      draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
    elif shape == 1:
      draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
    else:
      draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=colour)
  return np.asarray(image, dtype=np.uint8)


class Records:
  """Random access to a synthetic split; picklable (it holds only two integers)."""

  def __init__(self, split_id: int, length: int, size: int):
    self._split_id, self._length, self._size = split_id, length, size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> np.ndarray:
    return render(self._split_id, int(index) % self._length, self._size)


def _as_is(record: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  del rng
  return record


def split_names(config) -> tuple[str, ...]:
  """Splits of this source (all three)."""
  del config
  return tuple(SIZES)


def open_split(config, split: str) -> source_lib.SplitSource:
  """Opens one split.

  Args:
    config: the experiment config (uses `data.image_size`).
    split: train | validation | test.

  Returns:
    The split as a SplitSource of `SIZES[split]` examples.
  """
  source_lib.check_split("synthetic", split, tuple(SIZES))
  records = Records(_SPLIT_IDS[split], SIZES[split], config.data.image_size)
  return source_lib.SplitSource(
    records=records, train_image=_as_is, eval_image=records.__getitem__, num_examples=len(records)
  )
