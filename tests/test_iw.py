"""The importance-weighted bound (hvae/iw.py) on tiny models.

Statistical checks use a model whose decoder barely depends on z (its z projection scaled by
0.1), so the log weights vary by a few nats and every estimate has a usable standard error;
with raw random initialisation they vary by hundreds of nats and the ESS is ~1. Tolerances are
3 standard errors: of the mean over groups of K samples, and the delta-method error
std(w) / (sqrt(K) mean(w)) of the single K = 4096 reference.

The trunk is run once per batch and its features reused by every sample (hvae/iw.py): the
weights must be those of K full forward passes with the same noise (the implementation before,
`share_trunk=False`), and cost fewer FLOPs than K forward passes (XLA's count, not a timing).
"""

import jax
import numpy as np
import pytest
from helpers import centre_mask, random_images, tiny_model_config

from hvae import iw, objective, preemption
from hvae.model import ladder
from hvae.model.ladder import HVAE

CHUNK = 256  # one compile for every statistical draw below


def _delta_method_se(log_w: np.ndarray) -> np.ndarray:
  """Standard error of IW_K (nats) per example by the delta method: std(w) / (sqrt(K) mean(w)).

  The statistical tolerance of a single K-sample estimate. log_w: [K, B] -> [B].
  """
  log_w = np.asarray(log_w, np.float64)
  w = np.exp(log_w - log_w.max(axis=0, keepdims=True))
  return w.std(axis=0) / (np.sqrt(log_w.shape[0]) * w.mean(axis=0))


@pytest.fixture(scope="module")
def tame():
  model = HVAE(tiny_model_config(num_levels=1))
  params = ladder.init(model, jax.random.PRNGKey(0))
  params["level_1"]["z_proj"] = jax.tree_util.tree_map(lambda x: 0.1 * x,
                                                       params["level_1"]["z_proj"])
  return model, params, random_images(1, seed=1), centre_mask(1)


def test_k1_equals_the_single_sample_elbo_with_a_monte_carlo_kl():
  model = HVAE(tiny_model_config(num_levels=2))
  params = ladder.init(model, jax.random.PRNGKey(0))
  image, mask = random_images(2, seed=2), centre_mask(2)
  rng = jax.random.PRNGKey(7)
  log_w = np.asarray(iw.make_log_weights_fn(model, 1)(params, image, mask, rng))  # [1, 2]
  apply = jax.jit(lambda p, x, m, r: model.apply({"params": p}, x, m, rngs={"sample": r}))
  out = apply(params, image, mask, rng)  # the same noise, so the same z
  terms = objective.elbo_terms(out, mask)
  mc_kl = sum(np.asarray(lev.log_q - lev.log_p) for lev in out.levels)
  elbo_mc = -(np.asarray(terms.recon) + mc_kl)
  np.testing.assert_allclose(log_w[0], elbo_mc, rtol=1e-6)
  assert iw.iw_bound(log_w) == pytest.approx(elbo_mc, rel=1e-6)
  assert np.all(iw.effective_sample_size(log_w) == 1.0)


def _flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("posterior, sees_mask", [("bottom_up", False), ("top_down", True)])
def test_shared_trunk_gives_the_weights_of_k_full_forward_passes(posterior, sees_mask):
  model = HVAE(tiny_model_config(num_levels=2, posterior=posterior,
                                 posterior_sees_mask=sees_mask))
  params = ladder.init(model, jax.random.PRNGKey(0))
  image, mask = random_images(3, seed=4), centre_mask(3)
  assert len(iw.make_features_fn(model)(params, image, mask)) == 2  # h^p and h^q, recorded
  rng = jax.random.PRNGKey(9)
  shared = iw.log_weights(model, params, image, mask, rng, 5, chunk=2)  # 3 chunks, 1 dropped
  full = iw.log_weights(model, params, image, mask, rng, 5, chunk=2, share_trunk=False)
  assert shared.shape == (5, 3) and np.all(np.isfinite(shared))
  # The same noise and the same arithmetic: equal up to float32 rounding (bitwise on CPU).
  np.testing.assert_allclose(shared, full, rtol=1e-6, atol=1e-4)


