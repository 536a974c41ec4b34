"""Tests for hvae/grids.py: grid layout, labels, hole overlay, PNG round trip, heatmap colours."""

import os

import numpy as np
import pytest
from PIL import Image

from hvae.grids import heatmap, hole_overlay, make_grid, save_png


def _solid(n: int, colour, size: int = 4) -> np.ndarray:
  return np.broadcast_to(np.asarray(colour, np.uint8), (n, size, size, 3)).copy()


def test_grid_layout_and_padding():
  red, blue = (255, 0, 0), (0, 0, 255)
  grid = make_grid([_solid(3, red), _solid(3, blue).astype(np.float32)], pad=2)
  assert grid.dtype == np.uint8
  assert grid.shape == (2 * 4 + 3 * 2, 3 * 4 + 4 * 2, 3)
  # Padding is white: the border and the gaps between cells.
  assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
  assert (grid[:, 6:8] == 255).all() and (grid[6:8] == 255).all()
  # Row 0 is red, row 1 blue, in every column.
  for col in range(3):
    x = 2 + col * 6
    assert (grid[2:6, x:x + 4] == red).all()
    assert (grid[8:12, x:x + 4] == blue).all()


def test_grid_scale_ragged_rows_and_grey():
  grid = make_grid([_solid(2, (255, 0, 0), size=3), np.zeros((1, 3, 3, 1))], pad=1, scale=2)
  assert grid.shape == (2 * 6 + 3, 2 * 6 + 3, 3)
  assert (grid[1:7, 1:7] == (255, 0, 0)).all()  # 3x3 red image upscaled to 6x6
  assert (grid[8:14, 1:7] == 0).all()  # grey [.., 1] image repeated to RGB black
  assert (grid[8:14, 8:14] == 255).all()  # the missing cell of the short row is white


def test_grid_labels_add_a_header():
  rows = [_solid(3, (255, 0, 0), size=32)]
  plain = make_grid(rows)
  labelled = make_grid(rows, labels=["context", "truth", "mean"])
  assert labelled.shape[1:] == plain.shape[1:] and labelled.shape[0] > plain.shape[0]
  header = labelled[:labelled.shape[0] - plain.shape[0]]
  assert (labelled[header.shape[0]:] == plain).all()
  # Some dark text in each column's header.
  for col in range(3):
    x = 2 + col * 34
    assert (header[:, x:x + 32] < 128).any()
  with pytest.raises(ValueError, match="labels"):
    make_grid(rows, labels=["one"])


def test_grid_row_labels_add_a_left_column():
  rows = [_solid(2, (255, 0, 0), size=32), _solid(2, (0, 0, 255), size=32)]
  plain = make_grid(rows, labels=["a", "b"])
  labelled = make_grid(rows, labels=["a", "b"], row_labels=["level 1", "level 2"])
  assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
  side = labelled[:, :labelled.shape[1] - plain.shape[1]]
  assert (labelled[:, side.shape[1]:] == plain).all()
  header = plain.shape[0] - make_grid(rows).shape[0]
  for r in range(2):  # dark text beside each row, none beside the column header
    y = header + 2 + r * 34
    assert (side[y:y + 32] < 128).any()
  assert (side[:header] == 255).all()
  with pytest.raises(ValueError, match="row labels"):
    make_grid(rows, row_labels=["level 1"])


def test_hole_overlay_sets_exactly_missing_pixels():
  rng = np.random.RandomState(0)
  image = rng.randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
  mask = np.ones((2, 8, 8, 1), np.float32)
  mask[:, 2:5, 3:7] = 0.0
  out = hole_overlay(image, mask)
  assert out.shape == image.shape and out.dtype == np.uint8
  missing = mask[..., 0] == 0
  assert (out[missing] == 128).all()
  np.testing.assert_array_equal(out[~missing], image[~missing])
  # A mask without the channel axis and a float image give the same.
  np.testing.assert_array_equal(hole_overlay(image.astype(np.float32), mask[..., 0]), out)
  # One mask broadcasts over a batch of images.
  np.testing.assert_array_equal(hole_overlay(image, mask[0]), out)
  np.testing.assert_array_equal(hole_overlay(image, mask[0, ..., 0]), out)


def test_save_png_round_trip(tmp_path):
  image = np.random.RandomState(1).randint(0, 256, (5, 7, 3)).astype(np.uint8)
  path = tmp_path / "images" / "step_10" / "grid.png"
  save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  save_png(str(path), 255 - image)  # overwrite in place
  np.testing.assert_array_equal(np.asarray(Image.open(path)), 255 - image)
  assert os.listdir(path.parent) == ["grid.png"]  # no temporary files left


def test_heatmap_shape_and_monotone_colour():
  values = np.linspace(0.0, 1.0, 8)[None, :].repeat(2, axis=0)  # [2, 8]
  out = heatmap(values, size=16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  row = out[0, ::2].astype(np.float64)  # one pixel per input column (nearest upscale by 2)
  luminance = row @ np.array([0.299, 0.587, 0.114])
  assert (np.diff(luminance) > 0).all()
  # Nearest upscaling: each input cell is a constant 8x2 block.
  assert (out[:8, :2] == out[0, 0]).all() and (out[8:, :2] == out[0, 0]).all()
  # vmax saturates; an all-zero map and NaN do not crash.
  assert (heatmap(values, size=8, vmax=0.5)[0, -1] == out[0, -1]).all()
  assert heatmap(np.zeros((4, 4)), size=4).shape == (4, 4, 3)
  assert (heatmap(np.array([[np.nan, 1.0]]), size=2)[:, 0] == 0).all()
