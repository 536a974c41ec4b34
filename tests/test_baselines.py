"""Classical fill-ins (hvae/baselines.py) on images whose correct fill-in is known."""

import numpy as np
import pytest
from helpers import centre_mask, random_images

from hvae import baselines
from hvae.errors import ConfigError


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_a_constant_image_is_filled_exactly(name):
  image = np.zeros((64, 64, 3), np.uint8) + np.array([10, 120, 250], np.uint8)
  holed = np.where(centre_mask(1)[0] > 0.5, image, 0).astype(np.uint8)  # hole never read
  out = baselines.BASELINES[name](holed, centre_mask(1)[0])
  assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
  np.testing.assert_array_equal(out, image)


def test_biharmonic_continues_a_linear_ramp():
  x = np.arange(64, dtype=np.float64)
  ramp = np.broadcast_to((2 * x + 30)[None, :, None], (64, 64, 3))  # 30 .. 156 grey levels
  image = ramp + np.array([0.0, 20.0, 40.0])  # per-channel offsets
  out = baselines.biharmonic(image, centre_mask(1)[0])
  assert np.abs(out.astype(np.float64) - np.rint(image)).max() <= 1.0


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_given_pixels_are_kept_exactly(name):
  image, mask = random_images(1, seed=2)[0], centre_mask(1)[0]
  out = baselines.BASELINES[name](image, mask)
  given = np.broadcast_to(mask > 0.5, image.shape)
  np.testing.assert_array_equal(out[given], image[given])


def test_ring_mean_is_the_mean_of_the_hole_s_border_ring():
  image = np.zeros((5, 5, 3))
  image[:, :, 0] = np.arange(25).reshape(5, 5)  # red = 5 * row + col
  mask = np.ones((5, 5, 1))
  mask[2, 2] = 0.0  # one missing pixel: its ring is (1,2), (3,2), (2,1), (2,3)
  out = baselines.ring_mean(image, mask)
  assert out[2, 2, 0] == round((7 + 17 + 11 + 13) / 4)
  ring = baselines.border_ring(mask[..., 0] < 0.5)
  assert ring.sum() == 4 and ring[1, 2] and ring[2, 3] and not ring[1, 1]
  everything = np.zeros((5, 5, 1))  # nothing given: grey
  assert np.all(baselines.ring_mean(image, everything) == 128)
  assert np.all(baselines.biharmonic(image, everything) == 128)


def test_parse_and_fill_batch():
  assert baselines.parse(baselines.DEFAULT) == ("biharmonic", "ring_mean")
  assert baselines.parse("none") == baselines.parse("") == baselines.parse(None) == ()
  assert baselines.parse("ring_mean, biharmonic") == ("ring_mean", "biharmonic")
  # A sequence of names too (the Python API of eval and inpaint).
  assert baselines.parse(["ring_mean", "biharmonic", "ring_mean"]) == ("ring_mean", "biharmonic")
  assert baselines.parse(()) == baselines.parse(["none"]) == ()
  with pytest.raises(ConfigError, match="telea"):  # a ValueError: one line from launch.py
    baselines.parse("biharmonic,telea")
  with pytest.raises(ConfigError, match="telea"):
    baselines.parse(("telea",))
  images, masks = random_images(2, seed=1), centre_mask(2)
  out = baselines.fill_batch("ring_mean", images, masks)
  assert out.shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(out[1], baselines.ring_mean(images[1], masks[1]))


def test_pull_push_fills_any_size_within_the_context_range():
  image = random_images(1, seed=4)[0][:48, :40]  # sides that are no power of 2
  mask = np.ones((48, 40, 1), np.float32)
  mask[10:30, 12:30] = 0.0
  out = baselines.pull_push(image, mask)
  assert out.shape == image.shape
  given = mask[..., 0] > 0.5
  np.testing.assert_array_equal(out[given], image[given])
  for c in range(3):  # a convex combination of given pixels
    assert image[given][:, c].min() <= out[~given][:, c].min()
    assert out[~given][:, c].max() <= image[given][:, c].max()
