"""Data source `folder`: any directory tree of images, prepared once as a TFDS array_record set.

Why one file past ~350 lines: preparation is one pipeline (scan, fingerprint, decode, split,
write, report) whose steps share the fingerprint and the `Report`; decoding itself is
hvae/data/image_files.py.

Preparation (`prepare(config)`; `prepare(config, "eval_path")` for the held-out folder):
1. Scan `config.data.path` recursively (hidden directories are skipped, symlinked directories
   are not followed) for files whose extension is one of `EXTENSIONS` (every extension Pillow
   registers a decoder for, PNM `.pgm/.ppm/.pbm/.pnm` included); other files are ignored and
   listed in the report.
2. Fingerprint = SHA-256 of the absolute path, every candidate's relative path, size and
   modification time, and the preprocessing settings (`image_size`, `small_images`, how the
   folder is split, `FORMAT_VERSION`). A prepared dataset with that fingerprint is reused; any
   change (a file added, removed, touched or resized, a setting changed) rebuilds it and deletes
   the previous build of the same folder.
3. Decode every candidate BY CONTENT (a WEBP named .jpg is fine), in threads, convert it to RGB
   (see `hvae.data.image_files`: EXIF orientation, 16-bit scaling, alpha composited on white),
   centre-crop the largest square and resize it to 64×64. Images whose short side is under 64 px
   are upscaled or skipped (`config.data.small_images`). A file that fails is skipped and NAMED
   in a warning, with a count at the end; preparation never stops on a bad file.
4. Split. With `data.eval_path` set, every image of `data.path` is `train` and every image of
   `data.eval_path` is `validation` (each folder its own prepared dataset; an `eval_path` inside
   `data.path` is left out of the training scan). Otherwise by a hash of each file's group: a
   file is in `validation` when sha1(group) / 2^64 < `validation_fraction` (at least one group
   each side when there are two or more), so the split never changes when other files come and
   go. The group is the file's relative path, or with `data.split_by` the first group of that
   regular expression searched in the relative path without its extension (`group_of`), so all
   pictures of one person land on one side. There is no `test` split.
5. Write with `tfds.dataset_builders.store_as_tfds_dataset` to
   `<cache>/hvae_image_folder/<fingerprint[:16]>/1.0.0`, where `<cache>` is `config.data.data_dir`
   when set, else `default_cache_dir()` (`$XDG_CACHE_HOME/hvae/datasets`, by default
   `~/.cache/hvae/datasets`): nothing is written into the image folder, which may be read-only.
   Each example is {"image": 64×64×3 PNG, "path": relative path}; `hvae_report.json` beside it
   records what was skipped and why.

Several processes must not prepare the same folder at once: on multi-host jobs prepare once
before launching (e.g. `hvae.data.folder.prepare(config)`), then every process reuses it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time

import numpy as np
from absl import logging

from hvae import console
from hvae.data import image_files
from hvae.data import source as source_lib
from hvae.errors import ConfigError

_COMMON = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".pgm",
           ".ppm", ".pbm", ".pnm")
_NOT_DECODED = ("MPEG",)  # Pillow identifies these files but cannot decode their pixels


def _pillow_extensions() -> tuple[str, ...]:
  """Every file extension of a format Pillow can open (stub plugins excluded), plus `_COMMON`."""
  from PIL import Image, ImageFile  # pylint: disable=g-import-not-at-top

  Image.init()
  def decodes(fmt: str) -> bool:
    if fmt == "MPO":  # opened through the JPEG plugin
      return True
    factory = Image.OPEN.get(fmt, (None,))[0]
    if factory is None or fmt in _NOT_DECODED:
      return False
    return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
  found = {ext.lower() for ext, fmt in Image.registered_extensions().items() if decodes(fmt)}
  return tuple(sorted(found | set(_COMMON)))


EXTENSIONS = _pillow_extensions()  # lower case, with the dot
SMALL_IMAGE_POLICIES = ("upscale", "skip")
SPLITS = ("train", "validation")
FORMAT_VERSION = 1  # bump when preprocessing changes, so every prepared folder is rebuilt
BUILDER_NAME = "hvae_image_folder"
REPORT_FILE = "hvae_report.json"
_MAX_LISTED = 10  # ignored non-image files listed by name in the log
ROLES = {"path": "train", "eval_path": "validation"}  # config key -> its split with eval_path
_announced: set[str] = set()  # builds already named in this process's log


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


def scan(path: str, exclude: str | None = None) -> tuple[list[tuple[str, int, int]], list[str]]:
  """Lists the image files under `path`.

  Args:
    path: the folder.
    exclude: an absolute directory under `path` left out with everything below it (the
      held-out `data.eval_path` when it lies inside `data.path`).

  Returns:
    ([(relative path, size in bytes, mtime in ns)] sorted by path, [ignored relative paths]).
  """
  found, ignored = [], []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs
                     if not d.startswith(".") and os.path.join(root, d) != exclude)
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
  """The preprocessing settings every build depends on (the split is added per folder)."""
  small = config.data.small_images
  if small not in SMALL_IMAGE_POLICIES:
    raise ConfigError(
      f"data.small_images: {small!r} is not one of {', '.join(SMALL_IMAGE_POLICIES)}"
    )
  return {
    "image_size": int(config.data.image_size),
    "small_images": small,
    "format_version": FORMAT_VERSION,
  }


def split_pattern(pattern: str) -> str:
  """Checks `data.split_by`: "" (split file by file) or a regular expression with a group.

  Args:
    pattern: the value of `data.split_by`.

  Returns:
    `pattern`, unchanged.

  Raises:
    ConfigError: naming `data.split_by`, when `pattern` does not compile or has no group.
  """
  if not pattern:
    return ""
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"data.split_by: {pattern!r} is not a regular expression ({e})") from None
  if compiled.groups < 1:
    raise ConfigError(f"data.split_by: {pattern!r} has no (group) naming a file's group, "
                      r"e.g. '(.+)_\d+$' for Name_0003.jpg")
  return pattern


def group_of(rel_path: str, pattern: str) -> str:
  """The split key of a file.

  Args:
    rel_path: the file's path relative to the folder, "/"-separated.
    pattern: `data.split_by` ("" = none).

  Returns:
    The first group of `pattern` searched in `rel_path` without its extension (so
    "lfw/Ann_Lee/Ann_Lee_0002.jpg" gives "lfw/Ann_Lee/Ann_Lee" for r"(.+)_\\d+$"), or `rel_path`
    itself when there is no pattern, it does not match, or its first group is empty or unset.
  """
  if not pattern:
    return rel_path
  found = re.search(pattern, os.path.splitext(rel_path)[0])
  return found.group(1) if found and found.group(1) else rel_path


def fingerprint(path: str, entries, settings: dict) -> str:
  """SHA-256 over the folder's identity, its file list (paths, sizes, mtimes) and the settings."""
  digest = hashlib.sha256(json.dumps([os.path.abspath(path), settings], sort_keys=True).encode())
  for rel, size, mtime in entries:
    digest.update(f"\0{rel}\0{size}\0{mtime}".encode())
  return digest.hexdigest()


