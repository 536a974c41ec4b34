"""Data source `folder`: any directory tree of images, prepared once as a TFDS array_record set.

Preparation (`prepare(config)`):
1. Scan `config.data.path` recursively (hidden directories such as `.hvae_tfds` are skipped,
   symlinked directories are not followed) for files whose extension is one of `EXTENSIONS`;
   other files are ignored and listed in the report.
2. Fingerprint = SHA-256 of the absolute path, every candidate's relative path, size and
   modification time, and the preprocessing settings (`image_size`, `small_images`,
   `validation_fraction`, `FORMAT_VERSION`). A prepared dataset with that fingerprint is reused;
   any change (a file added, removed, touched or resized, a setting changed) rebuilds it and
   deletes the previous build of the same folder.
3. Decode every candidate BY CONTENT (a WEBP named .jpg is fine), in threads, convert it to RGB
   (see `hvae.data.images`: EXIF orientation, 16-bit scaling, alpha composited on white),
   centre-crop the largest square and resize it to 64×64. Images whose short side is under 64 px
   are upscaled or skipped (`config.data.small_images`). A file that fails is skipped and NAMED
   in a warning, with a count at the end; preparation never stops on a bad file.
4. Split by a hash of the relative path: a file is in `validation` when
   sha1(path) / 2^64 < `validation_fraction` (at least one file each side when there are two or
   more), so the split never changes when other files come and go. There is no `test` split.
5. Write with `tfds.dataset_builders.store_as_tfds_dataset` to
   `<cache>/hvae_image_folder/<fingerprint[:16]>/1.0.0`, where `<cache>` is `config.data.data_dir`
   when set, else `<path>/.hvae_tfds`. Each example is {"image": 64×64×3 PNG, "path": relative
   path}; `hvae_report.json` beside it records what was skipped and why.

Several processes must not prepare the same folder at once: on multi-host jobs prepare once
before launching (e.g. `hvae.data.folder.prepare(config)`), then every process reuses it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging

from hvae.data import images
from hvae.data import source as source_lib
from hvae.errors import ConfigError

EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
SMALL_IMAGE_POLICIES = ("upscale", "skip")
SPLITS = ("train", "validation")
FORMAT_VERSION = 1  # bump when preprocessing changes, so every prepared folder is rebuilt
BUILDER_NAME = "hvae_image_folder"
REPORT_FILE = "hvae_report.json"
_MAX_LISTED = 10  # ignored non-image files listed by name in the log


@dataclasses.dataclass
class Report:
  """What preparation did with each file.

  Attributes:
    path: the image folder (absolute).
    fingerprint: the build's fingerprint.
    split_sizes: examples per split.
    skipped: {relative path: reason} for image files left out (undecodable, too small).
    ignored: relative paths of files without an image extension.
    reused: True when an earlier build was reused (nothing was decoded this time).
  """

  path: str
  fingerprint: str
  split_sizes: dict[str, int]
  skipped: dict[str, str]
  ignored: list[str]
  reused: bool = False


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared folder: the TFDS variant directory and the preparation report."""

  directory: str
  report: Report


def scan(path: str) -> tuple[list[tuple[str, int, int]], list[str]]:
  """Lists the image files under `path`.

  Args:
    path: the folder.

  Returns:
    ([(relative path, size in bytes, mtime in ns)] sorted by path, [ignored relative paths]).
  """
  found, ignored = [], []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path).replace(os.sep, "/")
      if name.startswith("."):
        continue
      if os.path.splitext(name)[1].lower() not in EXTENSIONS:
        ignored.append(rel)
        continue
      stat = os.stat(full)
      found.append((rel, stat.st_size, stat.st_mtime_ns))
  return sorted(found), sorted(ignored)


def _settings(config) -> dict:
  small = config.data.small_images
  if small not in SMALL_IMAGE_POLICIES:
    raise ConfigError(
      f"data.small_images: {small!r} is not one of {', '.join(SMALL_IMAGE_POLICIES)}"
    )
  return {
    "image_size": int(config.data.image_size),
    "small_images": small,
    "validation_fraction": float(config.data.validation_fraction),
    "format_version": FORMAT_VERSION,
  }


