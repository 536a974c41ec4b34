"""Tests of hvae/data/masks.py: shapes, areas, guarantees and determinism of every mask maker."""

import numpy as np
import pytest

from hvae.data import masks


def test_centre_is_exactly_the_central_32_square():
  mask = masks.centre(np.random.default_rng(0), 64)
  assert mask.shape == (64, 64, 1) and mask.dtype == np.float32
  assert (mask[16:48, 16:48] == 0).all()
  assert (1 - mask).sum() == 32 * 32
  assert set(np.unique(mask)) == {0.0, 1.0}


@pytest.mark.parametrize("name", sorted(masks.MASKS))
def test_every_mask_is_binary_and_mixed(name):
  make = masks.get_maker(name)
  rng = np.random.default_rng(1)
  for _ in range(200):
    mask = make(rng, 64)
    assert mask.shape == (64, 64, 1) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    missing = 1 - mask.mean()
    assert 0 < missing <= masks.MAX_MISSING_FRACTION


@pytest.mark.parametrize("name", ["boxes", "freeform"])
def test_random_masks_vary(name):
  make = masks.get_maker(name)
  rng = np.random.default_rng(2)
  distinct = {make(rng, 64).tobytes() for _ in range(20)}
  assert len(distinct) == 20


@pytest.mark.parametrize("name", sorted(masks.MASKS))
def test_eval_masks_depend_only_on_seed_and_index(name):
  a = [masks.eval_mask(name, seed=3, index=i) for i in range(10)]
  b = [masks.eval_mask(name, seed=3, index=i) for i in reversed(range(10))][::-1]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  if name != "centre":
    assert len({m.tobytes() for m in a}) == 10
    other_seed = masks.eval_mask(name, seed=4, index=0)
    assert not np.array_equal(other_seed, a[0])


def test_unknown_mask_names_the_valid_ones():
  with pytest.raises(ValueError, match="centre, boxes, freeform"):
    masks.get_maker("circle")
