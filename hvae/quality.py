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

* `hf_ratio`: the high-frequency energy of the fill-in relative to the truth's: the mean
  absolute Laplacian (3x3, per channel, reflected borders) of the composite over the hole's
  sub-pixels divided by the truth's, (a + `HF_EPS`) / (b + `HF_EPS`). 1 for the truth itself,
  > 1 for a fill-in noisier than the truth, < 1 for a blurred (over-smooth) one.

* `coverage`: do the N samples of a context cover its truth's structure? On the hole averaged
  over `COVERAGE_BLOCK` x `COVERAGE_BLOCK` squares of the image grid, each square weighted by
  its missing pixels (per-pixel grain, which samples drawn with `pixels="mean"` leave out by
  design and the truth has, then weighs 1/16 as much on the centre hole, whose squares are
  whole; ~1/12 on `boxes` and ~1/10 on `freeform` masks, whose edges cut squares: compare
  figures on one mask kind), with d(a, b) the weighted mean squared difference:
  `sample_spread`, the mean d between two samples; `truth_spread`, the mean d between the truth
  and a sample; `truth_rank`, the truth's rank among the N + 1 fill-ins {truth, samples}
  ordered by their summed d to the other N, scaled to 0..1 (0 the most central, 1 the farthest
  out); `truth_outside`, 1 where the truth is the farthest out. Over a set of examples,
  `spread_ratio` = mean sample_spread / mean truth_spread. If the truth were one more draw of
  the model (a calibrated model: truth and samples exchangeable), spread_ratio would be 1 (a
  ratio of expectations; the mean of per-example ratios would be biased above 1), truth_rank
  uniform (mean 0.5) and truth_outside 1 / (N + 1) on average. A spread_ratio below 1 with the
  truth outside more often says the samples vary less than, or in other directions than, the
  truth differs from them: best-of-N cannot beat a central fill-in (the mode, the mean) by
  much, however many samples are drawn.

`sample_metrics` applies them to N fill-ins per context and gives best-of-N, mean-of-N,
best-by-likelihood (the fill-in the model scores highest) and the PSNR of the mean fill-in;
`sample_methods` turns the same N fill-ins into one fill-in per context per *method* (`sample`,
`best_of_N`, `ranked`, `mean_of_samples`) with every figure of `FIGURES`; `paired` compares
per-example figures of a method with a reference's (mean difference, standard error, wins).
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
COVERAGE_BLOCK = 4  # px: `coverage` compares 4x4 averages of the hole (structure, not grain)
HF_EPS = 0.1  # grey levels added to both mean |Laplacian|s of hf_ratio (a flat truth: no 0/0)
FIGURES = ("psnr", "ssim", "l1", "hf_ratio", "seam")  # the figures of every fill-in method
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "l1": False, "seam": False}  # hf_ratio: 1 best


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