def fingerprint(path: str, entries, settings: dict) -> str:
  """SHA-256 over the folder's identity, its file list (paths, sizes, mtimes) and the settings."""
  digest = hashlib.sha256(json.dumps([os.path.abspath(path), settings], sort_keys=True).encode())
  for rel, size, mtime in entries:
    digest.update(f"\0{rel}\0{size}\0{mtime}".encode())
  return digest.hexdigest()


def split_of(rel_path: str, validation_fraction: float) -> str:
  """The split of a file, from a hash of its relative path alone."""
  u = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:8], "big") / 2**64
  return "validation" if u < validation_fraction else "train"


def _preprocess(full_path: str, size: int, small_images: str) -> np.ndarray | str:
  """Returns uint8 [size, size, 3], or the reason the file is skipped."""
  try:
    image = images.decode_file(full_path)
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure = a bad file)
    return f"cannot decode ({type(e).__name__}: {e})"
  if min(image.size) < size and small_images == "skip":
    return f"smaller than {size} px ({image.width}x{image.height}; data.small_images='skip')"
  return images.centre_crop_resize(image, size)


def _assign_splits(good: list[str], fraction: float) -> dict[str, list[str]]:
  splits = {name: [] for name in SPLITS}
  for rel in good:
    splits[split_of(rel, fraction)].append(rel)
  # Tiny folders could hash every file to one side; evaluation needs both splits, so move the
  # file nearest the threshold (a deterministic choice).
  if len(good) >= 2 and fraction > 0:
    for empty, full in (("validation", "train"), ("train", "validation")):
      if not splits[empty]:
        moved = min(splits[full], key=lambda r: hashlib.sha1(r.encode()).digest())
        splits[full].remove(moved)
        splits[empty].append(moved)
  return splits


def _log_report(report: Report) -> None:
  if report.ignored:
    shown = ", ".join(report.ignored[:_MAX_LISTED])
    more = (
      f" and {len(report.ignored) - _MAX_LISTED} more" if len(report.ignored) > _MAX_LISTED else ""
    )
    logging.warning(
      "folder source: ignored %d non-image file(s) in %s: %s%s",
      len(report.ignored),
      report.path,
      shown,
      more,
    )
  total = sum(report.split_sizes.values()) + len(report.skipped)
  if report.skipped:
    logging.warning(
      "folder source: skipped %d of %d image file(s) in %s (named above)",
      len(report.skipped),
      total,
      report.path,
    )


def _variant_dir(cache: str, fp: str) -> str:
  return os.path.join(cache, BUILDER_NAME, fp[:16], "1.0.0")