def _hash_fraction(key: str) -> float:
  return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


def split_of(rel_path: str, validation_fraction: float, split_by: str = "") -> str:
  """The split of a file, from a hash of its group (`group_of`; by default its relative path)."""
  u = _hash_fraction(group_of(rel_path, split_by))
  return "validation" if u < validation_fraction else "train"


def _preprocess(full_path: str, size: int, small_images: str) -> np.ndarray | str:
  """Returns uint8 [size, size, 3], or the reason the file is skipped."""
  try:
    image = image_files.decode_file(full_path)
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure = a bad file)
    return f"cannot decode ({type(e).__name__}: {e})"
  if min(image.size) < size and small_images == "skip":
    return f"smaller than {size} px ({image.width}x{image.height}; data.small_images='skip')"
  return image_files.centre_crop_resize(image, size)


def _assign_splits(good: list[str], fraction: float, split_by: str = "") -> dict[str, list[str]]:
  """Splits files by the hash of their group; every group lands on one side."""
  groups: dict[str, list[str]] = {}
  for rel in good:
    groups.setdefault(group_of(rel, split_by), []).append(rel)
  side = {key: "validation" if _hash_fraction(key) < fraction else "train" for key in groups}
  # Tiny folders could hash every group to one side; evaluation needs both splits, so move one
  # whole group (the one with the smallest hash: a deterministic choice).
  if len(groups) >= 2 and fraction > 0:
    for empty, full in (("validation", "train"), ("train", "validation")):
      if empty not in side.values():
        moved = min((k for k, s in side.items() if s == full),
                    key=lambda k: hashlib.sha1(k.encode()).digest())
        side[moved] = empty
  splits = {name: [] for name in SPLITS}
  for key, rels in groups.items():
    splits[side[key]].extend(rels)
  return {name: sorted(rels) for name, rels in splits.items()}


