"""Per-pixel likelihoods p(x | z) of 8-bit RGB images (docs/design.md §2 "Output likelihood").

Three choices, selected by name through `get`:

  dmol                  discretised mixture of logistics, PixelCNN++ form (Salimans et al. 2017)
                        with per-component linear RGB coupling; 10 * K parameters per pixel.
  discretized_gaussian  independent Gaussian per sub-pixel integrated over its 8-bit bin;
                        6 parameters per pixel.
  gaussian              continuous Gaussian density on uniformly dequantised pixels x + u in
                        [0, 256); 6 parameters per pixel.

Every `log_prob` is in nats per pixel (the three sub-pixels together) and in units of the
discrete 8-bit pixel: the discrete ones give log-probabilities of the bin, the continuous one a
log-density per unit pixel value, whose expectation over u lower-bounds the discrete
log-likelihood. So -log_prob / (3 ln 2) is bits/dim for all three and they are comparable.

The network's raw outputs are read on the [-1, 1] data scale (pixel v <-> v / 127.5 - 1, bin
half-width 1 / 255), so an output head initialised near zero predicts mid-grey with unit scale
for every choice. Log-scales are clamped below at -7 (as in PixelCNN++) so densities stay
bounded; they are clamped above only when sampling, where exp() would otherwise overflow.

Why one file past ~350 lines: the three likelihoods share the data scale, the clamps, the
location-gradient rescaling (`model.likelihood_grad`) and the base classes; each is ~100 lines.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hvae.model.distributions import soft_clamp

MIN_LOG_SCALE = -7.0
# Sampling only: exp(20) on the [-1, 1] scale is far wider than the data range, so this changes
# no sample, but exp(log_scale) of an unbounded network output could overflow to inf.
_MAX_SAMPLE_LOG_SCALE = 20.0
# Below this bin mass the difference of CDFs is dominated by rounding; PixelCNN++ then uses the
# density at the bin centre times the bin width instead.
_MIN_BIN_MASS = 1e-5
_HALF_BIN = 1.0 / 255.0  # half the width of one 8-bit bin on the [-1, 1] scale
_LOG_BIN_WIDTH = math.log(2.0 / 255.0)  # log width of one bin on the [-1, 1] scale
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _to_unit(image: jnp.ndarray) -> jnp.ndarray:
  """Pixel values 0..255 (any dtype) -> float32 on the [-1, 1] scale."""
  return jnp.asarray(image, jnp.float32) / 127.5 - 1.0


def _quantize(x: jnp.ndarray) -> jnp.ndarray:
  """[-1, 1]-scale values -> the nearest 8-bit pixel value as float32 in [0, 255].

  Values outside [-1, 1] go to the edge bins, which extend to infinity.
  """
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0.0, 255.0)


def _log1mexp(d: jnp.ndarray) -> jnp.ndarray:
  """log(1 - exp(d)) for d < 0, accurate for d near 0 and for very negative d."""
  return jnp.where(d > -math.log(2.0), jnp.log(-jnp.expm1(d)), jnp.log1p(-jnp.exp(d)))


def scale_location_grad(mu: jnp.ndarray, scale: jnp.ndarray, normalize: bool = False
                        ) -> jnp.ndarray:
  """`mu` in value, with the gradient that reaches it multiplied by stop_gradient(`scale`).

  The gradient of a location-scale log-density with respect to its location grows as 1 / scale
  (up to 1 / scale for a logistic, residual / scale^2 for a Gaussian). A channel the model
  predicts almost exactly (G given R in a grey image, scale ~1e-3) then sends gradients ~100x
  larger than a hard channel (scale ~0.2) into the features they share, and Adam's
  per-parameter normalisation turns the hard channel's signal into noise: the model learns the
  coupling and nothing about the hole (docs/results.md, "Learning structure"). Multiplied by
  the scale, every location's gradient is bounded by 1 (logistic) or residual / scale
  (Gaussian), as in beta-NLL with beta = 1/2 (Seitzer et al., ICLR 2022).

  Every value, hence every log-likelihood reported, is exactly the same. The objective's
  gradient is not: only the location terms are rescaled (not the log-scales, the mixture
  weights or the KL), so this reweights the reconstruction against the KL and the pixels
  against each other, and training converges to a different point than with exact gradients.
  That is the intent for the coupled channels; measure it before using it elsewhere. With
  `normalize`, the factor is scale / mean(scale) over the whole tensor: the same reweighting
  between channels and pixels, but location gradients keep their average size against the
  log-scales, the mixture weights and the KL.
  """
  scale = jax.lax.stop_gradient(scale)
  if normalize:
    scale = scale / jnp.mean(scale)
  return jax.lax.stop_gradient(mu) + scale * (mu - jax.lax.stop_gradient(mu))


LOCATION_GRADS = ("exact", "scaled", "scaled_mean")


def location(mu: jnp.ndarray, log_scale: jnp.ndarray, grad: str, power=1.0) -> jnp.ndarray:
  """`mu` with the gradient mode `grad`: exact, scaled (`scale_location_grad`, with the factor
  min(scale, 1)) or scaled_mean (the same, its factor normalised by its mean).

  `power` p (a float or a traced scalar in [0, 1]) makes the factor scale**p: 1 is the mode
  itself, 0 exact gradients, values between anneal from one to the other
  (`location_grad_power`). The value of `mu` is the same for every p.
  """
  if grad == "exact":
    return mu
  if grad not in LOCATION_GRADS:
    raise ValueError(f"location gradients: {grad!r} is not one of {', '.join(LOCATION_GRADS)}")
  # The factor is capped at 1 (scale 1 already spans the data range [-1, 1]): an unused
  # mixture component's log-scale drifts freely, and exp(log_scale > 88) overflows float32,
  # where `scale_location_grad`'s inf * 0 made the value NaN (a deterministic run died so).
  log_scale = jnp.minimum(log_scale, 0.0)
  scale = jnp.exp(log_scale) if isinstance(power, (int, float)) and power == 1 else jnp.exp(
      power * log_scale)
  return scale_location_grad(mu, scale, normalize=grad == "scaled_mean")


def location_grad_power(step: jnp.ndarray, anneal: tuple[int, ...]) -> jnp.ndarray:
  """The exponent p of the location-gradient factor scale**p at training step `step`.

  `anneal` = (start, end) (`model.likelihood_grad_anneal`): p = 1 (the scaled mode) before
  `start`, 0 (exact gradients) from `end` on, linear in between; () keeps p = 1 throughout.
  Scaled gradients first let the hard channel (R of a grey photo) shape the features; the
  exact ones then let the mixture learn the near-deterministic coupling of G and B given R,
  which the scaled ones learn slowly (docs/results.md, "Learning structure").
  """
  if not anneal:
    return jnp.ones((), jnp.float32)
  start, end = anneal
  step = jnp.asarray(step, jnp.float32)
  if end <= start:
    return jnp.where(step < start, 1.0, 0.0).astype(jnp.float32)
  return jnp.clip((end - step) / (end - start), 0.0, 1.0).astype(jnp.float32)


def _check_params(params: jnp.ndarray, num_params: int) -> jnp.ndarray:
  if params.shape[-1] != num_params:
    raise ValueError(
      f"expected {num_params} likelihood parameters per pixel, got params of shape {params.shape}"
    )
  return jnp.asarray(params, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Likelihood(abc.ABC):
  """A per-pixel likelihood over 8-bit RGB pixels; hashable, so it can be a static field.

  Shapes: params [..., num_params] (raw network output), images [..., 3] with pixel values in
  0..255; the leading dims (usually B, H, W) are shared.
  """

  @property
  @abc.abstractmethod
  def num_params(self) -> int:
    """Channels the network must output per pixel."""

  @abc.abstractmethod
  def add_base(self, params: jnp.ndarray, base: jnp.ndarray) -> jnp.ndarray:
    """Raw params whose distribution is that of `params` moved by `base` (`model.fill_residual`):
    x ~ add_base(params, base) iff x - base ~ params, on the [-1, 1] data scale (up to the
    8-bit bins and the [-1, 1] edges, which stay where they are).

    Args:
      params: [..., num_params] raw network output.
      base: [..., 3] values on the [-1, 1] scale (the prior input's fill).
    """

  @abc.abstractmethod
  def log_prob(
    self, params: jnp.ndarray, image: jnp.ndarray, rng: jax.Array | None = None
  ) -> jnp.ndarray:
    """Log-likelihood of every pixel.

    Args:
      params: [..., num_params] float raw network output.
      image: [..., 3] pixel values in 0..255 (uint8 or float).
      rng: PRNG key for dequantisation noise; only read by "gaussian".

    Returns:
      [...] nats per pixel (three sub-pixels together), in units of the discrete pixel.
    """

  def box_log_prob(
    self, params: jnp.ndarray, image: jnp.ndarray, rng: jax.Array | None, box: tuple[int, ...]
  ) -> jnp.ndarray:
    """`log_prob` of the pixels of a static box of the image, from that box's parameters alone.

    Equal to `log_prob(full_params, image, rng)[:, top:bottom, left:right]` where `params` is
    `full_params[:, top:bottom, left:right]`: any noise ("gaussian"'s dequantisation) is drawn
    for the whole image and cropped, so both paths score the same values.

    Args:
      params: [B, bottom - top, right - left, num_params] raw network output of the box.
      image: [B, H, W, 3] the whole image, pixel values in 0..255.
      rng: as for `log_prob`.
      box: (top, bottom, left, right), end-exclusive.

    Returns:
      [B, bottom - top, right - left] nats per pixel.
    """
    y0, y1, x0, x1 = box
    return self.log_prob(params, image[:, y0:y1, x0:x1], rng)

  def channel_chain_log_prob(
    self, params: jnp.ndarray, image: jnp.ndarray, rng: jax.Array | None = None
  ) -> jnp.ndarray:
    """Each sub-pixel's share of `log_prob`: log p(r), log p(g | r), log p(b | r, g).

    Exact chain-rule terms (they sum to `log_prob`), so a model that only learned to copy R
    into G and B shows it: small G and B terms, a large R term.

    Returns:
      [..., 3] nats.
    """
    return self.channel_log_prob(params, image, rng)

  @abc.abstractmethod
  def sample(self, params: jnp.ndarray, rng: jax.Array, temperature: float = 1.0) -> jnp.ndarray:
    """Draws pixels.

    Args:
      params: [..., num_params] raw network output.
      rng: PRNG key.
      temperature: scales the noise of each sub-pixel, and tempers a mixture's component
        choice (softmax(logits / T)): T -> 0 gives `mode`, T = 1 the likelihood.

    Returns:
      [..., 3] float32 with integer values in [0, 255].
    """

  @abc.abstractmethod
  def mode(self, params: jnp.ndarray) -> jnp.ndarray:
    """The deterministic "best" pixel: [..., 3] float32 with integer values in [0, 255]."""

  @abc.abstractmethod
  def mean(self, params: jnp.ndarray) -> jnp.ndarray:
    """The (approximate) expected pixel: [..., 3] float32 in [0, 255]."""


@dataclasses.dataclass(frozen=True)
class DiscretizedMixLogistic(Likelihood):
  """Discretised mixture of K logistics with per-component linear RGB coupling (PixelCNN++).

  Parameter layout per pixel (10 K channels): [0:K] mixture logits, then [K:10K] reshaped to
  [3, 3, K] = (means, log-scales, raw coupling coefficients) x (R, G, B) x component; the
  coupling coefficients are tanh(raw) = (alpha, beta, gamma), and given the true R, G values
  the G mean is mu_g + alpha * x_r and the B mean mu_b + beta * x_r + gamma * x_g.
  """

  num_mixtures: int
  location_grad: str = "exact"  # LOCATION_GRADS: gradients of the coupled means
  location_grad_power: Any = 1.0  # p of the factor scale**p (`location`); traced in training
  mean_clamp: float = 0.0  # `model.likelihood_mean_clamp`: c > 0 soft-clamps the means (`_split`)

  def __post_init__(self):
    if self.num_mixtures < 1:
      raise ValueError(f"num_mixtures must be >= 1, got {self.num_mixtures}")

  @property
  def num_params(self) -> int:
    return 10 * self.num_mixtures

  def add_base(self, params, base):
    # The coupled means (`_coupled_means`) act on x - base: mean_g = m_g + c0 r must become
    # base_g + m_g + c0 (r - base_r), so m_g moves by base_g - c0 base_r (and m_b likewise).
    # Without the correction a grey image's G would have to cancel the fill to follow R.
    params = _check_params(params, self.num_params)
    k = self.num_mixtures
    _, _, _, coeffs = self._split(params)
    r, g, b = (base[..., c:c + 1] for c in range(3))
    shift = jnp.stack([jnp.broadcast_to(r, coeffs[..., 0, :].shape),
                       g - coeffs[..., 0, :] * r,
                       b - coeffs[..., 1, :] * r - coeffs[..., 2, :] * g], axis=-2)
    means = params[..., k:4 * k] + shift.reshape(params.shape[:-1] + (3 * k,))
    return jnp.concatenate([params[..., :k], means, params[..., 4 * k:]], axis=-1)

  def _split(self, params: jnp.ndarray):
    """Raw params -> (logits [..., K], means, log_scales, coeffs, each [..., 3, K])."""
    params = _check_params(params, self.num_params)
    k = self.num_mixtures
    logits = params[..., :k]
    rest = params[..., k:].reshape(params.shape[:-1] + (3, 3, k))
    means, log_scales, coeffs = rest[..., 0, :, :], rest[..., 1, :, :], rest[..., 2, :, :]
    # `model.likelihood_mean_clamp` = c: |mean| < c, the coupling adds at most |beta| + |gamma|
    # <= 2 and the data are in [-1, 1], so |x - mu| < c + 3: a sub-pixel costs < ~(c + 3) e^7
    # nats. A B mean may need |m_b| up to 3 (|m_g| up to 2) to reach every value: c >= 3 keeps
    # every mean reachable.
    return (logits, soft_clamp(means, self.mean_clamp), jnp.maximum(log_scales, MIN_LOG_SCALE),
            jnp.tanh(coeffs))

  @staticmethod
  def _coupled_means(means, coeffs, x_r, x_g):
    """Means of R, G, B [..., 3, K] given R, G values (broadcastable to [..., K])."""
    mean_g = means[..., 1, :] + coeffs[..., 0, :] * x_r
    mean_b = means[..., 2, :] + coeffs[..., 1, :] * x_r + coeffs[..., 2, :] * x_g
    return jnp.stack([means[..., 0, :], mean_g, mean_b], axis=-2)

  def component_log_probs(self, params: jnp.ndarray, image: jnp.ndarray):
    """Mixture log-weights and each component's per-channel conditional log-probabilities.

    Args:
      params: [..., 10 K] raw network output.
      image: [..., 3] pixel values in 0..255.

    Returns:
      (log_weights [..., K], log_probs [..., 3, K]) where log_probs[..., c, k] is
      log p_k(x_c | x_<c) of the discrete bin, so the pixel's log-probability is
      logsumexp_k(log_weights + sum_c log_probs[..., c, k]).
    """
    logits, means, log_scales, coeffs = self._split(params)
    pixels = jnp.asarray(image, jnp.float32)[..., None]  # [..., 3, 1]
    x = _to_unit(pixels)
    # The coupling reads the true (data) values of the earlier channels.
    mu = self._coupled_means(means, coeffs, x[..., 0, :], x[..., 1, :])
    mu = location(mu, log_scales, self.location_grad, self.location_grad_power)
    inv_s = jnp.exp(-log_scales)
    centred = x - mu
    plus_in = inv_s * (centred + _HALF_BIN)
    min_in = inv_s * (centred - _HALF_BIN)
    mid_in = inv_s * centred
    # Edge bins extend to -inf / +inf; log-sigmoids are exact there.
    log_cdf_plus = jax.nn.log_sigmoid(plus_in)
    log_one_minus_cdf_min = jax.nn.log_sigmoid(-min_in)
    # Interior bins: difference of the two tails on the side of the bin away from the mean, so
    # a bin far above the mean does not subtract two numbers close to 1.
    upper = mid_in > 0
    delta = jnp.where(
      upper,
      jax.nn.sigmoid(-min_in) - jax.nn.sigmoid(-plus_in),
      jax.nn.sigmoid(plus_in) - jax.nn.sigmoid(min_in),
    )
    log_delta = jnp.log(jnp.maximum(delta, 1e-12))
    # log of the logistic density at the bin centre, written symmetrically so it cannot
    # overflow; the fallback approximates the bin mass by density x bin width (2/255).
    abs_mid = jnp.abs(mid_in)
    log_pdf_mid = -abs_mid - log_scales - 2.0 * jax.nn.softplus(-abs_mid)
    interior = jnp.where(delta > _MIN_BIN_MASS, log_delta, log_pdf_mid + _LOG_BIN_WIDTH)
    log_probs = jnp.where(
      pixels < 0.5, log_cdf_plus, jnp.where(pixels > 254.5, log_one_minus_cdf_min, interior)
    )
    return jax.nn.log_softmax(logits, axis=-1), log_probs

  def log_prob(self, params, image, rng=None):
    del rng  # deterministic
    log_weights, log_probs = self.component_log_probs(params, image)
    return jax.nn.logsumexp(log_weights + jnp.sum(log_probs, axis=-2), axis=-1)

  def channel_chain_log_prob(self, params, image, rng=None):
    del rng  # deterministic
    log_weights, log_probs = self.component_log_probs(params, image)
    # log p(r), log p(r, g), log p(r, g, b): marginals of the mixture over the channel prefix.
    prefix = jax.nn.logsumexp(log_weights[..., None, :] + jnp.cumsum(log_probs, axis=-2), axis=-1)
    return jnp.concatenate([prefix[..., :1], jnp.diff(prefix, axis=-1)], axis=-1)

  def _select(self, tensor: jnp.ndarray, component: jnp.ndarray) -> jnp.ndarray:
    """[..., 3, K] -> [..., 3] at the given component index [...]."""
    index = jnp.broadcast_to(component[..., None, None], tensor.shape[:-1] + (1,))
    return jnp.take_along_axis(tensor, index, axis=-1)[..., 0]

  def _chain(self, means, log_scales, coeffs, noise):
    """Quantised R, then G | R, then B | R, G for one chosen component per pixel ([..., 3]).

    Each channel couples to the already-quantised earlier channels, so the sampler draws
    exactly the discrete conditionals that `log_prob` scores.
    """
    scales = jnp.exp(jnp.minimum(log_scales, _MAX_SAMPLE_LOG_SCALE))
    r = _quantize(means[..., 0] + scales[..., 0] * noise[..., 0])
    x_r = _to_unit(r)
    g = _quantize(means[..., 1] + coeffs[..., 0] * x_r + scales[..., 1] * noise[..., 1])
    x_g = _to_unit(g)
    b = _quantize(
      means[..., 2] + coeffs[..., 1] * x_r + coeffs[..., 2] * x_g + scales[..., 2] * noise[..., 2]
    )
    return jnp.stack([r, g, b], axis=-1)

  def sample(self, params, rng, temperature=1.0):
    logits, means, log_scales, coeffs = self._split(params)
    component_rng, noise_rng = jax.random.split(rng)
    # Temperature tempers the whole draw: the logistic noise is scaled by T and the component is
    # drawn from softmax(logits / T), so T -> 0 gives `mode` (the likeliest component's value)
    # and T = 1 the likelihood itself. Scaling the noise alone left every pixel's component
    # choice at full randomness: near-black and near-white specks at any T > 0 (docs/results.md,
    # "Pixel temperature").
    t = jnp.asarray(temperature, jnp.float32)
    component = jnp.where(  # at T = 0 exactly `mode`'s choice (ties to the first), not a draw
        t > 0, jax.random.categorical(component_rng, logits / jnp.maximum(t, 1e-6), axis=-1),
        jnp.argmax(logits, axis=-1))
    noise = temperature * jax.random.logistic(noise_rng, logits.shape[:-1] + (3,), jnp.float32)
    return self._chain_component(means, log_scales, coeffs, component, noise)

  def mode(self, params):
    logits, means, log_scales, coeffs = self._split(params)
    component = jnp.argmax(logits, axis=-1)
    zeros = jnp.zeros(logits.shape[:-1] + (3,), jnp.float32)
    return self._chain_component(means, log_scales, coeffs, component, zeros)

  def _chain_component(self, means, log_scales, coeffs, component, noise):
    """`_chain` on the parameters of the chosen mixture component of every pixel."""
    pick = lambda x: self._select(x, component)  # noqa: E731
    return self._chain(pick(means), pick(log_scales), pick(coeffs), noise)

  def mean(self, params):
    logits, means, _, coeffs = self._split(params)
    # Approximation: each component's channel means, clipped to the data range, with the
    # coupling applied to the (clipped) means of the earlier channels.
    r = jnp.clip(means[..., 0, :], -1.0, 1.0)
    g = jnp.clip(means[..., 1, :] + coeffs[..., 0, :] * r, -1.0, 1.0)
    b = jnp.clip(means[..., 2, :] + coeffs[..., 1, :] * r + coeffs[..., 2, :] * g, -1.0, 1.0)
    weights = jax.nn.softmax(logits, axis=-1)[..., None, :]
    x = jnp.sum(weights * jnp.stack([r, g, b], axis=-2), axis=-1)
    return (x + 1.0) * 127.5


@dataclasses.dataclass(frozen=True)
class _ChannelGaussians(Likelihood):
  """The layout the two Gaussian likelihoods share: per pixel 6 channels, [0:3] the means and
  [3:6] the log-scales (floored at MIN_LOG_SCALE) of R, G, B; independent channels."""

  location_grad: str = "exact"  # LOCATION_GRADS: gradients of the means
  location_grad_power: Any = 1.0  # p of the factor scale**p (`location`); traced in training
  mean_clamp: float = 0.0  # `model.likelihood_mean_clamp`: c > 0 soft-clamps the means (`_split`)

  @property
  def num_params(self) -> int:
    return 6

  def add_base(self, params, base):
    params = _check_params(params, self.num_params)
    return jnp.concatenate([params[..., :3] + base, params[..., 3:]], axis=-1)

  def _split(self, params):
    params = _check_params(params, self.num_params)
    return soft_clamp(params[..., :3], self.mean_clamp), jnp.maximum(params[..., 3:], MIN_LOG_SCALE)

  def log_prob(self, params, image, rng=None):
    return jnp.sum(self.channel_log_prob(params, image, rng), axis=-1)


@dataclasses.dataclass(frozen=True)
class DiscretizedGaussian(_ChannelGaussians):
  """Independent Gaussian per sub-pixel, integrated over its 8-bit bin (edges to +-inf).

  Parameter layout per pixel (6 channels): [0:3] means, [3:6] log-scales of R, G, B on the
  [-1, 1] scale.
  """

  def channel_log_prob(
    self, params: jnp.ndarray, image: jnp.ndarray, rng: jax.Array | None = None
  ) -> jnp.ndarray:
    """[..., 3] log-probability (nats) of each sub-pixel's bin, from params [..., 6] and image
    [..., 3] in 0..255; deterministic: `rng` is unused."""
    del rng
    mu, log_s = self._split(params)
    mu = location(mu, log_s, self.location_grad, self.location_grad_power)
    pixels = jnp.asarray(image, jnp.float32)
    x = _to_unit(pixels)
    inv_s = jnp.exp(-log_s)
    lo = inv_s * (x - _HALF_BIN - mu)
    hi = inv_s * (x + _HALF_BIN - mu)
    mid = inv_s * (x - mu)
    log_cdf_hi = jax.scipy.special.log_ndtr(hi)  # bin 0: P(X < hi)
    log_sf_lo = jax.scipy.special.log_ndtr(-lo)  # bin 255: P(X > lo)
    # Interior: Phi(b) - Phi(a) on the lower-tail side of the mean (mirror the bin when it
    # lies above the mean), in log space: log Phi(b) + log(1 - Phi(a) / Phi(b)).
    upper = mid > 0
    a = jnp.where(upper, -hi, lo)
    b = jnp.where(upper, -lo, hi)
    log_phi_b = jax.scipy.special.log_ndtr(b)
    # A ratio within 1e-6 of 1 means a bin mass below 1e-6, where the fallback is used anyway;
    # capping it keeps log(1 - ratio) and its gradient finite in the unused branch.
    d = jnp.minimum(jax.scipy.special.log_ndtr(a) - log_phi_b, -1e-6)
    log_mass = log_phi_b + _log1mexp(d)
    log_pdf_mid = -0.5 * jnp.square(mid) - log_s - _HALF_LOG_2PI
    interior = jnp.where(log_mass > math.log(_MIN_BIN_MASS), log_mass, log_pdf_mid + _LOG_BIN_WIDTH)
    return jnp.where(pixels < 0.5, log_cdf_hi, jnp.where(pixels > 254.5, log_sf_lo, interior))

  def sample(self, params, rng, temperature=1.0):
    mu, log_s = self._split(params)
    noise = jax.random.normal(rng, mu.shape, jnp.float32)
    scale = jnp.exp(jnp.minimum(log_s, _MAX_SAMPLE_LOG_SCALE))
    return _quantize(mu + temperature * scale * noise)

  def mode(self, params):
    mu, _ = self._split(params)
    return _quantize(mu)

  def mean(self, params):
    mu, _ = self._split(params)
    # Approximation: ignores the mass the edge bins collect from beyond the data range.
    return (jnp.clip(mu, -1.0, 1.0) + 1.0) * 127.5


@dataclasses.dataclass(frozen=True)
class Gaussian(_ChannelGaussians):
  """Continuous Gaussian on dequantised pixels y = x + u, u ~ U[0, 1), y in [0, 256).

  Parameter layout per pixel (6 channels): [0:3] means, [3:6] log-scales of R, G, B on the
  scale y / 128 - 1 (so [0, 256) maps onto [-1, 1)). The density is reported per unit pixel
  value, so E_u[-log p(x + u)] upper-bounds the discrete NLL in nats (Theis et al. 2016).
  """

  def channel_log_prob(
    self, params: jnp.ndarray, image: jnp.ndarray, rng: jax.Array | None = None
  ) -> jnp.ndarray:
    """Log-density of each dequantised sub-pixel, per unit pixel value.

    Args:
      params: [..., 6] raw network output.
      image: [..., 3] pixel values in 0..255.
      rng: PRNG key for u ~ U[0, 1); None evaluates at the bin centre x + 0.5.

    Returns:
      [..., 3] nats.
    """
    pixels = jnp.asarray(image, jnp.float32)
    u = 0.5 if rng is None else jax.random.uniform(rng, pixels.shape, jnp.float32)
    return self._dequantized_log_prob(params, pixels, u)

  def box_log_prob(self, params, image, rng, box):
    y0, y1, x0, x1 = box
    pixels = jnp.asarray(image, jnp.float32)
    # The whole image's noise, cropped: the same u per pixel as the whole-image pass draws.
    u = 0.5 if rng is None else jax.random.uniform(rng, pixels.shape, jnp.float32)[
        :, y0:y1, x0:x1]
    channels = self._dequantized_log_prob(params, pixels[:, y0:y1, x0:x1], u)
    return jnp.sum(channels, axis=-1)

  def _dequantized_log_prob(self, params, pixels, u):
    """[..., 3] log-density of pixels + u per unit pixel value (see `channel_log_prob`)."""
    mu, log_s = self._split(params)
    mu = location(mu, log_s, self.location_grad, self.location_grad_power)
    y = (pixels + u) / 128.0 - 1.0
    z = (y - mu) * jnp.exp(-log_s)
    # -log(128): change of variables from the [-1, 1) scale back to pixel units.
    return -0.5 * jnp.square(z) - log_s - _HALF_LOG_2PI - math.log(128.0)

  def sample(self, params, rng, temperature=1.0):
    mu, log_s = self._split(params)
    noise = jax.random.normal(rng, mu.shape, jnp.float32)
    scale = jnp.exp(jnp.minimum(log_s, _MAX_SAMPLE_LOG_SCALE))
    # floor inverts the dequantisation x + u.
    return jnp.clip(jnp.floor((mu + temperature * scale * noise + 1.0) * 128.0), 0.0, 255.0)

  def mode(self, params):
    mu, _ = self._split(params)
    return jnp.clip(jnp.floor((mu + 1.0) * 128.0), 0.0, 255.0)

  def mean(self, params):
    mu, _ = self._split(params)
    # E[floor(y)] ~ E[y] - 1/2 away from the clipped edges.
    return jnp.clip((mu + 1.0) * 128.0 - 0.5, 0.0, 255.0)


_REGISTRY: dict[str, Callable[[int, str, float], Likelihood]] = {
  "dmol": lambda k, grad, clamp: DiscretizedMixLogistic(k, grad, mean_clamp=clamp),
  "discretized_gaussian": lambda k, grad, clamp: DiscretizedGaussian(grad, mean_clamp=clamp),
  "gaussian": lambda k, grad, clamp: Gaussian(grad, mean_clamp=clamp),
}
NAMES = tuple(_REGISTRY)


def get(name: str, num_mixtures: int, location_grad: str = "exact",
        mean_clamp: float = 0.0) -> Likelihood:
  """The likelihood called `name`.

  Args:
    name: one of NAMES ("dmol", "discretized_gaussian", "gaussian").
    num_mixtures: K, the number of mixture components (read by "dmol" only).
    location_grad: "exact", or "scaled" / "scaled_mean" to multiply the gradient reaching every
      location parameter by its scale (`scale_location_grad`); log-likelihood values are
      unchanged, gradients are not.
    mean_clamp: c > 0 passes every location through c * tanh(. / c) (after a fill's base is
      added, `add_base`), so a runaway output head costs a bounded loss; 0 = off.

  Returns:
    A hashable `Likelihood`.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones) or a negative or
      non-finite `mean_clamp`.
  """
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown likelihood {name!r}; valid names: {', '.join(NAMES)}") from None
  if not (math.isfinite(mean_clamp) and mean_clamp >= 0):
    raise ValueError(f"mean_clamp must be finite and >= 0 (0 = off), got {mean_clamp}")
  return factory(num_mixtures, location_grad, mean_clamp)
