"""Tests of the data sources: synthetic, embedded, folder (every odd file kind) and celeb_a."""

import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from experiments import base
from hvae.data import celeb_a, embedded, folder, images, synthetic
from hvae.data import source as source_lib

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


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


# ---- folder -------------------------------------------------------------------------------------


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


def test_folder_split_is_a_stable_hash_of_the_path():
  names = [f"dir/img_{i}.jpg" for i in range(2000)]
  val = [n for n in names if folder.split_of(n, 0.1) == "validation"]
  assert 150 < len(val) < 250
  assert val == [n for n in names if folder.split_of(n, 0.1) == "validation"]


def test_folder_without_images_fails_clearly(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(source_lib.DataUnavailableError, match="no usable image"):
    folder.prepare(_config(source="folder", path=str(tmp_path)))


# ---- celeb_a ------------------------------------------------------------------------------------


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
    left, top, right, bottom = images.random_resized_box(300, 200, rng)
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
