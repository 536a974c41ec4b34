"""Sample-quality metrics (hvae/quality.py) against values computed by hand on small arrays."""

import math

import numpy as np
import pytest
from helpers import centre_mask, random_images

from hvae import quality


@pytest.fixture(scope="module")
def example():
  image = random_images(1, seed=3)[0].astype(np.float64)
  image = np.clip(image, 40, 200)  # room for +-30 shifts without clipping
  return image, centre_mask(1)[0]


def _shift_hole(image, mask, delta):
  return np.where(mask > 0.5, image, image + delta)


def test_identical_images_give_the_cap_and_perfect_scores(example):
  image, mask = example
  assert quality.psnr(image, image, mask) == quality.PSNR_CAP == 100.0
  assert quality.ssim(image, image, mask) == pytest.approx(1.0, abs=1e-12)
  assert quality.l1(image, image, mask) == 0.0
  assert quality.seam(image, image, mask) == 0.0
  assert quality.diversity(np.stack([image] * 3), mask) == 0.0


def test_a_constant_shift_of_the_hole_gives_the_computed_figures(example):
  image, mask = example
  shifted = _shift_hole(image, mask, 5.0)
  # MSE = 25 on every hole sub-pixel: PSNR = 10 log10(255^2 / 25) = 20 log10(51).
  assert quality.psnr(shifted, image, mask) == pytest.approx(20 * math.log10(51.0), abs=1e-9)
  assert quality.psnr(shifted, image, mask) == pytest.approx(34.1514, abs=1e-4)
  assert quality.l1(shifted, image, mask) == pytest.approx(5.0)
  # Every difference across the border changes by exactly +-5.
  assert quality.seam(shifted, image, mask) == pytest.approx(5.0)
  # Pixels outside the hole do not count.
  outside = np.where(mask > 0.5, image + 50.0, image)
  assert quality.psnr(outside, image, mask) == quality.PSNR_CAP
  assert quality.l1(outside, image, mask) == 0.0


def test_shifting_the_whole_image_leaves_no_seam(example):
  image, mask = example
  assert quality.seam(image + 7.0, image, mask) == pytest.approx(0.0, abs=1e-12)
  assert quality.l1(image + 7.0, image, mask) == pytest.approx(7.0)


def test_seam_on_a_tiny_array_by_hand():
  truth = np.zeros((3, 3, 3))
  mask = np.ones((3, 3, 1))
  mask[1, 1] = 0.0  # one missing pixel: four border pairs, 12 differences over channels
  fill = truth.copy()
  fill[1, 1] = [4.0, 8.0, 0.0]
  # Each pair's difference changes by the fill's value at (1, 1), in every direction.
  assert quality.seam(fill, truth, mask) == pytest.approx((4 + 8 + 0) * 4 / 12)


def test_ssim_of_constant_images_is_the_luminance_term():
  mask = centre_mask(1)[0]
  x, y = np.full((64, 64, 3), 100.0), np.full((64, 64, 3), 110.0)
  c1 = (0.01 * 255) ** 2
  expected = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)  # variances are 0: contrast term 1
  assert quality.ssim(y, x, mask) == pytest.approx(expected, rel=1e-12)


def test_ssim_matches_scikit_image_over_the_grown_box(example):
  metrics = pytest.importorskip("skimage.metrics")
  image, mask = example
  other = np.clip(image + np.random.RandomState(0).normal(0, 20, image.shape), 0, 255)
  _, full = metrics.structural_similarity(
      other, image, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=255, channel_axis=-1, full=True)
  assert quality.hole_box(mask) == (12, 12, 52, 52)  # 32x32 hole at 16..47, grown by 4
  np.testing.assert_allclose(quality.ssim(other, image, mask), full[12:52, 12:52].mean(),
                             rtol=1e-9)


def test_diversity_is_the_mean_pairwise_l1(example):
  image, mask = example
  fills = np.stack([_shift_hole(image, mask, d) for d in (0.0, 10.0, 30.0)])
  assert quality.diversity(fills, mask) == pytest.approx((10 + 30 + 20) / 3)
  assert quality.diversity(fills[:1], mask) == 0.0


def test_sample_metrics_best_mean_rank_and_mean_fill_in(example):
  image, mask = example
  fills = np.stack([_shift_hole(image, mask, d) for d in (0.0, 10.0, -10.0)])[:, None]
  scores = np.array([[-5.0], [-1.0], [-3.0]])  # the model prefers the +10 fill-in
  m = quality.sample_metrics(fills, image[None], mask[None], scores)
  p10 = 20 * math.log10(25.5)
  assert m["psnr_best"][0] == quality.PSNR_CAP
  assert m["psnr_mean"][0] == pytest.approx((100 + 2 * p10) / 3)
  assert m["psnr_rank"][0] == pytest.approx(p10)
  assert m["psnr_of_mean"][0] == quality.PSNR_CAP  # +10 and -10 average out
  assert m["l1"][0] == pytest.approx(20 / 3) and m["l1_best"][0] == 0.0
  assert m["ssim_best"][0] == pytest.approx(1.0)
  assert m["diversity"][0] == pytest.approx((10 + 10 + 20) / 3)
  assert m["seam"][0] == pytest.approx(20 / 3)