def _prune_old_builds(cache: str, path: str, keep: str) -> None:
  """Deletes earlier builds of the same folder (other fingerprints) under `cache`."""
  root = os.path.join(cache, BUILDER_NAME)
  for name in os.listdir(root) if os.path.isdir(root) else ():
    report_file = os.path.join(root, name, "1.0.0", REPORT_FILE)
    if name == keep[:16] or not os.path.exists(report_file):
      continue
    with open(report_file) as f:
      if json.load(f).get("path") == path:
        logging.info("folder source: deleting stale build %s", os.path.join(root, name))
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prepare(config) -> Prepared:
  """Prepares (or reuses) the TFDS dataset of `config.data.path`.

  Args:
    config: the experiment config (uses `data.path`, `data.data_dir`, `data.image_size`,
      `data.small_images`, `data.validation_fraction`).

  Returns:
    The prepared dataset's directory and the report of skipped and ignored files.

  Raises:
    ConfigError: no folder given, or a bad `small_images` value.
    source_lib.DataUnavailableError: the folder does not exist.
    source_lib.DataUnavailableError: not a single image in the folder could be used.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  if not config.data.path:
    raise ConfigError("data.path: data.source='folder' needs data.path, the folder of images")
  path = os.path.abspath(os.path.expanduser(config.data.path))
  if not os.path.isdir(path):
    raise source_lib.DataUnavailableError(f"data.path: {path} is not a directory")
  settings = _settings(config)
  entries, ignored = scan(path)
  fp = fingerprint(path, entries, settings)
  cache = os.path.abspath(
    os.path.expanduser(config.data.data_dir or os.path.join(path, ".hvae_tfds"))
  )
  directory = _variant_dir(cache, fp)
  report_file = os.path.join(directory, REPORT_FILE)
  if os.path.exists(os.path.join(directory, "dataset_info.json")) and os.path.exists(report_file):
    with open(report_file) as f:
      report = Report(**{**json.load(f), "reused": True})
    logging.info("folder source: reusing %s (%s)", directory, report.split_sizes)
    return Prepared(directory, report)

  size, small = settings["image_size"], settings["small_images"]
  logging.info(
    "folder source: preparing %d image file(s) from %s into %s", len(entries), path, directory
  )
  os.makedirs(cache, exist_ok=True)
  skipped = {}
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    # Preprocessed pixels go to a memory map, not RAM, so folders of any size fit; decoding
    # happens once, before the splits are known, because TFDS rejects an empty split.
    pixels = np.lib.format.open_memmap(
      os.path.join(tmp, "pixels.npy"),
      mode="w+",
      dtype=np.uint8,
      shape=(max(len(entries), 1), size, size, 3),
    )
    row = {}
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      results = pool.map(lambda e: _preprocess(os.path.join(path, e[0]), size, small), entries)
      for i, ((rel, _, _), result) in enumerate(zip(entries, results)):
        if isinstance(result, str):
          logging.warning("folder source: skipping %s: %s", rel, result)
          skipped[rel] = result
        else:
          pixels[i] = result
          row[rel] = i
    splits = _assign_splits(sorted(row), settings["validation_fraction"])
    splits = {name: rels for name, rels in splits.items() if rels}
    if not splits:
      raise source_lib.DataUnavailableError(
        f"data.path: no usable image in {path} ({len(entries)} image file(s), "
        f"{len(skipped)} skipped, {len(ignored)} non-image file(s) ignored)"
      )

    def examples(rels, pixels=pixels):
      for rel in rels:
        yield rel, {"image": np.asarray(pixels[row[rel]]), "path": rel}

    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
        "path": tfds.features.Text(),
      }
    )
    tfds.dataset_builders.store_as_tfds_dataset(
      name=BUILDER_NAME,
      version="1.0.0",
      config=fp[:16],
      features=features,
      split_datasets={name: examples(rels) for name, rels in splits.items()},
      data_dir=cache,
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      description=f"Images of {path}, centre-cropped and resized to {size}x{size}.",
    )
    del pixels
  report = Report(
    path=path,
    fingerprint=fp,
    skipped=skipped,
    ignored=ignored,
    split_sizes={name: len(rels) for name, rels in splits.items()},
  )
  with open(report_file, "w") as f:
    json.dump(dataclasses.asdict(report), f, indent=1)
  _log_report(report)
  _prune_old_builds(cache, path, keep=fp)
  return Prepared(directory, report)


def _record_image(record: dict, rng: np.random.Generator) -> np.ndarray:
  del rng
  return record["image"]


def split_names(config) -> tuple[str, ...]:
  """Splits of this source: train and validation (a folder has no test split)."""
  del config
  return SPLITS


def open_split(config, split: str) -> source_lib.SplitSource:
  """Prepares the folder if needed and opens one split.

  Args:
    config: the experiment config.
    split: train | validation.

  Returns:
    The split as a SplitSource over the prepared array_record files.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source_lib.check_split("folder", split, SPLITS)
  prepared = prepare(config)
  if split not in prepared.report.split_sizes:
    raise source_lib.DataUnavailableError(
      f"folder source: {prepared.report.path} has no {split} images "
      f"({prepared.report.split_sizes}); add images or change data.validation_fraction"
    )
  records = tfds.builder_from_directory(prepared.directory).as_data_source(split)
  return source_lib.SplitSource(
    records=records,
    train_image=_record_image,
    eval_image=lambda index: records[index]["image"],
    num_examples=len(records),
  )
