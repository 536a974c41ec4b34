"""Sample-quality metrics of fill-ins, on the hole only (host-side numpy, images in 0..255).

Every metric compares a fill-in composited into its context with the true image, for one
example at a time (image [H, W, 3], mask [H, W, 1] with 1 = given, 0 = missing):

* `psnr`: 10 log10(255^2 / MSE) with the MSE over the hole's sub-pixels (3 per missing pixel).
  Identical holes (MSE = 0) give `PSNR_CAP` = 100 dB instead of infinity, so means stay finite.
* `ssim`: SSIM (Wang et al. 2004: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03,
  L = 255, no sample-covariance correction, reflected borders), its map computed over the whole
  image per channel and averaged over the hole's bounding box grown by `SSIM_MARGIN` = 4 px
  (clipped to the image) and over channels. Equals scikit-image's `structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, full=True)`
  map averaged over that box.
* `l1`: mean absolute difference over the hole's sub-pixels, in pixel values (0..255).
* `diversity`: mean pairwise L1 between the N fill-ins of one context, over the hole's
  sub-pixels (0 for N = 1).
* `seam`: for every pair of 4-neighbour pixels with one given and one missing (the pairs that
  straddle the hole's border), the forward difference x[q] - x[p] per channel; the mean
  absolute difference between the composite's and the truth's differences. 0 when the
  composite continues the context exactly as the truth does.

`sample_metrics` applies them to N fill-ins per context and gives best-of-N, mean-of-N,
best-by-likelihood (the fill-in the model scores highest) and the PSNR of the mean fill-in.
FID and LPIPS are out of scope (they need pretrained networks).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

DATA_RANGE = 255.0
PSNR_CAP = 100.0  # dB, reported for identical holes (MSE = 0)
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5: an 11x11 window, as in Wang et al.
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MARGIN = 4  # px the hole's bounding box is grown by


def _missing(mask: np.ndarray) -> np.ndarray:
  """[H, W] bool, True where the pixel is missing (mask [H, W, 1] or [H, W], 1 = given)."""
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., 0]
  return mask < 0.5


def _hole_values(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[M, 3] float64 sub-pixels of the missing pixels."""
  return np.asarray(image, np.float64)[_missing(mask)]


def psnr_from_mse(mse: float) -> float:
  """PSNR in dB for data range 255, capped at `PSNR_CAP` (MSE = 0 gives the cap)."""
  if mse <= 0.0:
    return PSNR_CAP
  return float(min(PSNR_CAP, 10.0 * math.log10(DATA_RANGE**2 / mse)))