def test_hf_ratio_is_one_for_the_truth_above_for_noise_below_for_blur(example):
  image, mask = example
  assert quality.hf_ratio(image, image, mask) == pytest.approx(1.0)
  noisy = _shift_hole(image, mask, np.random.RandomState(1).normal(0, 10, image.shape))
  assert quality.hf_ratio(noisy, image, mask) > 1.2
  from scipy import ndimage

  blurred = ndimage.gaussian_filter(image, (2, 2, 0))
  assert quality.hf_ratio(blurred, image, mask) < 0.8
  # The given pixels of the fill are not read: it is composited into the truth's context.
  assert quality.hf_ratio(np.where(mask > 0.5, 0.0, image), image, mask) == pytest.approx(1.0)


def test_hf_ratio_of_a_flat_truth_stays_finite():
  mask = centre_mask(1)[0]
  flat = np.full((64, 64, 3), 90.0)
  assert quality.hf_ratio(flat, flat, mask) == 1.0
  checker = flat + 2.0 * ((np.indices((64, 64)).sum(0) % 2)[..., None])  # |lap| = 8 inside
  ratio = quality.hf_ratio(checker, flat, mask)
  assert np.isfinite(ratio) and ratio == pytest.approx((8.0 + quality.HF_EPS) / quality.HF_EPS,
                                                       rel=0.05)


def test_paired_by_hand():
  p = quality.paired([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0])
  d = np.array([2.0, -1.0, 0.0, 2.0])
  assert p["diff"] == pytest.approx(0.75) and p["n"] == 4
  assert p["stderr"] == pytest.approx(d.std(ddof=1) / 2.0)
  assert p["wins"] == 2 and p["ties"] == 1
  lower = quality.paired([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0], higher_is_better=False)
  assert lower["wins"] == 1 and lower["diff"] == pytest.approx(0.75)
  assert np.isnan(quality.paired([1.0], [0.0])["stderr"])


def test_sample_methods_pick_one_fill_in_per_context(example):
  image, mask = example
  fills = np.stack([_shift_hole(image, mask, d) for d in (20.0, 5.0, -10.0)])[:, None]
  scores = np.array([[-1.0], [-5.0], [-3.0]])  # the model prefers the +20 fill-in
  m = quality.sample_methods(fills, image[None], mask[None], scores)
  assert list(m) == ["sample", "best_of_N", "ranked", "mean_of_samples"]
  coverage = {"sample_spread", "truth_spread", "truth_rank", "truth_outside"}
  assert set(m["sample"]) == set(quality.FIGURES) | coverage
  assert all(set(v) == set(quality.FIGURES) for k, v in m.items() if k != "sample")
  # By hand (constant shifts 20, 5, -10 of the hole): pairs 15, 30, 15 apart, the truth 20, 5,
  # 10 from them; summed squared distances: truth 525, the +5 fill-in 475, the others more.
  assert m["sample"]["sample_spread"][0] == pytest.approx(450)
  assert m["sample"]["truth_spread"][0] == pytest.approx(175)
  assert m["sample"]["truth_rank"][0] == pytest.approx(1 / 3)  # only the +5 one is more central
  assert m["sample"]["truth_outside"][0] == 0.0
  assert m["best_of_N"]["psnr"][0] == pytest.approx(20 * math.log10(51.0))  # the +5 one
  assert m["best_of_N"]["l1"][0] == pytest.approx(5.0)
  assert m["ranked"]["l1"][0] == pytest.approx(20.0)
  assert m["sample"]["l1"][0] == pytest.approx(35 / 3)
  assert m["mean_of_samples"]["l1"][0] == pytest.approx(5.0)  # (20 + 5 - 10) / 3
  legacy = quality.sample_metrics(fills, image[None], mask[None], scores)
  assert legacy["psnr_best"][0] == m["best_of_N"]["psnr"][0]
  assert legacy["psnr_rank"][0] == m["ranked"]["psnr"][0]
  assert legacy["psnr_of_mean"][0] == pytest.approx(m["mean_of_samples"]["psnr"][0])