def _block_means(values: np.ndarray, missing: np.ndarray,
                 block: int) -> tuple[np.ndarray, np.ndarray]:
  """The hole's pixels averaged over `block` x `block` squares: values [P, H, W, C], missing
  [H, W] -> (means [P, S, C] over the S squares that hold missing pixels, their counts [S])."""
  p, h, w, c = values.shape
  hb, wb = -(-h // block), -(-w // block)
  pad = ((0, hb * block - h), (0, wb * block - w))
  weight = np.pad(missing.astype(np.float64), pad)
  vals = np.pad(values, ((0, 0), *pad, (0, 0))) * weight[None, :, :, None]
  sums = vals.reshape(p, hb, block, wb, block, c).sum(axis=(2, 4)).reshape(p, hb * wb, c)
  counts = weight.reshape(hb, block, wb, block).sum(axis=(1, 3)).reshape(-1)
  keep = counts > 0
  return sums[:, keep] / counts[keep, None], counts[keep]


def coverage(fills: np.ndarray, truth: np.ndarray, mask: np.ndarray,
             block: int = COVERAGE_BLOCK) -> dict[str, np.ndarray]:
  """`sample_spread`, `truth_spread`, `truth_rank` and `truth_outside` (module docstring) of
  N >= 2 fill-ins per context, on the hole averaged over `block` x `block` squares (1: pixel by
  pixel): fills [N, B, H, W, 3], truth [B, H, W, 3], mask [B, H, W, 1] -> {figure: [B]}. A
  context without a hole gives spreads 0 and rank 0. `spread_ratio(...)` summarises a set."""
  fills = np.asarray(fills, np.float64)
  n = fills.shape[0]
  if n < 2:
    raise ValueError(f"coverage needs at least 2 samples per context, got {n}")
  out = {"sample_spread": [], "truth_spread": [], "truth_rank": [], "truth_outside": []}
  for b in range(fills.shape[1]):
    values = np.concatenate([np.asarray(truth[b], np.float64)[None], fills[:, b]])  # truth first
    means, counts = _block_means(values, _missing(mask[b]), block)
    if counts.size == 0:  # no hole: nothing to cover
      between = to_truth = 0.0
      rank = 0
    else:
      w = np.sqrt(counts / counts.sum())[None, :, None]  # each square weighs its pixels
      points = (means * w).reshape(n + 1, -1)
      sq = np.sum(points * points, axis=1)
      d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * points @ points.T, 0.0) / means.shape[-1]
      between, to_truth = d[1:, 1:][np.triu_indices(n, 1)].mean(), d[0, 1:].mean()
      centrality = d.sum(axis=1)  # each fill-in's summed distance to the other N
      rank = int(np.sum(centrality[1:] < centrality[0]))  # ties count for the truth: 0..N
    out["sample_spread"].append(between)
    out["truth_spread"].append(to_truth)
    out["truth_rank"].append(rank / n)
    out["truth_outside"].append(float(rank == n))
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def spread_ratio(sample_spread: np.ndarray, truth_spread: np.ndarray) -> float:
  """`coverage`'s spread ratio of a set of examples: mean sample_spread / mean truth_spread
  (1 for a calibrated model; 1.0 when every truth equals every sample)."""
  den = float(np.mean(truth_spread))
  return float(np.mean(sample_spread)) / den if den > 0 else 1.0


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


def _mean_abs_laplacian(image: np.ndarray, missing: np.ndarray) -> float:
  """Mean |3x3 Laplacian| (per channel, reflected borders) over the missing sub-pixels."""
  x = np.asarray(image, np.float64)
  lap = np.stack([ndimage.laplace(x[..., c], mode="reflect") for c in range(x.shape[-1])], -1)
  return float(np.mean(np.abs(lap[missing])))