def held_out_files(config) -> tuple[str, list[str]]:
  """The files of `data.path` on the validation side of a run's split, exactly as training
  assigns them: the folder is prepared (or its build reused, as a training run would), and the
  split is made of the files that decoded, like the build's.

  Returns:
    (the folder, the files' relative paths in name order).

  Raises:
    ConfigError: `data.path` unset, or `data.eval_path` set (then the held-out photos are that
      folder already).
    source_lib.DataUnavailableError: the folder does not exist or has no usable image.
  """
  if config.data.get("eval_path", ""):
    raise ConfigError(f"data.eval_path: the held-out photos are that folder "
                      f"({config.data.eval_path}); nothing is split out of data.path")
  prepared = prepare(config)
  entries, _ = scan(prepared.report.path)
  good = [rel for rel, _, _ in entries if rel not in prepared.report.skipped]
  splits = _assign_splits(good, float(config.data.validation_fraction),
                          split_pattern(config.data.get("split_by", "")))
  return prepared.report.path, splits["validation"]


def _log_groups(good: list[str], split_by: str, splits: dict[str, list[str]]) -> None:
  """One line on how `data.split_by` grouped the files (a warning when it matched none)."""
  if not split_by or not good:
    return
  unmatched = [rel for rel in good if group_of(rel, split_by) == rel]
  count = lambda rels: len({group_of(r, split_by) for r in rels})  # noqa: E731
  if len(unmatched) == len(good):
    logging.warning("folder source: data.split_by '%s' matched no file name (e.g. %s); files are "
                    "split one by one", split_by, good[0])
    return
  logging.info("folder source: data.split_by '%s': %d groups (train %d, validation %d)%s",
               split_by, count(good), count(splits.get("train", [])),
               count(splits.get("validation", [])),
               f"; {len(unmatched)} file(s) matched no group and are split one by one (e.g. "
               f"{unmatched[0]})" if unmatched else "")


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


def default_cache_dir() -> str:
  """Where prepared folders go without `data.data_dir`: `$XDG_CACHE_HOME/hvae/datasets`.

  `XDG_CACHE_HOME` counts only when it is an absolute path (the XDG rule); else `~/.cache`.
  """
  base = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(base):
    base = os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hvae", "datasets")


def cache_dir(config) -> str:
  """The directory prepared folders are written to: `data.data_dir`, else the user cache."""
  return os.path.abspath(os.path.expanduser(config.data.data_dir or default_cache_dir()))


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


def _folder(config, key: str) -> str:
  """`data.path` or `data.eval_path`, absolute; fails naming the key when it is not a folder."""
  value = config.data.get(key, "")
  if not value:
    raise ConfigError(f"data.{key}: data.source='folder' needs data.{key}, the folder of images")
  path = os.path.abspath(os.path.expanduser(value))
  if not os.path.isdir(path):
    raise source_lib.DataUnavailableError(f"data.{key}: {path} is not a directory")
  return path


def _inside(child: str, parent: str) -> bool:
  return os.path.commonpath([child, parent]) == parent


def _plan(config, which: str) -> tuple[str, dict, str | None]:
  """(folder, settings, excluded subfolder) of the build of `data.<which>`."""
  settings = _settings(config)
  split_by = split_pattern(config.data.get("split_by", ""))
  if not config.data.get("eval_path", ""):
    if which != "path":
      raise ConfigError("data.eval_path: not set (the held-out split is hashed out of data.path)")
    settings["validation_fraction"] = float(config.data.validation_fraction)
    if split_by:  # only when set, so builds from before split_by existed stay valid
      settings["split_by"] = split_by
    return _folder(config, "path"), settings, None
  train, held_out = _folder(config, "path"), _folder(config, "eval_path")
  real_train, real_held_out = os.path.realpath(train), os.path.realpath(held_out)  # via links
  if _inside(real_train, real_held_out):
    raise ConfigError(f"data.eval_path: {held_out} contains data.path ({train}); held-out images "
                      "would be training images")
  settings["split"] = ROLES[which]  # every image of the folder in one split
  if which == "eval_path":
    return held_out, settings, None
  if _inside(real_held_out, real_train):  # leave the held-out images out of training
    rel = os.path.relpath(real_held_out, real_train)
    settings["exclude"] = rel.replace(os.sep, "/")
    return train, settings, os.path.join(train, rel)
  return train, settings, None