def _draws(noise_truth: float, noise_samples: float, n: int = 8, b: int = 300, seed: int = 0):
  """b contexts of one small image [b, 32, 32, 3] (the hole: its centre 16x16, 16 of coverage's
  4x4 squares), each with a truth and n samples drawn around the same base with the given noise
  levels (grey levels)."""
  rs = np.random.RandomState(seed)
  base = rs.uniform(60, 190, (b, 1, 32, 32, 3))
  truth = base[:, 0] + noise_truth * rs.randn(b, 32, 32, 3)
  samples = np.moveaxis(base + noise_samples * rs.randn(b, n, 32, 32, 3), 1, 0)  # [n, b, ...]
  mask = np.ones((b, 32, 32, 1))
  mask[:, 8:24, 8:24] = 0.0
  return samples, truth, mask


def test_coverage_of_exchangeable_draws_is_calibrated():
  """Truth and samples drawn alike: spread ratio 1, the truth's rank uniform (mean 0.5) and the
  truth farthest out on 1/(N+1) of the contexts, within a few standard errors; on 4x4 squares
  (48 numbers a hole) and pixel by pixel."""
  samples, truth, mask = _draws(10.0, 10.0)
  c = quality.coverage(samples, truth, mask)
  assert set(c) == {"sample_spread", "truth_spread", "truth_rank", "truth_outside"}
  assert all(v.shape == (300,) for v in c.values())
  assert quality.spread_ratio(c["sample_spread"], c["truth_spread"]) == pytest.approx(1.0, abs=0.02)
  fine = quality.coverage(samples, truth, mask, block=1)
  assert quality.spread_ratio(fine["sample_spread"], fine["truth_spread"]) == (
      pytest.approx(1.0, abs=0.01))
  assert c["truth_rank"].mean() == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / 300))
  p = 1 / 9
  assert c["truth_outside"].mean() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 300))
  assert set(np.unique(c["truth_rank"] * 8)) <= set(range(9))  # ranks 0..N, scaled


def test_coverage_tells_narrow_samples_from_wide_ones():
  ratio = lambda c: quality.spread_ratio(c["sample_spread"], c["truth_spread"])  # noqa: E731
  narrow = quality.coverage(*_draws(10.0, 3.0))  # the truth differs more than samples do
  assert ratio(narrow) < 0.2 and narrow["truth_outside"].mean() > 0.95
  wide = quality.coverage(*_draws(3.0, 10.0))  # the truth sits in the middle of the samples
  assert ratio(wide) > 1.5 and wide["truth_outside"].mean() == 0.0
  assert wide["truth_rank"].mean() < 0.05


def test_coverage_averages_squares_of_the_hole_so_grain_weighs_little():
  """Truth and samples differ from a base by independent 4x4 blobs (std 10); the truth also has
  per-pixel grain (std 30) that the samples lack, as with pixels="mean". Pixel by pixel the
  samples look far too narrow (200 / (200 + 900)); on 4x4 squares, where the grain's variance
  is 1/16, nearly calibrated (200 / (200 + 900 / 16))."""
  rs = np.random.RandomState(1)
  base = rs.uniform(60, 190, (300, 32, 32, 3))
  blobs = lambda *shape: 10.0 * np.kron(rs.randn(*shape, 8, 8, 3), np.ones((4, 4, 1)))  # noqa: E731
  truth = base + blobs(300) + 30.0 * rs.randn(300, 32, 32, 3)
  samples = base[None] + np.moveaxis(blobs(300, 8), 1, 0)
  mask = _draws(0.0, 0.0, b=300)[2]
  ratio = lambda c: quality.spread_ratio(c["sample_spread"], c["truth_spread"])  # noqa: E731
  fine = ratio(quality.coverage(samples, truth, mask, block=1))
  coarse = ratio(quality.coverage(samples, truth, mask))
  assert fine == pytest.approx(200 / 1100, rel=0.05), fine
  assert coarse == pytest.approx(200 / (200 + 900 / 16), rel=0.05), coarse


def test_coverage_reads_the_hole_only_and_needs_two_samples():
  samples, truth, mask = _draws(10.0, 10.0, b=5)
  c = quality.coverage(samples, truth, mask)
  given = np.broadcast_to(mask > 0.5, truth.shape)
  moved = quality.coverage(np.where(given, 0.0, samples), np.where(given, 255.0, truth), mask)
  for k in c:
    np.testing.assert_allclose(moved[k], c[k], rtol=1e-9)
  with pytest.raises(ValueError, match="at least 2 samples"):
    quality.coverage(samples[:1], truth, mask)
  # The `sample` method carries the figures when N >= 2, and only then.
  assert "sample_spread" in quality.sample_methods(samples, truth, mask)["sample"]
  assert "sample_spread" not in quality.sample_methods(samples[:1], truth, mask)["sample"]
  # No hole: nothing to cover (spreads 0, rank 0); a set of identical fill-ins: ratio 1.
  none = quality.coverage(samples, truth, np.ones_like(mask))
  assert np.all(none["sample_spread"] == 0) and np.all(none["truth_rank"] == 0)
  assert quality.spread_ratio(none["sample_spread"], none["truth_spread"]) == 1.0