def hf_ratio(fill: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
  """High-frequency energy of the composited fill-in on the hole relative to the truth's.

  Args:
    fill: [H, W, 3] fill-in (composited into the truth's context here; its given pixels are not
      read).
    truth: [H, W, 3] true image.
    mask: [H, W, 1] or [H, W], 1 = given.

  Returns:
    (mean |Laplacian| of the composite over the hole + HF_EPS) / (the truth's + HF_EPS): 1 for
    the truth, > 1 for a noisier fill-in, < 1 for a smoother one (1 when nothing is missing).
  """
  missing = _missing(mask)
  if not missing.any():
    return 1.0
  truth = np.asarray(truth, np.float64)
  composite = np.where(missing[..., None], np.asarray(fill, np.float64), truth)
  return ((_mean_abs_laplacian(composite, missing) + HF_EPS)
          / (_mean_abs_laplacian(truth, missing) + HF_EPS))


def figures(fill: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
  """Every figure of `FIGURES` of one composited fill-in [H, W, 3] against the truth."""
  return {"psnr": psnr(fill, truth, mask), "ssim": ssim(fill, truth, mask),
          "l1": l1(fill, truth, mask), "hf_ratio": hf_ratio(fill, truth, mask),
          "seam": seam(fill, truth, mask)}


def batch_figures(fills: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """`figures` of one fill-in per context: fills, truth [B, H, W, 3], mask [B, H, W, 1] -> [B]."""
  rows = [figures(fills[b], truth[b], mask[b]) for b in range(len(truth))]
  return {k: np.array([r[k] for r in rows], np.float64) for k in FIGURES}


def per_sample_figures(fills: np.ndarray, truth: np.ndarray,
                       mask: np.ndarray) -> dict[str, np.ndarray]:
  """`figures` of each of N fill-ins per context: fills [N, B, H, W, 3] -> {figure: [N, B]}."""
  per = [batch_figures(f, truth, mask) for f in np.asarray(fills)]
  return {k: np.stack([p[k] for p in per]) for k in FIGURES}


def sample_methods(fills: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                   scores: np.ndarray | None = None,
                   per_sample: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
  """The N fill-ins per context as methods that each give one figure per context.

  Args:
    fills: [N, B, H, W, 3] composited fill-ins, 0..255.
    truth: [B, H, W, 3] true images.
    mask: [B, H, W, 1], 1 = given.
    scores: optional [N, B] model log-likelihood bounds (higher = more likely): adds `ranked`.
    per_sample: `per_sample_figures(fills, truth, mask)` if already computed.

  Returns:
    {method: {figure: [B]}} with methods `sample` (each figure averaged over the N fill-ins,
    and with N >= 2 the `coverage` figures of the N),
    `best_of_N` (the fill-in of highest PSNR, an oracle: it reads the truth), `ranked` (the
    fill-in the model scores highest) and `mean_of_samples` (the pixel average of the N).
  """
  fills = np.asarray(fills, np.float64)
  per = per_sample if per_sample is not None else per_sample_figures(fills, truth, mask)
  cols = np.arange(fills.shape[1])
  pick = lambda idx: {k: v[idx, cols] for k, v in per.items()}  # noqa: E731
  out = {"sample": {k: v.mean(axis=0) for k, v in per.items()},
         "best_of_N": pick(np.argmax(per["psnr"], axis=0))}
  if fills.shape[0] > 1:  # how the N samples lie around the truth (`coverage`)
    out["sample"].update(coverage(fills, truth, mask))
  if scores is not None:
    out["ranked"] = pick(np.argmax(np.asarray(scores), axis=0))
  out["mean_of_samples"] = batch_figures(fills.mean(axis=0), truth, mask)
  return out


def paired(a, b, higher_is_better: bool = True) -> dict[str, float]:
  """Paired comparison of per-example figures of a method (`a`) and a reference (`b`).

  Args:
    a: [n] the method's figure per example.
    b: [n] the reference's figure on the same examples.
    higher_is_better: True for PSNR or SSIM, False for L1 (decides what a win is).

  Returns:
    {"diff": mean(a - b), "stderr": its standard error std(a - b, ddof=1) / sqrt(n) (NaN for
    n < 2), "wins": examples where a is strictly better, "ties": equal ones, "n": n}.
  """
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f"paired: need two equal-length non-empty 1-D arrays; got {d.shape}")
  n = d.size
  better = d > 0 if higher_is_better else d < 0
  return {"diff": float(d.mean()),
          "stderr": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
          "wins": int(better.sum()), "ties": int((d == 0).sum()), "n": int(n)}


def sample_metrics(fills: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                   scores: np.ndarray | None = None,
                   per_sample: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Per-example quality figures of N composited fill-ins per context.

  Args:
    fills: [N, B, H, W, 3] fill-ins composited into their contexts, 0..255.
    truth: [B, H, W, 3] true images.
    mask: [B, H, W, 1], 1 = given.
    scores: optional [N, B] model log-likelihood bounds of each fill-in (higher = more likely);
      gives `psnr_rank`, the PSNR of the most likely fill-in.
    per_sample: `per_sample_figures(fills, truth, mask)` if already computed.

  Returns:
    {name: [B] float64}: psnr_best (best of N), psnr_mean (mean of N), psnr_of_mean (PSNR of
    the mean fill-in), ssim, l1, seam (each the mean over the N fill-ins), ssim_best, l1_best
    (best of N), diversity, and psnr_rank when `scores` is given.
  """
  fills = np.asarray(fills, np.float64)
  per = per_sample if per_sample is not None else per_sample_figures(fills, truth, mask)
  p, s, e = per["psnr"], per["ssim"], per["l1"]
  out = {"psnr_best": p.max(axis=0), "psnr_mean": p.mean(axis=0),
         "psnr_of_mean": np.array([psnr(fills[:, b].mean(axis=0), truth[b], mask[b])
                                   for b in range(fills.shape[1])]),
         "ssim": s.mean(axis=0), "l1": e.mean(axis=0), "seam": per["seam"].mean(axis=0),
         "ssim_best": s.max(axis=0), "l1_best": e.min(axis=0),
         "diversity": np.array([diversity(fills[:, b], mask[b]) for b in range(fills.shape[1])])}
  if scores is not None:
    out["psnr_rank"] = p[np.argmax(np.asarray(scores), axis=0), np.arange(fills.shape[1])]
  return out
