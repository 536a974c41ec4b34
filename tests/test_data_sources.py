"""Tests of the data sources: synthetic, embedded, folder (every odd file kind) and celeb_a.

Why one file past ~350 lines: the four sources are held to one contract (`SplitSource`),
checked side by side here; the pipeline over them is tests/test_data_pipeline.py.
"""

import logging
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from experiments import base
from hvae import data
from hvae.data import celeb_a, embedded, folder, image_files, synthetic
from hvae.data import source as source_lib
from hvae.errors import ConfigError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(autouse=True, scope="module")
def _cache_in_tmp(tmp_path_factory):
  """Prepared folders go to a temporary cache, never the real ~/.cache/hvae/datasets."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    yield


def _config(**data):
  config = base.get_config()
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def _check_image(image):
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_synthetic_is_deterministic_and_in_range(split):
  source = synthetic.open_split(_config(), split)
  assert source.num_examples == synthetic.SIZES[split]
  first = source.eval_image(5)
  _check_image(first)
  np.testing.assert_array_equal(first, source.eval_image(5))
  assert first.std() > 5  # gradients and shapes, not a flat fill
  assert not np.array_equal(first, source.eval_image(6))


def test_embedded_photos_load_offline_and_splits_are_disjoint():
  splits = embedded.PHOTOS_BY_SPLIT
  names = [n for s in splits.values() for n in s]
  assert len(names) == len(set(names)) == len(embedded.LOADERS)
  assert {"motorcycle_left", "motorcycle_right"} <= set(splits["train"])
  for name in names:
    photo = embedded.photo(name)
    assert photo.mode == "RGB" and min(photo.size) >= 256 and max(photo.size) <= 512
  pixels = {s: {np.asarray(embedded.photo(n)).tobytes() for n in ns} for s, ns in splits.items()}
  assert not pixels["train"] & pixels["validation"]
  assert not pixels["train"] & pixels["test"]
  assert not pixels["validation"] & pixels["test"]


def test_embedded_crops():
  config = _config()
  source = embedded.open_split(config, "validation")
  assert source.num_examples is None
  a = source.eval_image(3)
  _check_image(a)
  np.testing.assert_array_equal(a, source.eval_image(3))
  train = embedded.open_split(config, "train")
  crops = [train.train_image(train.records[0], np.random.default_rng(i)) for i in range(4)]
  assert len({c.tobytes() for c in crops}) == 4


# ---- folder --------------------------------------------------------------------------------------


def _save(image, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


def _half_and_half(width, height, left, right):
  a = np.zeros((height, width, 3), np.uint8)
  a[:, : width // 2] = left
  a[:, width // 2 :] = right
  return Image.fromarray(a)


def make_odd_tree(root):
  """Writes one file of every awkward kind under `root`; returns the names expected to fail."""
  _save(Image.new("RGB", (100, 80), (200, 30, 30)), f"{root}/rgb.jpg", quality=98)
  _save(Image.new("L", (70, 70), 77), f"{root}/sub/grey.png")
  palette = Image.new("P", (64, 64), 3)
  palette.putpalette([0, 0, 0] * 3 + [10, 200, 50] + [0, 0, 0] * 252)
  _save(palette, f"{root}/sub/palette.gif")
  rgba = np.zeros((64, 64, 4), np.uint8)
  rgba[:, :32] = (255, 0, 0, 255)  # opaque red left half
  rgba[:, 32:] = (0, 0, 255, 0)  # fully transparent right half (stored blue)
  _save(Image.fromarray(rgba, "RGBA"), f"{root}/rgba.png")
  _save(Image.fromarray(np.full((64, 64), 257 * 100, np.uint16)), f"{root}/deep/grey16.png")
  _save(Image.fromarray(np.full((64, 80), 257 * 200, np.uint16)), f"{root}/deep/grey16.tif")
  _save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), f"{root}/cmyk.jpg", quality=98)
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
  _save(_half_and_half(80, 64, RED, BLUE), f"{root}/rotated.jpg", quality=98, exif=exif)
  _save(Image.new("RGB", (90, 64), (0, 0, 255)), f"{root}/blue.bmp")
  _save(Image.new("RGB", (20, 20), (0, 255, 0)), f"{root}/tiny.png")
  _save(
    Image.new("RGB", (64, 64), (250, 250, 10)),
    f"{root}/webp_named.jpg",
    format="WEBP",
    lossless=True,
  )
  _save(
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)),
    f"{root}/truncated.jpg",
    quality=90,
  )
  with open(f"{root}/truncated.jpg", "r+b") as f:
    f.truncate(os.path.getsize(f"{root}/truncated.jpg") // 2)
  with open(f"{root}/notes.txt", "w") as f:
    f.write("not an image")
  with open(f"{root}/empty.png", "wb"):
    pass
  return {"truncated.jpg", "empty.png"}


def _read_all(prepared):
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(prepared.directory)
  out = {}
  for split in prepared.report.split_sizes:
    for record in builder.as_data_source(split):
      path = record["path"]
      out[path.decode() if isinstance(path, bytes) else path] = record["image"]
  return out


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("odd"))
  bad = make_odd_tree(root)
  return root, bad


def test_folder_loads_every_good_kind_and_names_the_bad(odd_tree, caplog):
  root, bad = odd_tree
  caplog.set_level(logging.WARNING)
  caplog.set_level(logging.WARNING, logger="absl")  # absl's own level
  prepared = folder.prepare(_config(source="folder", path=root))
  report = prepared.report
  assert not report.reused
  assert set(report.skipped) == bad
  assert report.ignored == ["notes.txt"]
  for name in bad:
    assert name in caplog.text
  assert "skipped 2 of 13" in caplog.text
  got = _read_all(prepared)
  assert set(got) == {
    "rgb.jpg",
    "sub/grey.png",
    "sub/palette.gif",
    "rgba.png",
    "deep/grey16.png",
    "deep/grey16.tif",
    "cmyk.jpg",
    "rotated.jpg",
    "blue.bmp",
    "tiny.png",
    "webp_named.jpg",
  }
  assert sum(report.split_sizes.values()) == 11 and min(report.split_sizes.values()) >= 1
  for image in got.values():
    _check_image(image)
  np.testing.assert_array_equal(got["sub/grey.png"], np.full((64, 64, 3), 77))
  np.testing.assert_array_equal(got["sub/palette.gif"], np.full((64, 64, 3), (10, 200, 50)))
  np.testing.assert_array_equal(got["rgba.png"][:, :30], np.full((64, 30, 3), RED))
  np.testing.assert_array_equal(got["rgba.png"][:, 34:], np.full((64, 30, 3), WHITE))
  np.testing.assert_array_equal(got["deep/grey16.png"], np.full((64, 64, 3), 100))
  np.testing.assert_array_equal(got["deep/grey16.tif"], np.full((64, 64, 3), 200))
  np.testing.assert_array_equal(got["webp_named.jpg"], np.full((64, 64, 3), (250, 250, 10)))
  np.testing.assert_array_equal(got["tiny.png"], np.full((64, 64, 3), (0, 255, 0)))
  assert np.abs(got["rgb.jpg"].astype(int) - (200, 30, 30)).max() <= 6
  assert np.abs(got["cmyk.jpg"].astype(int) - RED).max() <= 6
  assert np.abs(got["blue.bmp"].astype(int) - BLUE).max() == 0
  # EXIF orientation 6: the stored left (red) half is displayed on top.
  rotated = got["rotated.jpg"].astype(int)
  assert np.abs(rotated[4:26].mean((0, 1)) - RED).max() < 10
  assert np.abs(rotated[38:60].mean((0, 1)) - BLUE).max() < 10


def test_folder_small_images_skip_names_them(tmp_path):
  root = str(tmp_path / "imgs")
  for i in range(3):
    _save(Image.new("RGB", (70, 64), (i, i, i)), f"{root}/ok{i}.png")
  _save(Image.new("RGB", (20, 30), 0), f"{root}/tiny.png")
  report = folder.prepare(_config(source="folder", path=root, small_images="skip")).report
  assert list(report.skipped) == ["tiny.png"] and "smaller than 64 px" in report.skipped["tiny.png"]
  with pytest.raises(ValueError, match="upscale, skip"):
    folder.prepare(_config(source="folder", path=root, small_images="crop"))


def test_folder_rebuilds_only_when_files_change(tmp_path):
  root = str(tmp_path / "imgs")
  for i in range(4):
    _save(Image.new("RGB", (64, 64), (10 * i, 0, 0)), f"{root}/a{i}.png")
  config = _config(source="folder", path=root, data_dir=str(tmp_path / "cache"))
  first = folder.prepare(config)
  assert not first.report.reused
  again = folder.prepare(config)
  assert again.report.reused and again.directory == first.directory
  os.utime(f"{root}/a0.png", ns=(1, 1))  # touched: new mtime, same content
  touched = folder.prepare(config)
  assert not touched.report.reused and touched.directory != first.directory
  assert not os.path.exists(os.path.dirname(first.directory))  # the stale build is deleted
  _save(Image.new("RGB", (64, 64), (0, 0, 99)), f"{root}/new.png")
  added = folder.prepare(config)
  assert not added.report.reused and sum(added.report.split_sizes.values()) == 5
  config.data.validation_fraction = 0.5  # a preprocessing setting is part of the fingerprint
  assert not folder.prepare(config).report.reused


def test_two_runs_preparing_one_folder_at_once_build_it_once(tmp_path):
  """Two seeds or sweep points started together on a new folder: one builds, the other waits
  for it and reuses the build (without the lock, the second's final rename failed with
  FileExistsError). Threads stand in for processes: each takes the lock through its own open
  file, which flock treats like another process's."""
  root = _tree(tmp_path / "imgs", [f"p{i}.png" for i in range(6)])
  config = _config(source="folder", path=root, data_dir=str(tmp_path / "cache"))
  start = threading.Barrier(2)
  results, failures = [], []

  def run():
    start.wait()
    try:
      results.append(folder.prepare(config))
    except Exception as e:  # pylint: disable=broad-except  (reported below)
      failures.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not failures, failures
  assert len({r.directory for r in results}) == 1
  assert sorted(r.report.reused for r in results) == [False, True]


