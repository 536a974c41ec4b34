"""The default data source: real colour photographs shipped inside pip packages (no download).

Photos (each checked to load offline from files inside the installed packages):
* scikit-image `skimage.data`: astronaut, chelsea, coffee, rocket, hubble_deep_field,
  immunohistochemistry, retina, stereo_motorcycle (left and right views);
* scikit-learn `load_sample_image`: china.jpg, flower.jpg;
* matplotlib `get_sample_data`: grace_hopper.jpg.
`skimage.data.cat` is an alias of `chelsea` (the same photo), so it appears once.

Splits are BY PHOTO, so held-out crops come from photos training never saw; the two motorcycle
views are one scene and stay together (see `PHOTOS_BY_SPLIT`, also listed in docs/data.md).

Training examples are random resized crops (random area 8-100 % of the photo, aspect 3/4-4/3,
random position) resized to 64×64 (photos are first reduced once to at most 512 px per side, for
speed): infinitely many, so `num_examples` is None. Evaluation example
i of a split is a crop of photo (i mod #photos) drawn from a generator seeded by
(config.seed, split, i): the same crop on every call.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from hvae.data import image_files
from hvae.data import source as source_lib

PHOTOS_BY_SPLIT = {
  "train": (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
  ),
  "validation": ("chelsea", "china"),
  "test": ("grace_hopper", "flower"),
}
MAX_SIDE = 512  # photos are reduced once, on loading, to at most this many px per side
_STREAM = 0x656D6264  # keeps evaluation-crop seeds apart from other uses of config.seed
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def _skimage(name: str) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top  (heavy; only for this source)

  return getattr(skimage.data, name)()


def _motorcycle(view: int) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top

  return skimage.data.stereo_motorcycle()[view]


def _sklearn(file_name: str) -> np.ndarray:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  return datasets.load_sample_image(file_name)


def _matplotlib(file_name: str) -> Image.Image:
  from matplotlib import cbook  # pylint: disable=g-import-not-at-top

  with cbook.get_sample_data(file_name) as f:
    image = Image.open(f)
    image.load()
    return image


LOADERS = {
  "astronaut": functools.partial(_skimage, "astronaut"),
  "chelsea": functools.partial(_skimage, "chelsea"),
  "coffee": functools.partial(_skimage, "coffee"),
  "rocket": functools.partial(_skimage, "rocket"),
  "hubble_deep_field": functools.partial(_skimage, "hubble_deep_field"),
  "immunohistochemistry": functools.partial(_skimage, "immunohistochemistry"),
  "retina": functools.partial(_skimage, "retina"),
  "motorcycle_left": functools.partial(_motorcycle, 0),
  "motorcycle_right": functools.partial(_motorcycle, 1),
  "china": functools.partial(_sklearn, "china.jpg"),
  "flower": functools.partial(_sklearn, "flower.jpg"),
  "grace_hopper": functools.partial(_matplotlib, "grace_hopper.jpg"),
}


@functools.cache
def photo(name: str) -> Image.Image:
  """Loads photo `name` once per process (cached) as an RGB Pillow image.

  Args:
    name: a key of `LOADERS`.

  Returns:
    The photo, RGB.
  """
  loaded = LOADERS[name]()
  if isinstance(loaded, np.ndarray):
    loaded = Image.fromarray(loaded)
  rgb = image_files.to_rgb(loaded)
  # Cropping a 1411 px photo costs 2-3x a 512 px one; even the smallest crop (8 % of the area)
  # of a 512 px photo still covers over 64 px, so the reduction loses nothing the model sees.
  rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
  rgb.load()
  return rgb


def random_crop(name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
  """A random resized crop of photo `name`.

  Args:
    name: photo name.
    rng: source of the crop's area, aspect and position.
    size: output side.

  Returns:
    uint8 [size, size, 3].
  """
  image = photo(name)
  box = image_files.random_resized_box(image.width, image.height, rng)
  return image_files.resize_box(image, box, size)


class _EvalImages:
  """Deterministic crop per example index (picklable, unlike a closure)."""

  def __init__(self, names: tuple[str, ...], seed: int, split_id: int, size: int):
    self._names, self._seed, self._split_id, self._size = names, seed, split_id, size

  def __call__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([_STREAM, self._seed % 2**63, self._split_id, int(index)])
    return random_crop(self._names[index % len(self._names)], rng, self._size)


def split_names(config) -> tuple[str, ...]:
  """Splits of this source (all three)."""
  del config
  return tuple(PHOTOS_BY_SPLIT)


def open_split(config, split: str) -> source_lib.SplitSource:
  """Opens one split; its records are photo names, each example a crop of one.

  Args:
    config: the experiment config (uses `seed`, `data.image_size`).
    split: train | validation | test.

  Returns:
    The split as a SplitSource with `num_examples=None` (infinitely many crops).
  """
  source_lib.check_split("embedded", split, tuple(PHOTOS_BY_SPLIT))
  names = PHOTOS_BY_SPLIT[split]
  size = config.data.image_size
  return source_lib.SplitSource(
    records=names,
    train_image=functools.partial(_train_crop, size=size),
    eval_image=_EvalImages(names, int(config.seed), _SPLIT_IDS[split], size),
    num_examples=None,
  )


def _train_crop(name: str, rng: np.random.Generator, *, size: int) -> np.ndarray:
  return random_crop(name, rng, size)
