"""Tests of hvae/model/distributions.py: analytic KL identities and Monte-Carlo agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvae.model.distributions import DiagGaussian


def _random_gaussian(key, shape, spread=1.0):
  k1, k2 = jax.random.split(key)
  return DiagGaussian(spread * jax.random.normal(k1, shape),
                      0.5 * spread * jax.random.normal(k2, shape))


def test_kl_of_identical_distributions_is_zero():
  g = _random_gaussian(jax.random.PRNGKey(0), (16, 5), spread=3.0)
  np.testing.assert_array_equal(np.asarray(g.kl(g)), 0.0)


@pytest.mark.parametrize("spread", [0.1, 1.0, 4.0])
def test_kl_is_non_negative(spread):
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  q, p = _random_gaussian(k1, (1000,), spread), _random_gaussian(k2, (1000,), spread)
  assert np.all(np.asarray(q.kl(p)) >= 0.0)


def test_analytic_kl_matches_monte_carlo():
  kq, kp, ks = jax.random.split(jax.random.PRNGKey(2), 3)
  q, p = _random_gaussian(kq, (6,)), _random_gaussian(kp, (6,))
  n = 400_000
  eps = jax.random.normal(ks, (n, 6))
  z = q.mean + q.scale * eps
  qb = DiagGaussian(q.mean[None], q.log_scale[None])
  pb = DiagGaussian(p.mean[None], p.log_scale[None])
  samples = qb.log_prob(z) - pb.log_prob(z)  # [n, 6]
  mc, stderr = samples.mean(0), samples.std(0) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(np.asarray(mc - q.kl(p))), 5 * np.asarray(stderr) + 1e-4)


def test_log_prob_matches_scipy():
  from scipy import stats

  g = DiagGaussian(jnp.array([0.3, -1.0]), jnp.log(jnp.array([0.5, 2.0])))
  z = jnp.array([1.0, 0.5])
  want = stats.norm(loc=[0.3, -1.0], scale=[0.5, 2.0]).logpdf([1.0, 0.5])
  np.testing.assert_allclose(np.asarray(g.log_prob(z)), want, rtol=1e-5)


def test_sample_with_temperature_scales_the_deviation():
  g = DiagGaussian(jnp.ones(3), jnp.log(jnp.full(3, 2.0)))
  eps = jnp.array([1.0, -1.0, 0.5])
  np.testing.assert_allclose(np.asarray(g.sample(eps, 0.5)), [2.0, 0.0, 1.5])
  np.testing.assert_allclose(np.asarray(g.sample(eps, 0.0)), [1.0, 1.0, 1.0])