def test_folder_split_is_a_stable_hash_of_the_path():
  names = [f"dir/img_{i}.jpg" for i in range(2000)]
  val = [n for n in names if folder.split_of(n, 0.1) == "validation"]
  assert 150 < len(val) < 250
  assert val == [n for n in names if folder.split_of(n, 0.1) == "validation"]


def test_folder_without_images_fails_clearly(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(source_lib.DataUnavailableError, match="no usable image"):
    folder.prepare(_config(source="folder", path=str(tmp_path)))


def _tree(root, names, size=(64, 64)):
  """Writes a small distinct PNG for each relative name under `root`; returns str(root)."""
  for i, name in enumerate(names):
    _save(Image.new("RGB", size, (i % 256, (7 * i) % 256, 100)), os.path.join(str(root), name))
  return str(root)


def _snapshot(root):
  """Every path under `root` with its size and mtime: equal snapshots = nothing written."""
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for name in dirs + files:
      stat = os.stat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (stat.st_size, stat.st_mtime_ns)
  return out


def _paths_of(config, split):
  source = folder.open_split(config, split)
  paths = [source.records[i]["path"] for i in range(source.num_examples)]
  return sorted(p.decode() if isinstance(p, bytes) else p for p in paths)


# ---- folder: data.split_by -----------------------------------------------------------------------

LFW_PATTERN = r"(.+)_\d+$"


def test_split_by_groups_never_straddle_the_split():
  people = [f"Person_{i}" for i in range(300)]
  names = [f"{p}_{k:04d}.png" for j, p in enumerate(people) for k in range(1, 2 + j % 4)]
  assert folder.group_of("Ann_Lee_0002.png", LFW_PATTERN) == "Ann_Lee"
  assert folder.group_of("lfw/Ann_Lee/Ann_Lee_0002.jpg", LFW_PATTERN) == "lfw/Ann_Lee/Ann_Lee"
  side = {}
  for name in names:
    side.setdefault(folder.group_of(name, LFW_PATTERN), set()).add(
      folder.split_of(name, 0.2, LFW_PATTERN))
  assert len(side) == len(people) and all(len(s) == 1 for s in side.values())
  held = sum("validation" in s for s in side.values())
  assert 30 < held < 90  # ~20 % of the groups
  # Without split_by the same files straddle: that is what split_by is for.
  by_file = {}
  for name in names:
    by_file.setdefault(folder.group_of(name, LFW_PATTERN), set()).add(folder.split_of(name, 0.2))
  assert any(len(s) == 2 for s in by_file.values())


def test_split_by_tiny_folder_moves_a_whole_group():
  names = [f"{p}_{k:04d}.png" for p in ("Ann", "Bob") for k in range(1, 4)]
  for fraction in (1e-12, 1 - 1e-12):  # every group hashes to one side; one group is moved
    splits = folder._assign_splits(names, fraction, LFW_PATTERN)  # pylint: disable=protected-access
    assert sorted(len(v) for v in splits.values()) == [3, 3]
    for rels in splits.values():
      assert len({folder.group_of(r, LFW_PATTERN) for r in rels}) == 1
  one_group = [f"Ann_{k:04d}.png" for k in range(1, 4)]
  splits = folder._assign_splits(one_group, 0.5, LFW_PATTERN)  # pylint: disable=protected-access
  assert sorted(len(v) for v in splits.values()) == [0, 3]  # never split a group


def test_split_by_prepared_folder_keeps_groups_together(tmp_path, caplog):
  names = [f"Name{p}_{k:04d}.png" for p in range(10) for k in range(1, 4)] + ["odd.png"]
  root = _tree(tmp_path / "faces", names)
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")  # absl's own level
  config = _config(source="folder", path=root, split_by=LFW_PATTERN, validation_fraction=0.3)
  prepared = folder.prepare(config)
  assert sum(prepared.report.split_sizes.values()) == len(names)
  sides = {split: _paths_of(config, split) for split in ("train", "validation")}
  assert sides["train"] and sides["validation"]
  groups = {s: {folder.group_of(p, LFW_PATTERN) for p in ps} for s, ps in sides.items()}
  assert not groups["train"] & groups["validation"]
  assert "11 groups" in caplog.text and "1 file(s) matched no group" in caplog.text
  # The pattern is part of the fingerprint: without it, a different build.
  assert folder.prepare(_config(source="folder", path=root)).directory != prepared.directory


@pytest.mark.parametrize("pattern, message", [
  ("(.+_\\d+$", "not a regular expression"),
  (".+_\\d+$", "has no (group)"),
])
def test_split_by_bad_pattern_is_a_config_error(tmp_path, pattern, message):
  with pytest.raises(ConfigError, match="data.split_by") as error:
    folder.split_pattern(pattern)
  assert message in str(error.value)
  root = _tree(tmp_path / "imgs", ["a_0001.png", "b_0001.png"])
  with pytest.raises(ConfigError, match="^data.split_by: "):
    folder.prepare(_config(source="folder", path=root, split_by=pattern))


def test_split_by_that_matches_nothing_warns(tmp_path, caplog):
  root = _tree(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")  # absl's own level
  folder.prepare(_config(source="folder", path=root, split_by=LFW_PATTERN))
  assert "matched no file name" in caplog.text


# ---- folder: data.eval_path ----------------------------------------------------------------------


def test_eval_path_is_the_held_out_split(tmp_path):
  train = _tree(tmp_path / "train", [f"t{i}.png" for i in range(5)])
  held = _tree(tmp_path / "held", [f"h{i}.png" for i in range(3)] + ["sub/h3.png"])
  # validation_fraction would hash some training files out; with eval_path it is not used.
  config = _config(source="folder", path=train, eval_path=held, validation_fraction=0.9)
  assert _paths_of(config, "train") == [f"t{i}.png" for i in range(5)]
  assert _paths_of(config, "validation") == ["h0.png", "h1.png", "h2.png", "sub/h3.png"]
  assert folder.prepare(config).report.split_sizes == {"train": 5}
  assert folder.prepare(config, "eval_path").report.split_sizes == {"validation": 4}
  assert data.num_examples(config, "validation") == 4
  batches = data.eval_batches(config, "validation", 8, 4, process_index=0, process_count=1)
  assert sum(b["weight"].sum() for b in batches) == 4
  # The held-out images are eval_path's, pixel for pixel.
  source = folder.open_split(config, "validation")
  np.testing.assert_array_equal(source.eval_image(0), np.full((64, 64, 3), (0, 0, 100)))


def test_eval_path_inside_data_path_is_left_out_of_training(tmp_path):
  root = _tree(tmp_path / "photos", ["a.png", "b.png", "held_out/c.png", "held_out/d.png"])
  config = _config(source="folder", path=root, eval_path=os.path.join(root, "held_out"))
  assert _paths_of(config, "train") == ["a.png", "b.png"]
  assert _paths_of(config, "validation") == ["c.png", "d.png"]


def test_eval_path_mistakes_are_config_errors(tmp_path):
  root = _tree(tmp_path / "photos", ["a.png", "sub/b.png"])
  for held in (root, str(tmp_path)):  # the same folder, or one that contains data.path
    with pytest.raises(ConfigError, match="^data.eval_path: .*training images"):
      folder.open_split(_config(source="folder", path=os.path.join(root, "sub"),
                                eval_path=held), "validation")
  with pytest.raises(ConfigError, match="^data.eval_path: only data.source='folder'"):
    data.num_examples(_config(source="synthetic", eval_path=root), "validation")
  with pytest.raises(source_lib.DataUnavailableError, match="data.eval_path: .* not a directory"):
    folder.prepare(_config(source="folder", path=root, eval_path=str(tmp_path / "no")), "eval_path")


# ---- folder: where the prepared data goes, and what the console shows ----------------------------


def test_default_cache_is_the_user_cache_not_the_photo_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert folder.default_cache_dir() == str(tmp_path / "xdg" / "hvae" / "datasets")
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG rule)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert folder.default_cache_dir() == str(tmp_path / "home" / ".cache" / "hvae" / "datasets")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert folder.default_cache_dir() == str(tmp_path / "home" / ".cache" / "hvae" / "datasets")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  root = _tree(tmp_path / "photos", [f"p{i}.png" for i in range(4)])
  before = _snapshot(root)
  prepared = folder.prepare(_config(source="folder", path=root))
  assert prepared.directory.startswith(str(tmp_path / "xdg" / "hvae" / "datasets") + os.sep)
  assert _snapshot(root) == before  # nothing written inside the photo folder
  explicit = folder.prepare(_config(source="folder", path=root, data_dir=str(tmp_path / "dd")))
  assert explicit.directory.startswith(str(tmp_path / "dd") + os.sep)


def test_read_only_photo_folder_prepares_without_a_flag(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  root = _tree(tmp_path / "photos", ["a.png", "b.png", "sub/c.png"])
  paths = [os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs] + [root]
  for p in paths:
    os.chmod(p, 0o555 if os.path.isdir(p) else 0o444)
  try:
    if os.access(root, os.W_OK):
      pytest.skip("chmod does not stop this user (root) from writing: not a read-only folder")
    before = _snapshot(root)
    prepared = folder.prepare(_config(source="folder", path=root))
    assert sum(prepared.report.split_sizes.values()) == 3
    assert _snapshot(root) == before
  finally:
    for p in paths:
      os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)


def test_preparing_prints_hvae_lines_not_tfds_download_messages(tmp_path, capfd, caplog):
  root = _tree(tmp_path / "photos", [f"p{i}.png" for i in range(6)])
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")  # absl's own level
  config = _config(source="folder", path=root)
  folder.prepare(config)
  printed = capfd.readouterr()
  # What a user sees: printed text, warnings, and no INFO line claiming a download (launch.py
  # shows TFDS's other INFO lines, e.g. "Generating dataset", only with --verbosity=1).
  warnings = "".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  console = printed.out + printed.err + warnings
  for noise in ("Downloading and preparing", "downloaded and prepared", "Unknown size",
                "dataset_info.json", "Generating", "Shuffling", "examples/s",
                "custom data configuration"):
    assert noise not in console, noise
  assert "Download" not in caplog.text
  assert "folder source: preparing 6 images from " + root in caplog.text
  assert "folder source: done in " in caplog.text and "train " in caplog.text
  for fresh_process in (False, True):
    caplog.clear()
    if fresh_process:  # a later run: the build is named once, not at every split opened
      folder._announced.clear()  # pylint: disable=protected-access
    for split in ("train", "validation", "train"):
      folder.open_split(config, split).eval_image(0)
    assert caplog.text.count("prepared earlier") == int(fresh_process)
  assert "OpenCV" not in caplog.text + capfd.readouterr().err


# ---- celeb_a -------------------------------------------------------------------------------------


def test_celeb_a_offline_fails_fast_naming_the_files(tmp_path):
  config = _config(
    source="celeb_a", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual")
  )
  os.makedirs(config.data.manual_dir)
  start = time.monotonic()
  with pytest.raises(source_lib.DataUnavailableError) as error:
    celeb_a.open_split(config, "train")
  assert time.monotonic() - start < 10
  for name in celeb_a.MANUAL_FILES:
    assert name in str(error.value)
  assert config.data.manual_dir in str(error.value)


def test_celeb_a_default_manual_dir_is_under_data_dir(tmp_path):
  config = _config(source="celeb_a", data_dir=str(tmp_path))
  builder = celeb_a._builder(config)  # pylint: disable=protected-access
  assert celeb_a.manual_dir_of(config, builder) == str(tmp_path / "downloads" / "manual")


def test_celeb_a_manual_files_match_the_installed_builder(tmp_path):
  import tensorflow_datasets as tfds

  checksums = os.path.join(os.path.dirname(tfds.__file__), "datasets", "celeb_a", "checksums.tsv")
  with open(checksums) as f:
    expected = {line.split("\t")[-1].strip() for line in f if line.strip()}
  assert set(celeb_a.MANUAL_FILES) == expected
  assert celeb_a.missing_manual_files(str(tmp_path)) == list(celeb_a.MANUAL_FILES)
  for name in celeb_a.MANUAL_FILES:  # fake files: the presence check passes
    (tmp_path / name).write_bytes(b"fake")
  assert celeb_a.missing_manual_files(str(tmp_path)) == []


def test_celeb_a_crop_is_centred():
  face = np.zeros((218, 178, 3), np.uint8)  # H x W, like the aligned images
  face[39:179, 19:159] = (90, 120, 150)  # exactly the central 140 px square
  out = celeb_a.crop_resize(face, 140, 64)
  _check_image(out)
  np.testing.assert_array_equal(out, np.full((64, 64, 3), (90, 120, 150)))


def test_random_resized_box_stays_inside():
  rng = np.random.default_rng(0)
  for _ in range(500):
    left, top, right, bottom = image_files.random_resized_box(300, 200, rng)
    assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200


def _fake_celeb_a(manual_dir, split_of_file):
  """Writes a miniature CelebA in the layout of the five real files (placeholder values)."""
  import zipfile

  from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder as builder

  os.makedirs(manual_dir)
  names = sorted(split_of_file)
  with zipfile.ZipFile(os.path.join(manual_dir, "img_align_celeba.zip"), "w") as z:
    for i, name in enumerate(names):
      face = np.full((218, 178, 3), 20 * i, np.uint8)
      face[39:179, 19:159] = (10 * i, 100, 200)  # the central 140 px square
      image = Image.fromarray(face)
      with z.open(f"img_align_celeba/{name}", "w") as f:
        image.save(f, format="JPEG", quality=98, subsampling=0)

  def write(file_name, lines):
    with open(os.path.join(manual_dir, file_name), "w") as f:
      f.write("\n".join(lines) + "\n")

  write("list_eval_partition.txt", [f"{n} {split_of_file[n]}" for n in names])
  write("identity_CelebA.txt", [f"{n} {i}" for i, n in enumerate(names)])
  write(
    "list_attr_celeba.txt",
    [str(len(names)), " ".join(builder.ATTR_HEADINGS)]
    + [f"{n} " + " ".join(["1"] * len(builder.ATTR_HEADINGS)) for n in names],
  )
  write(
    "list_landmarks_align_celeba.txt",
    [str(len(names)), " ".join(builder.LANDMARK_HEADINGS)]
    + [f"{n} " + " ".join(["5"] * len(builder.LANDMARK_HEADINGS)) for n in names],
  )


def test_celeb_a_prepares_from_the_manual_dir_and_reads_64px(tmp_path, monkeypatch):
  from tensorflow_datasets.core.download import download_manager

  # The fake files cannot match the registered checksums; everything else is TFDS's real path.
  monkeypatch.setattr(
    download_manager.DownloadManager, "_register_or_validate_checksums", lambda self, **kwargs: None
  )
  split_of_file = {
    "000001.jpg": 0,
    "000002.jpg": 0,
    "000003.jpg": 0,
    "000004.jpg": 1,
    "000005.jpg": 2,
  }
  _fake_celeb_a(str(tmp_path / "manual"), split_of_file)
  config = _config(
    source="celeb_a", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual")
  )
  assert celeb_a.num_examples(config, "train") == 3
  assert [celeb_a.num_examples(config, s) for s in ("validation", "test")] == [1, 1]
  source = celeb_a.open_split(config, "train")
  for i in range(3):
    image = source.eval_image(i)
    _check_image(image)
    # Only the central 140 px square survives the crop: one flat colour (JPEG tolerance).
    assert np.abs(image.astype(int) - image.reshape(-1, 3).mean(0)).max() <= 6
  assert {int(round(source.eval_image(i)[..., 2].mean())) for i in range(3)} <= set(range(195, 206))