def psnr(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
  """PSNR over the hole's sub-pixels. image, truth: [H, W, 3]; mask [H, W, 1], 1 = given."""
  d = _hole_values(image, mask) - _hole_values(truth, mask)
  return psnr_from_mse(float(np.mean(np.square(d)))) if d.size else PSNR_CAP


def l1(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
  """Mean |image - truth| over the hole's sub-pixels, in pixel values."""
  d = _hole_values(image, mask) - _hole_values(truth, mask)
  return float(np.mean(np.abs(d))) if d.size else 0.0


def hole_box(mask: np.ndarray, margin: int = SSIM_MARGIN) -> tuple[int, int, int, int]:
  """(top, left, bottom, right), exclusive ends: the hole's bounding box grown by `margin`."""
  missing = _missing(mask)
  h, w = missing.shape
  if not missing.any():
    return 0, 0, h, w
  rows, cols = np.nonzero(missing.any(axis=1))[0], np.nonzero(missing.any(axis=0))[0]
  return (max(0, rows[0] - margin), max(0, cols[0] - margin),
          min(h, rows[-1] + 1 + margin), min(w, cols[-1] + 1 + margin))


def ssim_map(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """[H, W, C] SSIM map of two images (per channel, Gaussian window, reflected borders)."""
  x, y = np.asarray(image, np.float64), np.asarray(truth, np.float64)
  c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
  blur = lambda a: np.stack([  # noqa: E731
      ndimage.gaussian_filter(a[..., c], SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")
      for c in range(a.shape[-1])], axis=-1)
  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
  """Mean SSIM over the hole's bounding box grown by 4 px and over channels."""
  top, left, bottom, right = hole_box(mask)
  return float(np.mean(ssim_map(image, truth)[top:bottom, left:right]))


def diversity(fills: np.ndarray, mask: np.ndarray) -> float:
  """Mean pairwise L1 between N fill-ins [N, H, W, 3] of one context, on the hole (0 if N = 1)."""
  vals = np.stack([_hole_values(f, mask) for f in np.asarray(fills)])  # [N, M, 3]
  n = vals.shape[0]
  if n < 2 or vals.shape[1] == 0:
    return 0.0
  pairs = [np.mean(np.abs(vals[i] - vals[j])) for i in range(n) for j in range(i + 1, n)]
  return float(np.mean(pairs))


def _border_differences(image: np.ndarray, missing: np.ndarray) -> np.ndarray:
  """Forward differences [P, 3] across every 4-neighbour pair straddling the hole's border."""
  x = np.asarray(image, np.float64)
  parts = []
  for axis in (0, 1):
    a = [slice(None)] * 2
    b = [slice(None)] * 2
    a[axis], b[axis] = slice(None, -1), slice(1, None)
    straddle = missing[tuple(a)] != missing[tuple(b)]  # [H-1, W] or [H, W-1]
    parts.append((x[tuple(b)] - x[tuple(a)])[straddle])
  return np.concatenate(parts)


def seam(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
  """Mean |grad composite - grad truth| across the hole's border (pixel values; 0 if no border)."""
  missing = _missing(mask)
  d = _border_differences(image, missing) - _border_differences(truth, missing)
  return float(np.mean(np.abs(d))) if d.size else 0.0


def sample_metrics(fills: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                   scores: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-example quality figures of N composited fill-ins per context.

  Args:
    fills: [N, B, H, W, 3] fill-ins composited into their contexts, 0..255.
    truth: [B, H, W, 3] true images.
    mask: [B, H, W, 1], 1 = given.
    scores: optional [N, B] model log-likelihood bounds of each fill-in (higher = more likely);
      gives `psnr_rank`, the PSNR of the most likely fill-in.

  Returns:
    {name: [B] float64}: psnr_best (best of N), psnr_mean (mean of N), psnr_of_mean (PSNR of
    the mean fill-in), ssim, l1, seam (each the mean over the N fill-ins), ssim_best, l1_best
    (best of N), diversity, and psnr_rank when `scores` is given.
  """
  fills = np.asarray(fills, np.float64)
  n, batch = fills.shape[:2]
  out = {k: np.zeros(batch) for k in ("psnr_best", "psnr_mean", "psnr_of_mean", "ssim", "l1",
                                      "seam", "ssim_best", "l1_best", "diversity")}
  if scores is not None:
    out["psnr_rank"] = np.zeros(batch)
  for b in range(batch):
    t, m = truth[b], mask[b]
    p = np.array([psnr(fills[i, b], t, m) for i in range(n)])
    s = np.array([ssim(fills[i, b], t, m) for i in range(n)])
    e = np.array([l1(fills[i, b], t, m) for i in range(n)])
    out["psnr_best"][b], out["psnr_mean"][b] = p.max(), p.mean()
    out["psnr_of_mean"][b] = psnr(fills[:, b].mean(axis=0), t, m)
    out["ssim"][b], out["ssim_best"][b] = s.mean(), s.max()
    out["l1"][b], out["l1_best"][b] = e.mean(), e.min()
    out["seam"][b] = np.mean([seam(fills[i, b], t, m) for i in range(n)])
    out["diversity"][b] = diversity(fills[:, b], m)
    if scores is not None:
      out["psnr_rank"][b] = p[int(np.argmax(np.asarray(scores)[:, b]))]
  return out