def test_k_samples_cost_fewer_flops_than_k_forward_passes():
  model = HVAE(tiny_model_config(num_levels=2))
  params = ladder.init(model, jax.random.PRNGKey(0))
  image, mask, rng, k = random_images(2, seed=5), centre_mask(2), jax.random.PRNGKey(1), 8
  forward = jax.jit(lambda p, x, m, r: model.apply({"params": p}, x, m, rngs={"sample": r}))
  features = iw.make_features_fn(model)(params, image, mask)
  shared = (_flops(iw.make_features_fn(model), params, image, mask)
            + _flops(iw.make_log_weights_fn(model, k), params, image, mask, rng, features))
  full = _flops(iw.make_log_weights_fn(model, k, share_trunk=False), params, image, mask, rng)
  one = _flops(forward, params, image, mask, rng)
  assert full >= 0.9 * k * one  # the reference: K forward passes
  assert shared < 0.8 * full, (shared / one, full / one)


def test_weight_reductions_by_hand():
  log_w = np.log(np.array([[1.0, 2.0], [3.0, 2.0]]))  # [K=2, B=2]
  np.testing.assert_allclose(iw.iw_bound(log_w), np.log([2.0, 2.0]))
  np.testing.assert_allclose(iw.effective_sample_size(log_w), [16 / 10, 2.0])
  np.testing.assert_allclose(_delta_method_se(log_w), [1 / (np.sqrt(2) * 2), 0.0])


def test_chunks_cover_k_with_one_compile(tame):
  model, params, image, mask = tame
  fn = iw.make_log_weights_fn(model, CHUNK)
  log_w = iw.log_weights(model, params, image, mask, jax.random.PRNGKey(3), 300, chunk=CHUNK)
  assert log_w.shape == (300, 1) and np.all(np.isfinite(log_w))
  assert not np.array_equal(log_w[:44], log_w[256:])  # the second chunk draws fresh samples
  assert fn._cache_size() == 1


def test_bound_grows_with_k_and_stays_below_the_k4096_reference(tame):
  model, params, image, mask = tame
  ref_w = iw.log_weights(model, params, image, mask, jax.random.PRNGKey(11), 4096, chunk=CHUNK)
  ref, ref_se = iw.iw_bound(ref_w)[0], _delta_method_se(ref_w)[0]
  ess = iw.effective_sample_size(ref_w)[0]
  assert 1.0 <= ess <= 4096.0
  # Independent draws for the sweep; 1024 samples = 1024 / K independent K-sample estimates.
  log_w = iw.log_weights(model, params, image, mask, jax.random.PRNGKey(12), 1024,
                         chunk=CHUNK)[:, 0]
  means, ses = {}, {}
  for k in (1, 4, 16, 64):
    estimates = iw.iw_bound(log_w.reshape(-1, k).T)  # one IW_K per group of k samples
    means[k], ses[k] = estimates.mean(), estimates.std(ddof=1) / np.sqrt(estimates.size)
  ks = sorted(means)
  for a, b in zip(ks, ks[1:]):
    assert means[b] >= means[a] - 3 * np.hypot(ses[a], ses[b]), (means, ses)
  assert means[64] > means[1]  # the gap is several standard errors on this model
  for k in ks:
    assert means[k] <= ref + 3 * np.hypot(ses[k], ref_se), (k, means[k], ref, ref_se)


def test_a_stop_request_is_honoured_between_chunks(tame):
  """`interrupt()` is asked before every chunk (4 here): the same weights while it says False,
  `Interrupted` before the third chunk once it says True. Chunks of 2 samples: a compile of its
  own, and ten small calls instead of ten of `CHUNK` rows."""
  model, params, image, mask = tame
  rng, chunk = jax.random.PRNGKey(3), 2
  plain = iw.log_weights(model, params, image, mask, rng, 4 * chunk, chunk=chunk)
  asked = []
  paced = iw.log_weights(model, params, image, mask, rng, 4 * chunk, chunk=chunk,
                         interrupt=lambda: asked.append(1) and False)
  np.testing.assert_array_equal(paced, plain)
  assert len(asked) == 4
  asked.clear()
  with pytest.raises(preemption.Interrupted):
    iw.log_weights(model, params, image, mask, rng, 4 * chunk, chunk=chunk,
                   interrupt=lambda: asked.append(1) or len(asked) > 2)
  assert len(asked) == 3