def prepare(config, which: str = "path") -> Prepared:
  """Prepares (or reuses) the TFDS dataset of `config.data.path` (or `data.eval_path`).

  Args:
    config: the experiment config (uses `data.path`, `data.eval_path`, `data.data_dir`,
      `data.image_size`, `data.small_images`, `data.validation_fraction`, `data.split_by`).
    which: "path" (the training folder, split by hash unless `data.eval_path` is set) or
      "eval_path" (the held-out folder: every image in `validation`).

  Returns:
    The prepared dataset's directory and the report of skipped and ignored files.

  Raises:
    ConfigError: no folder given, a bad `small_images` or `split_by`, or an `eval_path` that
      contains `data.path`.
    source_lib.DataUnavailableError: the folder does not exist.
    source_lib.DataUnavailableError: not a single image in the folder could be used.
  """
  if which not in ROLES:
    raise ValueError(f"which: {which!r} is not one of {', '.join(ROLES)}")
  path, settings, exclude = _plan(config, which)
  entries, ignored = scan(path, exclude)
  fp = fingerprint(path, entries, settings)
  cache = cache_dir(config)
  directory = _variant_dir(cache, fp)
  prepared = _reuse(path, directory)
  if prepared is not None:
    return prepared
  # Two runs on the same folder (a sweep's points started together, two seeds) build it once:
  # the second waits for the first's build and reuses it (TFDS's final rename would fail).
  lock_path = os.path.join(cache, BUILDER_NAME, fp[:16] + ".lock")
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  with open(lock_path, "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("folder source: another process is preparing %s; waiting for it", path)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      prepared = _reuse(path, directory)
      if prepared is not None:
        return prepared
      return _build(which, path, settings, entries, ignored, exclude, fp, cache, directory)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _reuse(path: str, directory: str) -> Prepared | None:
  """The finished build in `directory` (its dataset_info.json and report written), or None."""
  report_file = os.path.join(directory, REPORT_FILE)
  if not (os.path.exists(os.path.join(directory, "dataset_info.json"))
          and os.path.exists(report_file)):
    return None
  with open(report_file) as f:
    report = Report(**{**json.load(f), "reused": True})
  if directory not in _announced:  # once per process, not at every split opened
    _announced.add(directory)
    logging.info("folder source: %s, prepared earlier (%s) in %s", path,
                 _sizes(report.split_sizes), directory)
  return Prepared(directory, report)


def _sizes(split_sizes: dict[str, int]) -> str:
  return ", ".join(f"{name} {n}" for name, n in split_sizes.items())


def _build(which, path, settings, entries, ignored, exclude, fp, cache, directory) -> Prepared:
  """Decodes, splits and writes one folder (see the module docstring)."""
  console.import_tensorflow()  # TFDS uses it; without its C++ start-up banner
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  start = time.perf_counter()
  size, small = settings["image_size"], settings["small_images"]
  what = f" (all {settings['split']})" if "split" in settings else ""
  left_out = f", leaving out {exclude}" if exclude else ""
  logging.info("folder source: preparing %d images from %s%s%s into %s ...", len(entries), path,
               what, left_out, directory)
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
    good = sorted(row)
    if "split" in settings:
      splits = {settings["split"]: good}
    else:
      split_by = settings.get("split_by", "")
      splits = _assign_splits(good, settings["validation_fraction"], split_by)
      _log_groups(good, split_by, splits)
    splits = {name: rels for name, rels in splits.items() if rels}
    if not splits:
      raise source_lib.DataUnavailableError(
        f"data.{which}: no usable image in {path} ({len(entries)} image file(s), "
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
    # TFDS prints a "Downloading and preparing dataset" banner and progress bars to the
    # console; for a local folder they mislead, so they go nowhere (our own line is above).
    with _tfds_quiet(tfds):
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
  with open(os.path.join(directory, REPORT_FILE), "w") as f:
    json.dump(dataclasses.asdict(report), f, indent=1)
  _log_report(report)
  _prune_old_builds(cache, path, keep=fp)
  _announced.add(directory)
  logging.info("folder source: done in %.1f s: %s%s", time.perf_counter() - start,
               _sizes(report.split_sizes), f" ({len(skipped)} skipped)" if skipped else "")
  return Prepared(directory, report)


@contextlib.contextmanager
def _tfds_quiet(tfds):
  """TFDS's progress bars off and its stdout banners swallowed, for the duration."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

  was_active = getattr(tqdm_utils, "_active", True)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(was_active)


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
    split: train | validation (from `data.eval_path` when it is set).

  Returns:
    The split as a SplitSource over the prepared array_record files.
  """
  console.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source_lib.check_split("folder", split, SPLITS)
  held_out = bool(config.data.get("eval_path", ""))
  prepared = prepare(config, "eval_path" if held_out and split == "validation" else "path")
  if split not in prepared.report.split_sizes:
    remedy = ("add images" if held_out else
              "add images, change data.validation_fraction or data.split_by, or set "
              "data.eval_path to a folder of held-out images")
    raise source_lib.DataUnavailableError(
      f"folder source: {prepared.report.path} has no {split} images "
      f"({_sizes(prepared.report.split_sizes)}); {remedy}"
    )
  records = tfds.builder_from_directory(prepared.directory).as_data_source(split)
  return source_lib.SplitSource(
    records=records,
    train_image=_record_image,
    eval_image=lambda index: records[index]["image"],
    num_examples=len(records),
  )
