"""Inpainting masks: float32 [H, W, 1], 1 = given pixel, 0 = missing pixel.

Makers (the registry `MASKS`, chosen by `config.data.train_mask` / `config.data.eval_mask`):
* `centre`   — the seed's task: the central 32×32 square of a 64×64 image is missing
  (the central half of each side for other sizes);
* `boxes`    — 1 to 4 random axis-aligned rectangles, sides 8 to 32 px (at 64 px);
* `freeform` — 1 to 5 random brush strokes (random-walk polylines, 4 to 10 px wide).

Every mask has at least one missing and one given pixel; the random makers also keep at least
25 % of the image given (they redraw otherwise), so the context is never empty.

Training masks take their randomness from the input pipeline's per-example generator; evaluation
masks come from `eval_mask(name, seed, index)`, so every evaluation pass (and both the
`eval_train/` and `eval/` passes) sees the same holes for the same example index.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

MaskMaker = Callable[[np.random.Generator, int], np.ndarray]

MAX_MISSING_FRACTION = 0.75  # random makers redraw masks that leave less than 25 % as context
_MAX_DRAWS = 32
_EVAL_STREAM = 0x6D61736B  # separates evaluation-mask seeds from every other use of config.seed


def centre(rng: np.random.Generator, size: int = 64) -> np.ndarray:
  """The seed's mask: the central (size/2)×(size/2) square missing.

  Args:
    rng: unused (the mask is fixed); kept so every maker has the same signature.
    size: image side.

  Returns:
    float32 [size, size, 1], 1 = given.
  """
  del rng
  mask = np.ones((size, size, 1), np.float32)
  lo, hi = size // 4, size - size // 4
  mask[lo:hi, lo:hi] = 0.0
  return mask


def _boxes_once(rng: np.random.Generator, size: int) -> np.ndarray:
  mask = np.ones((size, size, 1), np.float32)
  lo, hi = max(1, size // 8), max(2, size // 2)
  for _ in range(rng.integers(1, 5)):
    h, w = rng.integers(lo, hi + 1, size=2)
    top = rng.integers(0, size - h + 1)
    left = rng.integers(0, size - w + 1)
    mask[top : top + h, left : left + w] = 0.0
  return mask


def _freeform_once(rng: np.random.Generator, size: int) -> np.ndarray:
  canvas = Image.new("L", (size, size), 255)
  draw = ImageDraw.Draw(canvas)
  unit = size / 64
  for _ in range(rng.integers(1, 6)):
    width = int(round(rng.uniform(4, 10) * unit))
    x, y = rng.uniform(0, size, size=2)
    points = [(x, y)]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(rng.integers(2, 7)):
      angle += rng.uniform(-1.2, 1.2)  # gentle turns, like a brush rather than a zig-zag
      length = rng.uniform(6, 20) * unit
      x = min(max(x + length * float(np.cos(angle)), 0.0), size - 1.0)
      y = min(max(y + length * float(np.sin(angle)), 0.0), size - 1.0)
      points.append((x, y))
    draw.line(points, fill=0, width=width, joint="curve")
    r = width / 2  # round caps, so strokes do not end in square stubs
    for px, py in (points[0], points[-1]):
      draw.ellipse((px - r, py - r, px + r, py + r), fill=0)
  return (np.asarray(canvas, np.float32) / 255.0).round()[..., None]


def _redrawn(once: Callable[[np.random.Generator, int], np.ndarray]) -> MaskMaker:
  """Wraps a random maker so that its masks satisfy the guarantees in the module docstring."""

  def make(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    for _ in range(_MAX_DRAWS):
      mask = once(rng, size)
      missing = 1.0 - mask.mean()
      if 0.0 < missing <= MAX_MISSING_FRACTION:
        return mask
    # Practically unreachable; the fixed mask keeps the guarantee without looping forever.
    return centre(rng, size)

  make.__doc__ = once.__doc__
  return make


boxes = _redrawn(_boxes_once)
freeform = _redrawn(_freeform_once)

MASKS: dict[str, MaskMaker] = {"centre": centre, "boxes": boxes, "freeform": freeform}


def get_maker(name: str) -> MaskMaker:
  """Returns the mask maker registered as `name`.

  Args:
    name: one of `MASKS`.

  Returns:
    A function (rng, size) -> float32 [size, size, 1].

  Raises:
    ValueError: unknown name; the message lists the valid ones.
  """
  try:
    return MASKS[name]
  except KeyError:
    raise ValueError(f"unknown mask {name!r}; valid masks: {', '.join(MASKS)}") from None


def eval_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of example `index`'s evaluation mask (independent of split and process)."""
  return np.random.default_rng([_EVAL_STREAM, int(seed) % 2**63, int(index)])


def eval_mask(name: str, seed: int, index: int, size: int = 64) -> np.ndarray:
  """The evaluation mask of example `index`: identical on every call, process and split.

  Args:
    name: mask maker name.
    seed: `config.seed`.
    index: example index within the split.
    size: image side.

  Returns:
    float32 [size, size, 1], 1 = given.
  """
  return get_maker(name)(eval_rng(seed, index), size)
