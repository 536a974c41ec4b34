"""Tests of hvae.model.likelihoods: normalisation, references, sampling, numerical safety.

Why one file past ~350 lines: the three likelihoods are held to the same properties
(normalisation, references, sampling, gradients) side by side, one parametrised test each.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RUN_OPTIONS, tiny_model_config
from scipy import stats

from hvae.errors import ConfigError
from hvae.model import likelihoods
from hvae.model.ladder import HVAE

DISCRETE = ("dmol", "discretized_gaussian")
K = 3
VALUES = np.arange(256, dtype=np.float32)


def _lik(name: str, num_mixtures: int = K) -> likelihoods.Likelihood:
  return likelihoods.get(name, num_mixtures)


# Jitted entry points shared by all tests; the likelihood is a static (hashable) argument, so each
# (likelihood, shape) pair compiles once per session.
@functools.partial(jax.jit, static_argnums=0)
def _log_prob(lik, params, image, rng=None):
  return lik.log_prob(params, image, rng)


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_OPTIONS)
def _log_prob_run(lik, params, image, rng):
  return lik.log_prob(params, image, rng)


@functools.partial(jax.jit, static_argnums=0)
def _channel_log_prob(lik, params, image):
  return lik.channel_log_prob(params, image)


@functools.partial(jax.jit, static_argnums=0)
def _component_log_probs(lik, params, image):
  return lik.component_log_probs(params, image)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sample(lik, params, rng, temperature):
  return lik.sample(params, rng, temperature)


@functools.partial(jax.jit, static_argnums=0)
def _mode_and_mean(lik, params):
  return lik.mode(params), lik.mean(params)


@functools.partial(jax.jit, static_argnums=0)
def _grad_mean_log_prob(lik, params, image, rng):
  return jax.grad(lambda p: jnp.mean(lik.log_prob(p, image, rng)))(params)


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_OPTIONS)  # 2^24 terms
def _dmol_joint_marginals(lik, p):
  """Probabilities of one pixel summed over all 256^3 values, one R value at a time.

  Returns p(r, g) and p(r, b), each [256, 256], by brute force through `log_prob`.
  """
  v = jnp.arange(256, dtype=jnp.float32)
  g, b = jnp.meshgrid(v, v, indexing="ij")
  params = jnp.broadcast_to(p, (256, 256, p.shape[-1]))

  def per_r(r):
    image = jnp.stack([jnp.full_like(g, r), g, b], axis=-1)
    prob = jnp.exp(lik.log_prob(params, image))  # [g, b]
    return prob.sum(1), prob.sum(0)

  return jax.lax.map(per_r, v)


def _slices(lik):
  """Parameter groups of a likelihood: name -> slice of the last axis."""
  if isinstance(lik, likelihoods.DiscretizedMixLogistic):
    k = lik.num_mixtures
    return dict(
      logits=slice(0, k),
      means=slice(k, 4 * k),
      log_scales=slice(4 * k, 7 * k),
      coeffs=slice(7 * k, 10 * k),
    )
  return dict(means=slice(0, 3), log_scales=slice(3, 6))


EXTREMES = {
  "random": {},
  "log_scale_-10": dict(log_scales=-10.0),
  "log_scale_+5": dict(log_scales=5.0),
  "mean_+5": dict(means=5.0),
  "mean_-5_sharp": dict(means=-5.0, log_scales=-10.0),
  "mean_+5_wide": dict(means=5.0, log_scales=5.0),
  "huge_logits": dict(logits="huge"),
  "huge_coupling": dict(coeffs="huge"),
  "wild": dict(means="wild", log_scales="wild", logits="huge"),
}


def _params(lik, case: str, n: int, seed: int = 0) -> np.ndarray:
  """[n, num_params] random raw params with one group overridden per EXTREMES[case]."""
  rs = np.random.RandomState(seed)
  groups = _slices(lik)
  p = rs.normal(0.0, 1.0, (n, lik.num_params)).astype(np.float32)
  p[:, groups["means"]] *= 0.6
  p[:, groups["log_scales"]] = rs.uniform(-5.0, 0.0, p[:, groups["log_scales"]].shape)
  for group, value in EXTREMES[case].items():
    if group not in groups:
      continue
    shape = p[:, groups[group]].shape
    if value == "huge":
      value = rs.choice([-1e4, 0.0, 1e4, 3e4], shape)
    elif value == "wild":
      value = rs.uniform(-10.0, 5.0, shape) if group == "log_scales" else rs.uniform(-5, 5, shape)
    p[:, groups[group]] = value
  return p


def _all_values_image(n: int, channel: int, fixed: np.ndarray) -> np.ndarray:
  """[256, n, 3] images: `channel` runs over 0..255, the others are `fixed` [n, 3]."""
  image = np.broadcast_to(fixed, (256, n, 3)).copy()
  image[:, :, channel] = VALUES[:, None]
  return image


# ----------------------------------------------------------------------------------- registry


def test_get_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    likelihoods.get("laplace", 5)
  for name in ("dmol", "discretized_gaussian", "gaussian"):
    assert name in str(err.value)


def test_get_num_params_and_hashable():
  assert likelihoods.get("dmol", 5).num_params == 50
  assert likelihoods.get("discretized_gaussian", 5).num_params == 6
  assert likelihoods.get("gaussian", 5).num_params == 6
  assert likelihoods.get("dmol", 3) == likelihoods.get("dmol", 3)
  assert hash(likelihoods.get("dmol", 3)) == hash(likelihoods.get("dmol", 3))
  assert likelihoods.get("gaussian", 1) != likelihoods.get("discretized_gaussian", 1)
  with pytest.raises(ValueError):
    likelihoods.get("dmol", 0)


def test_wrong_param_count_raises():
  with pytest.raises(ValueError, match="30"):
    _lik("dmol").log_prob(jnp.zeros((1, 2, 2, 6)), jnp.zeros((1, 2, 2, 3)))


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_discretized_gaussian_sums_to_one(case):
  lik = _lik("discretized_gaussian")
  n = 16
  p = np.broadcast_to(_params(lik, case, n), (256, n, 6))
  image = _all_values_image(n, 0, np.zeros((n, 3), np.float32))
  image[:] = VALUES[:, None, None]  # every channel runs over 0..255 together (independent)
  lp = np.asarray(_channel_log_prob(lik, p, image))  # [256, n, 3]
  assert np.all(np.isfinite(lp))
  np.testing.assert_allclose(np.exp(lp).sum(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_dmol_r_marginal_sums_to_one(case):
  lik = _lik("dmol")
  n = 16
  p = np.broadcast_to(_params(lik, case, n), (256, n, lik.num_params))
  image = _all_values_image(n, 0, np.random.RandomState(1).randint(0, 256, (n, 3)))
  log_w, log_p = _component_log_probs(lik, p, image)
  marginal = jax.nn.logsumexp(log_w + log_p[..., 0, :], axis=-1)  # [256, n]
  assert np.all(np.isfinite(np.asarray(log_p)))
  np.testing.assert_allclose(np.exp(marginal).sum(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("case", sorted(EXTREMES))
@pytest.mark.parametrize("channel", [1, 2])
def test_dmol_conditionals_sum_to_one(case, channel):
  """p_k(g | r) and p_k(b | r, g) sum to 1 for every component (incl. a 1-component mixture)."""
  for num_mixtures in (1, K):
    lik = _lik("dmol", num_mixtures)
    n = 16
    p = np.broadcast_to(_params(lik, case, n, seed=channel), (256, n, lik.num_params))
    fixed = np.random.RandomState(channel).randint(0, 256, (n, 3))
    fixed[:2, :] = [[0, 255, 0], [255, 0, 255]]  # conditioning on the edge values too
    _, log_p = _component_log_probs(lik, p, _all_values_image(n, channel, fixed))
    np.testing.assert_allclose(np.exp(log_p[..., channel, :]).sum(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_dmol_full_joint_sums_to_one(seed):
  lik = _lik("dmol", 2 + seed)
  p = _params(lik, "random", 1, seed=seed)[0]
  p_rg, p_rb = _dmol_joint_marginals(lik, p)
  np.testing.assert_allclose(float(np.asarray(p_rg, np.float64).sum()), 1.0, atol=1e-4)
  np.testing.assert_allclose(float(np.asarray(p_rb, np.float64).sum()), 1.0, atol=1e-4)


# --------------------------------------------------------------------------------- references


def _ref_discretized(x, mean, scale, dist):
  """log P(bin of pixel x) under a scipy `dist` (float64), with edges to +-inf and the
  density fallback below 1e-5. Also returns the bin mass, for skipping near-threshold cases."""
  c = x / 127.5 - 1.0
  hi, lo = c + 1 / 255, c - 1 / 255
  upper = c > mean
  mass = np.where(
    upper,
    dist.sf(lo, mean, scale) - dist.sf(hi, mean, scale),
    dist.cdf(hi, mean, scale) - dist.cdf(lo, mean, scale),
  )
  interior = np.where(
    mass > 1e-5, np.log(np.maximum(mass, 1e-300)), dist.logpdf(c, mean, scale) + math.log(2 / 255)
  )
  out = np.where(
    x == 0, dist.logcdf(hi, mean, scale), np.where(x == 255, dist.logsf(lo, mean, scale), interior)
  )
  return out, np.where((x == 0) | (x == 255), 1.0, mass)


def _ref_dmol(params, image, k):
  """PixelCNN++ discretised mixture of logistics in float64 numpy/scipy."""
  params = params.astype(np.float64)
  x = image.astype(np.float64)
  logits = params[..., :k]
  rest = params[..., k:].reshape(params.shape[:-1] + (3, 3, k))
  means, log_s, coeffs = (
    rest[..., 0, :, :],
    np.maximum(rest[..., 1, :, :], -7),
    np.tanh(rest[..., 2, :, :]),
  )
  u = x / 127.5 - 1.0
  mu = means.copy()
  mu[..., 1, :] += coeffs[..., 0, :] * u[..., 0, None]
  mu[..., 2, :] += coeffs[..., 1, :] * u[..., 0, None] + coeffs[..., 2, :] * u[..., 1, None]
  lp, mass = _ref_discretized(x[..., None], mu, np.exp(log_s), stats.logistic)
  log_w = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  return np.logaddexp.reduce(log_w + lp.sum(-2), axis=-1), mass


def _near_threshold(mass):
  """Bins whose mass is so close to the 1e-5 fallback threshold that float32 may branch
  differently from the float64 reference."""
  m = mass.reshape(mass.shape[:2] + (-1,))
  return np.any((m > 0.95e-5) & (m < 1.05e-5), axis=-1)


@pytest.mark.parametrize("num_mixtures,coupled", [(1, False), (K, True)])
def test_dmol_matches_reference(num_mixtures, coupled):
  """K=1 without coupling is three independent discretised logistics; K=3 with coupling too."""
  lik = _lik("dmol", num_mixtures)
  rs = np.random.RandomState(3)
  n = 400
  p = _params(lik, "random", n, seed=4)
  groups = _slices(lik)
  p[:, groups["log_scales"]] = rs.uniform(-6, 1, p[:, groups["log_scales"]].shape)
  if not coupled:
    p[:, groups["coeffs"]] = 0.0
  image = rs.randint(0, 256, (n, 3))
  image[:20] = rs.choice([0, 255], (20, 3))  # edge bins
  p, image = p.reshape(20, 20, -1), image.reshape(20, 20, 3)
  ref, mass = _ref_dmol(p, image, num_mixtures)
  got = np.asarray(_log_prob(lik, p, image.astype(np.uint8)))
  keep = ~_near_threshold(mass)
  assert keep.mean() > 0.9
  np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-5, atol=3e-4)


def test_discretized_gaussian_matches_scipy():
  lik = _lik("discretized_gaussian")
  rs = np.random.RandomState(5)
  n = 400
  p = np.concatenate([rs.uniform(-1.5, 1.5, (n, 3)), rs.uniform(-7, 1, (n, 3))], -1)
  image = rs.randint(0, 256, (n, 3))
  image[:20] = rs.choice([0, 255], (20, 3))
  ref, mass = _ref_discretized(image, p[:, :3], np.exp(p[:, 3:]), stats.norm)
  got = np.asarray(_channel_log_prob(lik, p.astype(np.float32), image.astype(np.float32)))
  keep = (mass < 0.95e-5) | (mass > 1.05e-5)
  assert keep.mean() > 0.9
  np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-5, atol=3e-4)
  # A few values by hand: the edge bins and a mid bin of a unit-pixel-ish Gaussian.
  p1 = np.array([0.0, 0.0, 0.0, -3.0, -3.0, -3.0], np.float32)
  x1 = np.array([0.0, 128.0, 255.0], np.float32)
  s, c = math.exp(-3.0), 128 / 127.5 - 1
  expect = [
    stats.norm.logcdf(-1 + 1 / 255, 0, s),
    math.log(stats.norm.cdf(c + 1 / 255, 0, s) - stats.norm.cdf(c - 1 / 255, 0, s)),
    stats.norm.logsf(1 - 1 / 255, 0, s),
  ]
  np.testing.assert_allclose(np.asarray(_channel_log_prob(lik, p1, x1)), expect, rtol=1e-5)


def test_gaussian_matches_scipy_at_bin_centre_and_dequantises_within_bin():
  lik = _lik("gaussian")
  rs = np.random.RandomState(6)
  n = 64
  p = np.concatenate([rs.uniform(-1.2, 1.2, (n, 3)), rs.uniform(-7, 0, (n, 3))], -1)
  p = p.astype(np.float32)
  image = rs.randint(0, 256, (n, 3)).astype(np.uint8)
  loc, scale = 128.0 * (p[:, :3] + 1.0), 128.0 * np.exp(p[:, 3:].astype(np.float64))
  ref = stats.norm.logpdf(image + 0.5, loc, scale)
  np.testing.assert_allclose(
    np.asarray(_log_prob(lik, p, image)), ref.sum(-1), rtol=1e-5, atol=1e-4
  )
  # With dequantisation noise each sub-pixel's density is that of some y in [x, x + 1).
  ends = stats.norm.logpdf(np.stack([image, image + 1.0]), loc, scale)
  peak = stats.norm.logpdf(np.clip(loc, image, image + 1.0), loc, scale)
  draws = []
  for seed in range(3):
    lp = np.asarray(lik.channel_log_prob(p, image, jax.random.PRNGKey(seed)))
    assert np.all(lp >= ends.min(0) - 1e-3) and np.all(lp <= peak + 1e-3)
    draws.append(lp)
  assert not np.allclose(draws[0], draws[1])
  np.testing.assert_allclose(
    np.asarray(_log_prob(lik, p, image, jax.random.PRNGKey(0))), draws[0].sum(-1), rtol=1e-6
  )


def test_gaussian_bits_per_dim_upper_bounds_discrete():
  """E_u[-log p(x + u)] >= -log P(x) for the matching discretisation of the same Gaussian."""
  lik = _lik("gaussian")
  p = np.array([0.1, -0.3, 0.5, -2.5, -3.5, -1.0], np.float32)
  image = np.array([[140.0, 85.0, 190.0], [150.0, 90.0, 255.0]], np.float32)
  rngs = jax.random.split(jax.random.PRNGKey(0), 2000)
  lp = jax.vmap(lambda r: lik.channel_log_prob(p, image, r))(rngs).mean(0)
  loc, scale = 128.0 * (p[:3] + 1.0), 128.0 * np.exp(p[3:].astype(np.float64))
  discrete = np.log(stats.norm.cdf(image + 1, loc, scale) - stats.norm.cdf(image, loc, scale))
  assert np.all(np.asarray(lp) <= discrete + 1e-3)


def test_uint8_and_float_images_agree():
  for name in likelihoods.NAMES:
    lik = _lik(name)
    p = _params(lik, "random", 8).reshape(2, 2, 2, -1)
    image = np.random.RandomState(0).randint(0, 256, (2, 2, 2, 3))
    a = _log_prob(lik, p, image.astype(np.uint8))
    b = _log_prob(lik, p, image.astype(np.float32))
    assert a.shape == (2, 2, 2)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# -------------------------------------------------------------------------- numerical safety


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_extreme_params_finite_values_and_gradients(name):
  lik = _lik(name)
  rs = np.random.RandomState(7)
  extreme = rs.choice([-1e4, -50.0, -10.0, -5.0, 0.0, 5.0, 50.0, 1e4], (4, 8, 8, lik.num_params))
  p = np.concatenate([extreme, _params(lik, "wild", 256).reshape(4, 8, 8, -1)], 0)
  p = p.astype(np.float32)
  image = rs.randint(0, 256, (8, 8, 8, 3)).astype(np.uint8)
  image[:, 0] = 0
  image[:, 1] = 255
  rng = jax.random.PRNGKey(0)
  assert np.all(np.isfinite(np.asarray(_log_prob(lik, p, image, rng))))
  assert np.all(np.isfinite(np.asarray(_grad_mean_log_prob(lik, p, image, rng))))
  for out in (*_mode_and_mean(lik, p), _sample(lik, p, rng, 1.0)):
    out = np.asarray(out)
    assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 255


# --------------------------------------------------------------------- sample / mode / mean


@pytest.mark.parametrize("name", likelihoods.NAMES)
@pytest.mark.parametrize("case", ["random", "wild"])
def test_sample_mode_mean_shapes_and_ranges(name, case):
  lik = _lik(name)
  p = _params(lik, case, 2 * 4 * 5).reshape(2, 4, 5, -1)
  mode, mean = _mode_and_mean(lik, p)
  sample = _sample(lik, p, jax.random.PRNGKey(1), 1.0)
  for out, integer in ((sample, True), (mode, True), (mean, False)):
    assert out.shape == (2, 4, 5, 3) and out.dtype == jnp.float32
    out = np.asarray(out)
    assert out.min() >= 0 and out.max() <= 255
    if integer:
      np.testing.assert_array_equal(out, np.round(out))


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_cold_sample_of_sharp_component_is_the_mode(name):
  lik = _lik(name)
  p = _params(lik, "random", 64, seed=8)
  groups = _slices(lik)
  p[:, groups["log_scales"]] = -4.0
  if "logits" in groups:
    p[:, groups["logits"]] = 0.0
    p[:, groups["logits"].start] = 50.0  # component 0 is (almost surely) chosen
  mode, _ = _mode_and_mean(lik, p)
  sample = _sample(lik, p, jax.random.PRNGKey(2), 1e-7)
  np.testing.assert_array_equal(np.asarray(sample), np.asarray(mode))
  if "coeffs" in groups:
    # The mode applies the coupling: component 0 with its G mean shifted by alpha * x_r.
    k = lik.num_mixtures
    r = np.clip(np.round((p[:, k] + 1) * 127.5), 0, 255)
    g = np.clip(
      np.round((p[:, 2 * k] + np.tanh(p[:, 7 * k]) * (r / 127.5 - 1) + 1) * 127.5), 0, 255
    )
    np.testing.assert_array_equal(np.asarray(mode)[:, :2], np.stack([r, g], -1))


def _assert_histogram_matches(samples: np.ndarray, probs: np.ndarray):
  """Loose chi-square check: bins expecting >= 5 counts separately, the rest pooled."""
  n = samples.size
  counts = np.bincount(samples.astype(np.int64).ravel(), minlength=256).astype(np.float64)
  expected = n * np.asarray(probs, np.float64)
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], max(expected[~big].sum(), 1e-9))
  chi2 = float(np.sum((obs - exp) ** 2 / exp))
  df = int(big.sum())
  assert df >= 5
  assert chi2 < df + 8 * math.sqrt(2 * df) + 10, (chi2, df)


def test_discretized_gaussian_sample_histogram():
  lik = _lik("discretized_gaussian")
  p = np.array([0.1, -0.95, 0.9, math.log(0.08), math.log(0.05), math.log(0.2)], np.float32)
  samples = np.asarray(_sample(lik, np.broadcast_to(p, (200, 100, 6)), jax.random.PRNGKey(3), 1.0))
  image = np.repeat(VALUES[:, None], 3, -1)
  probs = np.exp(np.asarray(_channel_log_prob(lik, np.broadcast_to(p, (256, 6)), image)))
  for c in range(3):
    _assert_histogram_matches(samples[..., c], probs[:, c])


def test_gaussian_sample_histogram():
  lik = _lik("gaussian")
  p = np.array([0.1, -0.95, 0.9, math.log(0.08), math.log(0.05), math.log(0.2)], np.float32)
  samples = np.asarray(_sample(lik, np.broadcast_to(p, (200, 100, 6)), jax.random.PRNGKey(4), 1.0))
  loc, scale = 128.0 * (p[:3] + 1.0), 128.0 * np.exp(p[3:].astype(np.float64))
  edges = np.concatenate([[-np.inf], np.arange(1, 256), [np.inf]])[:, None]
  cdf = stats.norm.cdf(edges, loc, scale)
  for c in range(3):
    _assert_histogram_matches(samples[..., c], np.diff(cdf[:, c]))


def test_dmol_sample_histogram_with_coupling():
  """Marginals of R, G and B from the sampler match brute-force marginals of `log_prob`."""
  lik = _lik("dmol", 2)
  logits = [0.3, -0.2]
  means = [-0.3, 0.4, 0.1, -0.2, 0.2, 0.0]  # (r, g, b) x component
  log_scales = [-3.0, -2.5, -2.8, -3.2, -2.6, -3.0]
  raw_coupling = [0.8, -0.6, -0.5, 0.9, 0.6, 0.3]  # (alpha, beta, gamma) x component
  p = np.array(logits + means + log_scales + raw_coupling, np.float32)
  p_rg, p_rb = (np.asarray(t, np.float64) for t in _dmol_joint_marginals(lik, p))
  samples = np.asarray(_sample(lik, np.broadcast_to(p, (200, 100, 20)), jax.random.PRNGKey(5), 1.0))
  _assert_histogram_matches(samples[..., 0], p_rg.sum(1))
  _assert_histogram_matches(samples[..., 1], p_rg.sum(0))
  _assert_histogram_matches(samples[..., 2], p_rb.sum(0))


# ---------------------------------------------------------------- scaled location gradients


def test_scale_location_grad_keeps_values_and_scales_gradients():
  mu = jnp.array([0.3, -0.2, 0.7])
  scale = jnp.array([1e-3, 0.2, 1.0])
  assert np.array_equal(likelihoods.scale_location_grad(mu, scale), mu)
  grad = jax.grad(lambda m: jnp.sum(likelihoods.scale_location_grad(m, scale) ** 2))(mu)
  np.testing.assert_allclose(grad, 2 * mu * scale, rtol=1e-6)
  # No gradient reaches the scale through the preconditioner.
  g_scale = jax.grad(lambda s: jnp.sum(likelihoods.scale_location_grad(mu, s)))(scale)
  assert np.all(g_scale == 0)


@pytest.mark.parametrize("name", ["dmol", "discretized_gaussian", "gaussian"])
def test_scaled_gradients_leave_log_probs_unchanged_and_tame_sharp_channels(name):
  exact, scaled = likelihoods.get(name, K), likelihoods.get(name, K, "scaled")
  assert exact != scaled  # distinct static arguments: never a stale compiled function
  params = _params(exact, "random", 16, seed=3)
  image = np.random.RandomState(0).randint(0, 256, (16, 3)).astype(np.float32)
  rng = jax.random.PRNGKey(0)
  # Bit-identical at XLA's default optimisation level, as in a run (at the suite's level 0 the
  # two programs' exp/log differ in the last bits: 1.6e-6 relative measured).
  np.testing.assert_array_equal(_log_prob_run(exact, params, image, rng),
                                _log_prob_run(scaled, params, image, rng))
  # Make every channel sharp (log-scale -6): the exact location gradient grows like 1/scale,
  # the scaled one stays O(residual).
  groups = _slices(exact)
  sharp = np.array(params)
  sharp[:, groups["log_scales"]] = -6.0
  g_exact = np.asarray(_grad_mean_log_prob(exact, sharp, image, rng))[:, groups["means"]]
  g_scaled = np.asarray(_grad_mean_log_prob(scaled, sharp, image, rng))[:, groups["means"]]
  np.testing.assert_allclose(g_scaled, g_exact * math.exp(-6.0), rtol=1e-3, atol=1e-9)
  # scaled_mean: the same reweighting, divided by the mean scale (here all e^-6): exact again.
  g_mean = np.asarray(_grad_mean_log_prob(likelihoods.get(name, K, "scaled_mean"), sharp, image,
                                          rng))[:, groups["means"]]
  np.testing.assert_allclose(g_mean, g_exact, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("name", ["dmol", "discretized_gaussian", "gaussian"])
def test_annealed_power_interpolates_scaled_and_exact_gradients(name):
  """p = 1 is `scaled`, p = 0 exact, p = 1/2 the geometric mean; values never change."""
  scaled = likelihoods.get(name, K, "scaled")
  params = _params(scaled, "random", 16, seed=4)
  groups = _slices(scaled)
  params = np.array(params)
  params[:, groups["log_scales"]] = -4.0
  image = np.random.RandomState(1).randint(0, 256, (16, 3)).astype(np.float32)
  rng = jax.random.PRNGKey(0)
  at = lambda p: dataclasses.replace(scaled, location_grad_power=p)  # noqa: E731
  np.testing.assert_array_equal(_log_prob(at(0.5), params, image, rng),
                                _log_prob(scaled, params, image, rng))
  g = {p: np.asarray(_grad_mean_log_prob(at(p), params, image, rng))[:, groups["means"]]
       for p in (0.0, 0.5, 1.0)}
  g_exact = np.asarray(_grad_mean_log_prob(likelihoods.get(name, K), params, image, rng)
                       )[:, groups["means"]]
  g_scaled = np.asarray(_grad_mean_log_prob(scaled, params, image, rng))[:, groups["means"]]
  np.testing.assert_allclose(g[0.0], g_exact, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(g[1.0], g_scaled, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(g[0.5], g_exact * math.exp(-2.0), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("grad", ["scaled", "scaled_mean"])
def test_scaled_gradients_survive_a_huge_log_scale(grad):
  """exp(log-scale > 88) overflows float32: the factor is capped, so value and gradient stay
  finite (a deterministic run once died on an unused component's log-scale of 118)."""
  exact, scaled = likelihoods.get("dmol", K), likelihoods.get("dmol", K, grad)
  params = np.array(_params(exact, "random", 16, seed=5))
  params[:, _slices(exact)["log_scales"]] = 120.0
  image = np.random.RandomState(2).randint(0, 256, (16, 3)).astype(np.float32)
  rng = jax.random.PRNGKey(0)
  value = np.asarray(_log_prob(scaled, params, image, rng))
  np.testing.assert_array_equal(value, _log_prob(exact, params, image, rng))
  assert np.all(np.isfinite(value))
  assert np.all(np.isfinite(np.asarray(_grad_mean_log_prob(scaled, params, image, rng))))


def test_location_grad_power_schedule():
  power = lambda step, anneal: float(likelihoods.location_grad_power(step, anneal))  # noqa: E731
  assert [power(s, ()) for s in (0, 10**6)] == [1.0, 1.0]
  assert [power(s, (100, 300)) for s in (0, 100, 200, 300, 10**6)] == [1.0, 1.0, 0.5, 0.0, 0.0]
  assert [power(s, (50, 50)) for s in (49, 50)] == [1.0, 0.0]


@pytest.mark.parametrize("name", ["dmol", "discretized_gaussian"])
def test_channel_chain_terms_sum_to_the_log_prob_and_r_is_the_marginal(name):
  lik = _lik(name)
  params = _params(lik, "random", 8, seed=5)
  image = np.random.RandomState(1).randint(0, 256, (8, 3)).astype(np.float32)
  chain = np.asarray(jax.jit(lik.channel_chain_log_prob)(params, image))
  np.testing.assert_allclose(chain.sum(-1), _log_prob(lik, params, image), rtol=1e-5, atol=1e-5)
  # The R term is the marginal of R: summing exp over all 256 values of R gives 1.
  values = _all_values_image(8, 0, image)  # [256, 8, 3]
  r_terms = jax.jit(jax.vmap(lik.channel_chain_log_prob, in_axes=(None, 0)))(params, values)
  np.testing.assert_allclose(np.exp(np.asarray(r_terms)[..., 0]).sum(0), 1.0, atol=1e-4)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _box_log_prob(lik, params, image, rng, box):
  return lik.box_log_prob(params, image, rng, box)


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_box_log_prob_is_the_whole_image_log_prob_on_the_box(name):
  """`box_log_prob` (the training pass's `model.likelihood_region`): the box's parameters alone
  score exactly what the whole image's log_prob gives there, dequantisation noise included."""
  lik = _lik(name)
  rs = np.random.RandomState(5)
  params = jnp.asarray(rs.normal(0, 1, (2, 8, 8, lik.num_params)), jnp.float32)
  image = jnp.asarray(rs.randint(0, 256, (2, 8, 8, 3)), jnp.uint8)
  rng = jax.random.PRNGKey(3)
  box = (2, 6, 1, 7)
  whole = _log_prob(lik, params, image, rng)[:, 2:6, 1:7]
  boxed = _box_log_prob(lik, params[:, 2:6, 1:7], image, rng, box)
  assert boxed.shape == (2, 4, 6)
  np.testing.assert_allclose(boxed, whole, rtol=1e-6)


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_add_base_moves_every_channel_s_location_by_the_base(name):
  # x ~ add_base(params, base) iff x - base ~ params: every (coupled) location moves by base.
  lik = likelihoods.get(name, K)
  params = jax.random.normal(jax.random.PRNGKey(3), (4, 5, lik.num_params))
  base = jax.random.uniform(jax.random.PRNGKey(4), (4, 5, 3), minval=-0.5, maxval=0.5)
  x = jax.random.uniform(jax.random.PRNGKey(5), (4, 5, 3), minval=-1.0, maxval=1.0)
  moved = lik.add_base(params, base)
  if name == "dmol":
    _, means, log_scales, coeffs = lik._split(params)
    logits2, means2, log_scales2, coeffs2 = lik._split(moved)
    np.testing.assert_array_equal(log_scales2, log_scales)
    np.testing.assert_array_equal(coeffs2, coeffs)
    np.testing.assert_array_equal(logits2, lik._split(params)[0])
    d = x - base
    before = lik._coupled_means(means, coeffs, d[..., :1], d[..., 1:2])
    after = lik._coupled_means(means2, coeffs2, x[..., :1], x[..., 1:2])
    np.testing.assert_allclose(after, before + base[..., None], atol=1e-5)
  else:
    np.testing.assert_allclose(moved[..., :3], params[..., :3] + base, atol=1e-6)
    np.testing.assert_array_equal(moved[..., 3:], params[..., 3:])


def test_pixel_temperature_tempers_the_mixture_s_component_choice():
  """DMoL at pixel temperature T draws the component from softmax(logits / T): with two equally
  sharp components of logits (0, 1) component 1 is chosen with probability 1 / (1 + e^(-1/T)):
  0.73 at T = 1 (the likelihood), 0.95 at T = 1/3, and the mode (component 1) at T -> 0. The
  noise alone was tempered before, and the choice stayed at 0.73 at every T: specks."""
  lik = _lik("dmol", num_mixtures=2)
  p = np.zeros((4000, lik.num_params), np.float32)
  groups = _slices(lik)
  p[:, groups["logits"]] = [0.0, 1.0]
  p[:, groups["log_scales"]] = -7.0  # sharp: the drawn value is the component's mean
  p[:, groups["means"].start + 0] = -0.8  # R of component 0: grey level ~25
  p[:, groups["means"].start + 1] = 0.8  # R of component 1: grey level ~230
  rng = jax.random.PRNGKey(5)
  for temperature in (1.0, 1 / 3):
    red = np.asarray(_sample(lik, p, rng, temperature))[:, 0]
    assert np.all(np.abs(red - 127.5) > 100)  # one component's value or the other's
    expected = 1 / (1 + math.exp(-1 / temperature))  # 4 standard errors:
    assert abs(np.mean(red > 127.5) - expected) < 4 * math.sqrt(expected * (1 - expected) / 4000)
  mode, _ = _mode_and_mean(lik, p)
  for temperature in (1e-7, 0.0):  # the mode's component, and its value once the noise is gone
    assert np.all(np.asarray(_sample(lik, p, rng, temperature))[:, 0] > 127.5)
  np.testing.assert_array_equal(np.asarray(_sample(lik, p, rng, 0.0)), np.asarray(mode))


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_mean_clamp_bounds_a_runaway_head_and_is_a_reparameterisation(name):
  """`model.likelihood_mean_clamp` = c: every location passes through c * tanh(. / c), so an
  output head whose means ran to 1e4 costs a bounded loss (on faces one batch cost 2.3e7
  bits/dim that way, docs/results.md), and the log-probability is the unclamped one at the
  clamped means; c = 0 changes nothing; the config reaches the model's likelihood."""
  c = 2.0
  plain, clamped = likelihoods.get(name, K), likelihoods.get(name, K, mean_clamp=c)
  assert clamped.mean_clamp == c and plain.mean_clamp == 0.0
  n = plain.num_params
  # Which raw channels are locations and log-scales: dmol's [K:4K] and [4K:7K], the Gaussians'
  # [0:3] and [3:6].
  loc, log_scale = np.zeros(n, bool), np.zeros(n, bool)
  if name == "dmol":
    loc[K:4 * K], log_scale[4 * K:7 * K] = True, True
  else:
    loc[:3], log_scale[3:6] = True, True
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.integers(0, 256, (4, 3)), jnp.float32)
  raw = rng.normal(size=(4, n)).astype(np.float32)
  # A runaway head: means at +-1e4 with their scales at the floor (e^-7).
  raw[:, loc] = np.where(rng.random((4, loc.sum())) < 0.5, -1e4, 1e4)
  raw[:, log_scale] = -10.0
  raw = jnp.asarray(raw)
  by_hand = jnp.where(jnp.asarray(loc), c * jnp.tanh(raw / c), raw)
  got = _log_prob(clamped, raw, image, jax.random.PRNGKey(0))
  np.testing.assert_allclose(got, _log_prob(plain, by_hand, image, jax.random.PRNGKey(0)),
                             rtol=1e-5)
  # Bounded: |x - mean| <= c + 3 for dmol (the data in [-1, 1], its coupling adds <= 2), so a
  # sub-pixel costs at most ~ that / e^-7 nats; a Gaussian's cost is quadratic,
  # (c + 1)^2 / (2 e^-14) (dequantised data reach 1 + 1/127.5). Unclamped the same outputs cost
  # ~3e7 (dmol) and ~1e14 (Gaussians) nats per pixel.
  inv_s = math.exp(-likelihoods.MIN_LOG_SCALE)
  per = (c + 3) * inv_s if name == "dmol" else (c + 1.01) ** 2 / 2 * inv_s ** 2
  assert bool(jnp.all(jnp.isfinite(got))) and float(jnp.min(got)) > -3 * (per + 10)
  unclamped = _log_prob(plain, raw, image, jax.random.PRNGKey(0))
  assert float(jnp.max(unclamped)) < -300 * per
  small = jnp.asarray(rng.normal(size=(4, n)).astype(np.float32)) * 0.1
  np.testing.assert_allclose(_log_prob(clamped, small, image, jax.random.PRNGKey(0)),
                             _log_prob(plain, small, image, jax.random.PRNGKey(0)), rtol=1e-3)
  # Every path reads the clamped means: the mode fill-in equals the unclamped one at them.
  np.testing.assert_allclose(clamped.mode(raw), plain.mode(by_hand), rtol=1e-5)
  with pytest.raises(ValueError, match="mean_clamp"):
    likelihoods.get(name, K, mean_clamp=-1.0)
  assert HVAE(tiny_model_config(likelihood=name, likelihood_mean_clamp=c)).likelihood == \
      likelihoods.get(name, 2, mean_clamp=c)
  for bad in (-1.0, float("inf"), float("nan")):
    with pytest.raises(ConfigError, match="model.likelihood_mean_clamp"):
      tiny_model_config(likelihood_mean_clamp=bad)
