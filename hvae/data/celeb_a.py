"""Data source `celeb_a`: TFDS's own CelebA builder, prepared as array_record, read at 64×64.

TFDS downloads CelebA from Google Drive, which is rate-limited and, offline, retries for
minutes. So before asking TFDS to prepare anything, `ensure_prepared` checks that the data is
either already prepared in `data_dir` or present in the manual directory, and otherwise fails at
once with instructions (set `config.data.celeb_a_download=True` to let TFDS try the download).

The files TFDS expects in the manual directory are the five of the builder's checksums.tsv
(tensorflow_datasets/datasets/celeb_a/checksums.tsv, TFDS 4.9.10): `MANUAL_FILES`.

Preprocessing happens at READ time, not in a derived prepared set: each aligned 178×218 (W×H)
image is centre-cropped to `config.data.celeb_a_crop` px (140 by default) and resized to 64×64
with Pillow's antialiased bicubic filter. This keeps the prepared data TFDS's own (other tools can
read it) and makes the crop a config choice that needs no re-preparation; it costs about a
millisecond per image (see benchmarks/input_pipeline.py).
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

from hvae import console
from hvae.data import image_files
from hvae.data import source as source_lib

NAME = "celeb_a"
SPLITS = ("train", "validation", "test")
MANUAL_FILES = (
  "img_align_celeba.zip",
  "list_eval_partition.txt",
  "identity_CelebA.txt",
  "list_attr_celeba.txt",
  "list_landmarks_align_celeba.txt",
)


def _builder(config):
  console.import_tensorflow()  # TFDS uses it; without its C++ start-up banner
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  return tfds.builder(NAME, data_dir=config.data.data_dir or None)


def manual_dir_of(config, builder) -> str:
  """The manual directory: `config.data.manual_dir`, else TFDS's `<data_dir>/downloads/manual`."""
  if config.data.manual_dir:
    return os.path.abspath(os.path.expanduser(config.data.manual_dir))
  # builder.data_dir is <data_dir>/celeb_a/<version>.
  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  return os.path.join(root, "downloads", "manual")


def missing_manual_files(manual_dir: str) -> list[str]:
  """The names of `MANUAL_FILES` absent from `manual_dir` (contents are not checked here)."""
  return [name for name in MANUAL_FILES if not os.path.isfile(os.path.join(manual_dir, name))]


def unavailable_message(data_dir: str, manual_dir: str, missing: list[str]) -> str:
  """The instructions shown when CelebA is neither prepared nor in the manual directory."""
  return (
    f"CelebA is not prepared in {data_dir} and {manual_dir} lacks {', '.join(missing)}.\n"
    "TFDS's Google Drive download is unreliable (and impossible offline), so it is not tried.\n"
    "To use CelebA:\n"
    "  1. download these five files from the CelebA page "
    "(https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, 'Align&Cropped Images' and 'Anno' / "
    "'Eval' folders):\n"
    + "".join(f"       {name}\n" for name in MANUAL_FILES)
    + f"  2. put them, unextracted, in {manual_dir} (or set --config.data.manual_dir=DIR);\n"
    "  3. run again: TFDS prepares array_record files once (~15 min), later runs reuse them.\n"
    "Or point --config.data.data_dir at a directory where celeb_a is already prepared, or set "
    "--config.data.celeb_a_download=True to let TFDS try the download, or use "
    "--config.data.source=embedded (no download)."
  )


def ensure_prepared(config):
  """Returns TFDS's celeb_a builder, prepared as array_record; fails fast when it cannot be.

  Args:
    config: the experiment config (uses `data.data_dir`, `data.manual_dir`,
      `data.celeb_a_download`).

  Returns:
    The prepared `tfds.core.DatasetBuilder`.

  Raises:
    source_lib.DataUnavailableError: not prepared, manual files missing and downloads off; or
      prepared in another file format than array_record.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _builder(config)
  if not builder.is_prepared():
    manual_dir = manual_dir_of(config, builder)
    missing = missing_manual_files(manual_dir)
    if missing and not config.data.get("celeb_a_download", False):
      raise source_lib.DataUnavailableError(
        unavailable_message(os.fspath(builder.data_dir), manual_dir, missing)
      )
    builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False),
    )
  fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if fmt != "array_record":
    raise source_lib.DataUnavailableError(
      f"celeb_a in {builder.data_dir} is prepared as {fmt}; random access needs array_record. "
      "Convert it with `tfds convert_format --dataset_version_dir="
      f"{builder.data_dir} --out_file_format=array_record` or prepare it again elsewhere."
    )
  return builder


def crop_resize(image: np.ndarray, crop: int, size: int) -> np.ndarray:
  """Centre crop of `crop` px, then antialiased resize: uint8 [H, W, 3] -> [size, size, 3]."""
  return image_files.centre_crop_resize(Image.fromarray(image), size, crop)


def _record_image(record: dict, rng: np.random.Generator, *, crop: int, size: int) -> np.ndarray:
  del rng
  return crop_resize(record["image"], crop, size)


def split_names(config) -> tuple[str, ...]:
  """The official splits."""
  del config
  return SPLITS


def num_examples(config, split: str) -> int:
  """Examples of a split, from the prepared dataset's metadata."""
  source_lib.check_split(NAME, split, SPLITS)
  return ensure_prepared(config).info.splits[split].num_examples


def open_split(config, split: str) -> source_lib.SplitSource:
  """Opens one official split, preparing CelebA first if its files are at hand.

  Args:
    config: the experiment config (also `data.celeb_a_crop`, `data.image_size`).
    split: train | validation | test.

  Returns:
    The split as a SplitSource over TFDS's array_record files, cropped at read time.
  """
  source_lib.check_split(NAME, split, SPLITS)
  records = ensure_prepared(config).as_data_source(split)
  to_image = functools.partial(
    _record_image, crop=int(config.data.celeb_a_crop), size=int(config.data.image_size)
  )
  return source_lib.SplitSource(
    records=records,
    train_image=to_image,
    eval_image=lambda index: to_image(records[index], None),
    num_examples=len(records),
  )
