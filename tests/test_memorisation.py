"""Tests of hvae/memorisation.py: the ELBO-surgery split of the average KL."""

import math

import numpy as np
import pytest
from scipy import stats

from hvae import memorisation


def test_log_density_matrix_matches_scipy():
  rs = np.random.RandomState(0)
  z, mean, log_scale = rs.randn(3, 5), rs.randn(4, 5), 0.3 * rs.randn(4, 5) - 1.0
  got = memorisation.log_density_matrix(z, mean, log_scale)
  want = np.array([[stats.norm.logpdf(z[n], mean[m], np.exp(log_scale[m])).sum()
                    for m in range(4)] for n in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("n", [2, 16])
def test_mi_is_log_n_for_separated_posteriors_and_zero_for_identical_ones(n):
  rs = np.random.RandomState(n)
  far = rs.randn(n, 32) * 10.0  # well apart, sigma 0.01: every z names its example
  assert memorisation.mutual_information(far, np.full((n, 32), math.log(0.01))) == \
      pytest.approx(math.log(n), abs=1e-6)
  same = np.tile(rs.randn(1, 32), (n, 1))  # one posterior for all: z says nothing about n
  assert memorisation.mutual_information(same, np.zeros((n, 32))) == pytest.approx(0.0, abs=1e-9)


def test_mi_never_exceeds_log_n_and_the_split_adds_up_to_the_average_kl():
  rs = np.random.RandomState(1)
  n, d = 12, 6
  per_example = {"kl": rs.rand(n, 2) * 5, "mean/1": rs.randn(n, d), "log_scale/1": -rs.rand(n, d),
                 "mean/2": 0.1 * rs.randn(n, d), "log_scale/2": np.zeros((n, d))}
  m = memorisation.split_metrics(per_example, 2, num_samples=4)
  assert m["mi_max"] == pytest.approx(math.log(n))
  for l in (1, 2):
    assert m[f"mi/level_{l}"] <= math.log(n)
    assert m[f"mi/level_{l}"] + m[f"marginal_kl/level_{l}"] == pytest.approx(
        per_example["kl"][:, l - 1].mean())
  assert m["mi/level_1"] > m["mi/level_2"]  # wider spread of means, narrower posteriors
