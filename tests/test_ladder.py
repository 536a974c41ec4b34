"""Tests of hvae/model/ladder.py: shapes, no leakage, latent sources, parameter paths, the
prior input's hole fills.

Why one file past ~350 lines: every test here builds the same tiny HVAE and shares its compiled
fixtures; split, each module would compile them again.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import centre_mask, random_images, tiny_model_config

from hvae.model import ladder, layers
from hvae.model.ladder import HVAE
from hvae.typed_config import ConfigError, ModelConfig

B = 2


def _init(cfg, seed=0):
  return ladder.init(HVAE(cfg), jax.random.PRNGKey(seed))


def _abstract_init_and_apply(model):
  """(params, output) of init + apply on a [B, 64, 64] batch, as shapes only (eval_shape)."""
  image = jax.ShapeDtypeStruct((B, 64, 64, 3), jnp.uint8)
  mask = jax.ShapeDtypeStruct((B, 64, 64, 1), jnp.float32)

  def run(rng, image, mask):
    params = model.init({"params": rng, "sample": rng}, image, mask)["params"]
    return params, model.apply({"params": params}, image, mask, rngs={"sample": rng})

  return jax.eval_shape(run, jax.random.PRNGKey(0), image, mask)


# ---------------------------------------------------------------- shapes, through eval_shape


# The options of the shape test. The deterministic kind has no posterior: one posterior value
# covers it.
_OPTIONS = (range(1, 7), ("bottom_up", "top_down"), (True, False),
            ("dmol", "discretized_gaussian", "gaussian"), ("hvae", "deterministic"))
_VALID = [c for c in itertools.product(*_OPTIONS)
          if not (c[4] == "deterministic" and c[1] == "top_down")]
# A pairwise covering set of the 108 valid combinations (greedy, fixed): every pair of values of
# two options that some valid combination has is in at least one case (83 pairs, 18 cases).
_CASES = [
    (1, "bottom_up", False, "discretized_gaussian", "deterministic"),
    (1, "bottom_up", True, "dmol", "hvae"),
    (1, "top_down", True, "gaussian", "hvae"),
    (2, "bottom_up", False, "discretized_gaussian", "deterministic"),
    (2, "bottom_up", True, "gaussian", "hvae"),
    (2, "top_down", True, "dmol", "hvae"),
    (3, "bottom_up", True, "discretized_gaussian", "hvae"),
    (3, "bottom_up", True, "dmol", "deterministic"),
    (3, "top_down", False, "gaussian", "hvae"),
    (4, "bottom_up", True, "discretized_gaussian", "hvae"),
    (4, "bottom_up", True, "gaussian", "deterministic"),
    (4, "top_down", False, "dmol", "hvae"),
    (5, "bottom_up", False, "dmol", "deterministic"),
    (5, "bottom_up", True, "gaussian", "hvae"),
    (5, "top_down", True, "discretized_gaussian", "hvae"),
    (6, "bottom_up", False, "discretized_gaussian", "deterministic"),
    (6, "bottom_up", True, "dmol", "hvae"),
    (6, "top_down", True, "gaussian", "hvae"),
]


def _pairs(case) -> set:
  return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(case)), 2)}


def test_shape_cases_cover_every_pair_of_options():
  assert set(_CASES) <= set(_VALID)
  assert set().union(*map(_pairs, _CASES)) == set().union(*map(_pairs, _VALID))


@pytest.mark.parametrize("L,posterior,skips,likelihood,kind", _CASES)
def test_shapes_of_every_level(L, posterior, skips, likelihood, kind):
  cfg = tiny_model_config(num_levels=L, posterior=posterior, context_skips=skips,
                          likelihood=likelihood, kind=kind, num_mixtures=3)
  model = HVAE(cfg)
  params, out = _abstract_init_and_apply(model)
  assert out.px_params.shape == (B, 64, 64, model.likelihood.num_params)
  assert out.log_px.shape == (B, 64, 64)
  if kind == "deterministic":
    assert out.levels == ()
    assert not any(k.startswith("level_") and "q_head" in v for k, v in params.items())
    return
  assert len(out.levels) == L
  for l, lev in enumerate(out.levels, start=1):
    want = (B,) + cfg.latent_shape(l)
    if l < L:
      assert want == (B, 64 // 2**l, 64 // 2**l, 2)
    else:
      assert want == (B, cfg.top_latent_dim)
    for arr in (lev.z, lev.p.mean, lev.p.log_scale, lev.q.mean, lev.q.log_scale, lev.kl):
      assert arr.shape == want
    assert lev.log_q.shape == lev.log_p.shape == (B,)
    # Stable per-level parameter paths (per-level weight decay and dropout address them).
    assert "q_head" in params[f"level_{l}"]
    assert "z_proj" in params[f"level_{l}"]
    assert ("decoder" in params[f"level_{l}"]) == (l < L)


def test_standard_normal_top_prior_has_no_prior_head():
  cfg = tiny_model_config(top_prior="standard_normal")
  params = _init(cfg)
  assert "p_head" not in params["level_3"] and "p_head" in params["level_2"]
  apply = jax.jit(lambda p, im, m, k: HVAE(cfg).apply({"params": p}, im, m, rngs={"sample": k}))
  out = apply(params, random_images(B), centre_mask(B), jax.random.PRNGKey(1))
  np.testing.assert_array_equal(out.levels[-1].p.mean, 0.0)
  np.testing.assert_array_equal(out.levels[-1].p.log_scale, 0.0)


def test_trunk_parameters_are_shared_between_posterior_and_prior():
  params = _init(tiny_model_config())
  # One trunk; the posterior side adds only its mask projection (off here) and its heads.
  assert set(params) == {"trunk", "output_head", "level_1", "level_2", "level_3"}
  params = _init(tiny_model_config(posterior_sees_mask=True))
  assert "posterior_mask_proj" in params


# ---------------------------------------------------------------- no leakage (docs/design.md §4)


def _leak_probe(cfg):
  """grad wrt the raw image of (every prior's parameters + decoder output) and of the posterior.

  Explicit z for every level; random projections so no term can cancel by symmetry.
  """
  model = HVAE(cfg)
  params = _init(cfg, seed=3)
  mask = jnp.asarray(centre_mask(B))
  shapes = [cfg.latent_shape(l) for l in range(1, cfg.num_levels + 1)]
  keys = jax.random.split(jax.random.PRNGKey(4), 2 * len(shapes) + 4)
  zs = [jax.random.normal(k, (B,) + s) for k, s in zip(keys, shapes)]

  def project(tree, key):
    leaves = jax.tree_util.tree_leaves(tree)
    ks = jax.random.split(key, len(leaves))
    return sum(jnp.sum(x * jax.random.normal(k, x.shape)) for x, k in zip(leaves, ks))

  def run(image):
    return model.apply({"params": params}, image, mask, latents=zs, compute_posterior=True,
                       rngs={"sample": jax.random.PRNGKey(5)})

  def prior_and_decoder(image):
    out = run(image)
    priors = [(lev.p.mean, lev.p.log_scale) for lev in out.levels]
    return project(priors, keys[-1]) + project(out.px_params, keys[-2])

  def posterior(image):
    out = run(image)
    return project([(lev.q.mean, lev.q.log_scale) for lev in out.levels], keys[-3])

  image = jnp.asarray(random_images(B, seed=6), jnp.float32)
  return (np.asarray(jax.jit(jax.grad(prior_and_decoder))(image)),
          np.asarray(jax.jit(jax.grad(posterior))(image)), np.asarray(mask))


@pytest.mark.parametrize("posterior,hole_fill",
                         [("bottom_up", "zeros"), ("top_down", "multiscale")])
def test_no_leakage_from_missing_pixels(posterior, hole_fill):
  # levels 1-2 drawn in latent groups (model.latent_groups): of channels in the bottom_up case,
  # of positions (model.latent_group_layout="space") in the top_down one
  groups, layout = ((2, 2, 1), "channels") if posterior == "bottom_up" else ((2, 2, 1), "space")
  cfg = tiny_model_config(posterior=posterior, posterior_sees_mask=True, hole_fill=hole_fill,
                          fill_residual=hole_fill != "zeros", latent_groups=groups,
                          latent_group_layout=layout)
  g_prior, g_post, mask = _leak_probe(cfg)
  missing = np.broadcast_to(mask == 0, g_prior.shape)
  # Priors and decoder: exactly zero gradient from every missing pixel ...
  assert np.all(g_prior[missing] == 0.0)
  # ... while the same path is live for the given pixels (a stop_gradient would zero both).
  assert np.abs(g_prior[~missing]).max() > 0.0
  # The posterior does see the missing pixels.
  assert np.abs(g_post[missing]).max() > 0.0


def test_no_leakage_deterministic_baseline():
  cfg = tiny_model_config(kind="deterministic")
  model, params = HVAE(cfg), _init(cfg)
  mask = jnp.asarray(centre_mask(B))
  f = lambda im: jnp.sum(model.apply({"params": params}, im, mask).px_params ** 2)  # noqa: E731
  g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(random_images(B), jnp.float32)))
  missing = np.broadcast_to(np.asarray(mask) == 0, g.shape)
  assert np.all(g[missing] == 0.0) and np.abs(g[~missing]).max() > 0.0


# ---------------------------------------------------------------- latent sources


@functools.lru_cache
def _source_fixture():
  # levels 1 and 2 in two latent groups each: every source test also covers the group path
  cfg = tiny_model_config(posterior="top_down", latent_groups=(2, 2, 1))
  model = HVAE(cfg)
  params = _init(cfg, seed=7)

  @functools.partial(jax.jit, static_argnames=("sources",))
  def apply(image, mask, rng, sources, noise=None):
    return model.apply({"params": params}, image, mask, sources=sources, noise=noise,
                       compute_posterior=True, rngs={"sample": rng})

  return cfg, apply


def test_all_prior_sources_make_output_independent_of_missing_pixels():
  _, apply = _source_fixture()
  a = random_images(B, seed=1)
  b = a.copy()
  b[:, 16:48, 16:48] = random_images(B, seed=2)[:, 16:48, 16:48]
  mask = centre_mask(B)
  key = jax.random.PRNGKey(0)
  out_a, out_b = apply(a, mask, key, "prior"), apply(b, mask, key, "prior")
  np.testing.assert_array_equal(out_a.px_params, out_b.px_params)
  # With the posterior in charge the missing pixels do matter.
  post_a, post_b = apply(a, mask, key, "posterior"), apply(b, mask, key, "posterior")
  assert np.abs(np.asarray(post_a.px_params - post_b.px_params)).max() > 0


def test_fixed_noise_gives_identical_samples():
  cfg, apply = _source_fixture()
  image, mask = random_images(B), centre_mask(B)
  shapes = [(B,) + cfg.latent_shape(l) for l in range(1, cfg.num_levels + 1)]
  noise = [jax.random.normal(jax.random.PRNGKey(l), s) for l, s in enumerate(shapes)]
  one = apply(image, mask, jax.random.PRNGKey(1), "prior", noise)
  two = apply(image, mask, jax.random.PRNGKey(2), "prior", noise)
  for a, b in zip(one.levels, two.levels):
    np.testing.assert_array_equal(a.z, b.z)
  np.testing.assert_array_equal(one.px_params, two.px_params)
  three = apply(image, mask, jax.random.PRNGKey(2), "prior")
  assert np.abs(np.asarray(three.px_params - one.px_params)).max() > 0


def test_per_level_sources_swap_only_that_level():
  cfg, apply = _source_fixture()
  image, mask = random_images(B), centre_mask(B)
  key = jax.random.PRNGKey(3)
  post = apply(image, mask, key, "posterior")
  swap = apply(image, mask, key, ("posterior", "prior", "posterior"))
  np.testing.assert_array_equal(post.levels[2].z, swap.levels[2].z)  # above: same posterior
  # Level 2 from the prior: z = mu_p + sigma_p * eps with the same eps the posterior used.
  eps = (post.levels[1].z - post.levels[1].q.mean) / post.levels[1].q.scale
  want = swap.levels[1].p.mean + swap.levels[1].p.scale * eps
  np.testing.assert_allclose(swap.levels[1].z, want, atol=1e-4)


def test_log_q_and_log_p_are_those_of_the_used_z():
  _, apply = _source_fixture()
  out = apply(random_images(B), centre_mask(B), jax.random.PRNGKey(4), "posterior")
  for lev in out.levels:
    np.testing.assert_allclose(lev.log_q, lev.q.log_prob(lev.z).reshape(B, -1).sum(-1),
                               rtol=1e-5)
    np.testing.assert_allclose(lev.log_p, lev.p.log_prob(lev.z).reshape(B, -1).sum(-1),
                               rtol=1e-5)


def test_latent_groups_each_group_s_prior_sees_the_groups_before_it_only():
  cfg, apply = _source_fixture()
  image, mask = random_images(B), centre_mask(B)
  shapes = [(B,) + cfg.latent_shape(l) for l in range(1, cfg.num_levels + 1)]
  noise = [jax.random.normal(jax.random.PRNGKey(10 + l), s) for l, s in enumerate(shapes)]
  base = apply(image, mask, jax.random.PRNGKey(0), "prior", noise)
  # moving group 1's noise of level 1 (channel 0) moves group 2's prior (channel 1) there ...
  moved = list(noise)
  moved[0] = noise[0].at[..., 0].add(1.0)
  other = apply(image, mask, jax.random.PRNGKey(0), "prior", moved)
  p, q = base.levels[0].p, other.levels[0].p
  np.testing.assert_array_equal(p.mean[..., 0], q.mean[..., 0])
  assert np.abs(np.asarray(p.mean[..., 1] - q.mean[..., 1])).max() > 0
  # ... and through group 2's residual block, at neighbouring positions too: a change at one
  # position of group 1 reaches group 2's prior within 3 positions (two 3x3 convs in the block,
  # one in the prior head), so the group's prior correlates positions through its samples
  moved[0] = noise[0].at[:, 10, 10, 0].add(1.0)
  local = apply(image, mask, jax.random.PRNGKey(0), "prior", moved).levels[0].p
  change = np.abs(np.asarray(local.mean[..., 1] - p.mean[..., 1]))
  assert change[:, 10, 13].max() > 0 and change[:, 7, 10].max() > 0
  assert change[:, 10, 14].max() == 0 and change[:, 6, 10].max() == 0
  # moving group 2's noise leaves group 1 and the level's earlier groups alone
  moved[0] = noise[0].at[..., 1].add(1.0)
  late = apply(image, mask, jax.random.PRNGKey(0), "prior", moved).levels[0]
  np.testing.assert_array_equal(late.z[..., 0], base.levels[0].z[..., 0])
  np.testing.assert_array_equal(late.p.mean, p.mean)


def test_space_groups_draw_positions_in_order_each_seeing_its_earlier_neighbours():
  """`model.latent_group_layout="space"`: group g of a level owns all channels on its sub-lattice
  of positions (4 groups: (0,0), (1,1), (0,1), (1,0) mod 2; 2: a checkerboard) and its prior sees
  the samples of the groups before it at neighbouring positions, never its own or later ones."""
  cfg = tiny_model_config(posterior="top_down", latent_groups=(4, 2, 1),
                          latent_group_layout="space")
  model, params = HVAE(cfg), _init(cfg, seed=3)
  assert jax.tree_util.tree_leaves(params["level_1"]["group_4"]["p_head"])[-1].shape[-1] == 4
  image, mask = random_images(B), centre_mask(B)
  shapes = [(B,) + cfg.latent_shape(l) for l in range(1, cfg.num_levels + 1)]
  noise = [jax.random.normal(jax.random.PRNGKey(20 + l), s) for l, s in enumerate(shapes)]
  apply = jax.jit(lambda noise: model.apply(
      {"params": params}, image, mask, sources="prior", noise=noise, compute_posterior=True,
      rngs={"sample": jax.random.PRNGKey(0)}).levels)
  base = apply(noise)
  for lev, eps in zip(base[:2], noise):  # z = mu_p + sigma_p * eps everywhere, by its own group
    np.testing.assert_allclose(lev.z, lev.p.mean + lev.p.scale * eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lev.log_p, lev.p.log_prob(lev.z).reshape(B, -1).sum(-1),
                               rtol=1e-5)
    assert lev.kl.shape == lev.z.shape
  # the drawn z given back as latents: the same priors and pixels (no group sees a later one)
  again = jax.jit(lambda latents: model.apply(
      {"params": params}, image, mask, latents=latents, compute_posterior=False,
      rngs={"sample": jax.random.PRNGKey(1)}).levels)(tuple(lev.z for lev in base))
  for a, b in zip(base, again):
    np.testing.assert_allclose(a.p.mean, b.p.mean, rtol=1e-5, atol=1e-6)
  masks = [np.asarray(m[..., 0]) for m in ladder.space_masks(32, 4)]
  assert np.array_equal(sum(m.astype(int) for m in masks), np.ones((32, 32), int))

  def prior_change(y, x, level=0):
    moved = list(noise)
    moved[level] = noise[level].at[:, y, x, :].add(1.0)
    out = apply(moved)[level]
    return (np.abs(np.asarray(out.p.mean - base[level].p.mean)).max(axis=(0, 3)),
            np.abs(np.asarray(out.z - base[level].z)).max(axis=(0, 3)))
  # a group-1 sample at (10, 10) moves the priors of groups 2-4 next to it, no group-1 prior
  change, z_change = prior_change(10, 10)
  assert change[masks[0]].max() == 0
  assert change[11, 11] > 0 and change[10, 11] > 0 and change[11, 10] > 0
  assert change[11, 20] == 0  # local: the nearest group-4 priors reach 7 positions
  # a group-2 sample moves groups 3 and 4 only; a group-4 (the last) sample moves no prior
  change, _ = prior_change(11, 11)
  assert change[masks[0] | masks[1]].max() == 0 and change[10, 11] > 0 and change[11, 10] > 0
  change, z_change = prior_change(11, 10)
  assert change.max() == 0 and z_change[11, 10] > 0 and z_change.sum() == z_change[11, 10]
  # level 2, a checkerboard: a sample on an even square moves only odd squares' priors
  change, _ = prior_change(4, 4, level=1)
  even = np.asarray(ladder.space_masks(16, 2)[0][..., 0])
  assert change[even].max() == 0 and change[4, 5] > 0 and change[5, 4] > 0
  with pytest.raises(ConfigError, match="'space' layout draws a level in 1, 2 or 4"):
    tiny_model_config(latent_groups=(3, 1, 1), latent_group_layout="space")
  with pytest.raises(ConfigError, match="model.latent_group_layout"):
    tiny_model_config(latent_group_layout="rows")


def test_merge_blocks_shape_a_latent_sample_by_its_neighbours():
  """`model.merge_blocks`: residual blocks on the state after z_l's last merge, at level l's
  resolution, so a change of z_1 at one position reaches the pixels over a wider square (two 3x3
  convs at 32x32: 2 positions = 4 px further each way); 0 keeps today's parameters exactly."""
  changed = {}
  for blocks in (0, 1):
    cfg = tiny_model_config(num_levels=2, latent_channels=(2, 2), merge_blocks=blocks)
    params = _init(cfg)
    paths = {l: set(params[f"level_{l}"]) for l in (1, 2)}
    assert all(("merged_0" in p) == bool(blocks) for p in paths.values()), paths
    z1 = jax.random.normal(jax.random.PRNGKey(1), (B, 32, 32, 2))
    z2 = jax.random.normal(jax.random.PRNGKey(2), (B, 4))

    def run(z, cfg=cfg, params=params, z2=z2):
      return HVAE(cfg).apply({"params": params}, random_images(B), centre_mask(B),
                             latents=(z, z2), compute_posterior=False,
                             rngs={"sample": jax.random.PRNGKey(0)}).px_params
    diff = np.abs(np.asarray(run(z1.at[:, 16, 16, :].add(1.0)) - run(z1))).max(axis=(0, 3))
    rows = np.flatnonzero(diff.max(axis=1) > 0)
    changed[blocks] = (rows.min(), rows.max())
  (lo0, hi0), (lo1, hi1) = changed[0], changed[1]
  assert lo1 == lo0 - 4 and hi1 == hi0 + 4, changed
  with pytest.raises(ConfigError, match="model.merge_blocks"):
    tiny_model_config(merge_blocks=-1)


def test_latent_groups_parameter_paths_and_validation():
  cfg = tiny_model_config(latent_groups=(2, 1, 1), latent_channels=(4, 2, 2))
  params = jax.eval_shape(lambda: _init(cfg))
  # group 1 keeps the level's own heads (checkpoints without groups keep their paths)
  assert {"q_head", "p_head", "z_proj", "group_2"} <= set(params["level_1"])
  assert set(params["level_1"]["group_2"]) == {"block", "q_head", "p_head", "z_proj"}
  kernels = jax.tree_util.tree_leaves(params["level_1"]["group_2"]["q_head"])
  assert kernels[-1].shape[-1] == 4  # its 2 channels' (mean, scale)
  assert "group_2" not in params["level_2"] and "group_2" not in params["level_3"]
  with pytest.raises(ConfigError, match="latent_groups .level 1.: 3 groups do not divide"):
    tiny_model_config(latent_groups=(3, 1, 1), latent_channels=(4, 2, 2))
  with pytest.raises(ConfigError, match="latent_groups: has 2 entries"):
    tiny_model_config(latent_groups=(2, 1))
  with pytest.raises(ConfigError, match="latent_groups .level 2.: must be > 0"):
    tiny_model_config(latent_groups=(1, 0, 1))


def test_bad_source_or_per_level_length_is_an_error():
  model = HVAE(tiny_model_config())
  params = _init(tiny_model_config())
  with pytest.raises(ValueError, match="sources"):
    model.apply({"params": params}, random_images(1), centre_mask(1), sources="poster",
                rngs={"sample": jax.random.PRNGKey(0)})
  with pytest.raises(ValueError, match="temperature"):
    model.apply({"params": params}, random_images(1), centre_mask(1), sources="prior",
                temperature=(1.0, 0.5), rngs={"sample": jax.random.PRNGKey(0)})


# ---------------------------------------------------------------- remedies living in the model


def test_sigma_floor_bounds_every_sigma():
  cfg = tiny_model_config(sigma_floor=(0.5, 0.0, 0.2))
  model, params = HVAE(cfg), _init(cfg)
  # Push the raw scale very negative by shifting every head's bias.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x - 50.0 if "head" in jax.tree_util.keystr(p) and "bias" in
      jax.tree_util.keystr(p) else x, params)
  apply = jax.jit(lambda p, im, m, k: model.apply({"params": p}, im, m, rngs={"sample": k}))
  out = apply(params, random_images(B), centre_mask(B), jax.random.PRNGKey(0))
  for floor, lev in zip(cfg.sigma_floor, out.levels):
    assert float(jnp.min(lev.q.scale)) >= floor and float(jnp.min(lev.p.scale)) >= floor


def test_head_clamp_bounds_means_and_sigmas_and_leaves_small_outputs_alone():
  """`model.head_clamp` = c (NVAE's soft clamp): whatever the head's raw outputs, |mean| < c and
  sigma within the floor plus softplus(_SOFTPLUS_ONE -/+ c), so one example's KL is bounded
  (unclamped, a runaway head on faces gave sigma_p = sigma_q = 1e-4 and means 2.1e4 apart, 2e16
  nats on one dimension); outputs well inside the bounds barely move; c = 0 is the identity."""
  c, floor = 5.0, 0.1
  raw = jnp.asarray([-1e4, -50.0, -0.1, 0.0, 0.1, 50.0, 1e4])
  g = layers.gaussian_from_raw(raw, raw, floor, clamp=c)
  lo = floor + 1e-4 + float(jax.nn.softplus(layers._SOFTPLUS_ONE - c))
  hi = floor + 1e-4 + float(jax.nn.softplus(layers._SOFTPLUS_ONE + c))
  assert float(jnp.max(jnp.abs(g.mean))) <= c and lo - 1e-6 <= float(jnp.min(g.scale))
  assert float(jnp.max(g.scale)) <= hi + 1e-6 and lo > 0.01 + floor  # sigma > 0.01 + floor
  kl = g.kl(layers.gaussian_from_raw(-raw, -raw, floor, clamp=c))
  assert float(jnp.max(kl)) < 1e6  # unclamped: ~2.5e10
  near = layers.gaussian_from_raw(raw[2:5], raw[2:5], floor, clamp=c)
  same = layers.gaussian_from_raw(raw[2:5], raw[2:5], floor)
  np.testing.assert_allclose(near.mean, same.mean, rtol=1e-3)
  np.testing.assert_allclose(near.scale, same.scale, rtol=1e-3)
  off = layers.gaussian_from_raw(raw, raw, floor, clamp=0.0)
  np.testing.assert_array_equal(off.mean, raw)
  # The config reaches every head; a negative clamp is a config error.
  assert ladder._head(tiny_model_config(head_clamp=c), 1, 2).clamp == c
  for bad in (-1.0, float("inf")):  # inf * tanh(x / inf) would be NaN
    with pytest.raises(ConfigError, match="model.head_clamp"):
      tiny_model_config(head_clamp=bad)


def test_dropout_of_one_level_touches_only_that_level():
  cfg = tiny_model_config(dropout=(0.0, 0.5, 0.0))
  model, params = HVAE(cfg), _init(cfg)
  image, mask = random_images(B), centre_mask(B)
  noise = [jnp.zeros((B,) + cfg.latent_shape(l)) for l in (1, 2, 3)]

  @functools.partial(jax.jit, static_argnums=0)
  def run(train, key):
    return model.apply({"params": params}, image, mask, train=train, noise=noise,
                       rngs={"sample": key, "dropout": key})

  ref, drop = run(False, jax.random.PRNGKey(0)), run(True, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(ref.levels[2].q.mean, drop.levels[2].q.mean)  # level 3
  np.testing.assert_array_equal(ref.levels[2].p.mean, drop.levels[2].p.mean)
  assert np.abs(np.asarray(ref.levels[1].q.mean - drop.levels[1].q.mean)).max() > 0  # level 2
  assert np.abs(np.asarray(ref.levels[1].p.mean - drop.levels[1].p.mean)).max() > 0
  # Level 1's bottom-up posterior never sees level 2's features.
  np.testing.assert_array_equal(ref.levels[0].q.mean, drop.levels[0].q.mean)


def test_model_config_is_frozen_and_hashable():
  cfg = ModelConfig()
  hash(cfg)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.width = 3  # type: ignore[misc]


@pytest.mark.parametrize("posterior", ["bottom_up", "top_down"])
def test_level_widths_set_each_resolution_and_add_projections_only_where_they_change(posterior):
  cfg = tiny_model_config(num_levels=3, width=8, level_widths=(8, 16, 24), posterior=posterior)
  model = HVAE(cfg)
  params, out = _abstract_init_and_apply(model)
  trunk = params["trunk"]
  assert "g1_proj" not in trunk  # 8 -> 8
  assert trunk["g2_proj"]["kernel"].shape == (1, 1, 8, 16)
  assert trunk["g3_proj"]["kernel"].shape == (1, 1, 16, 24)
  assert params["level_1"]["z_proj"]["kernel"].shape[-1] == 8
  assert params["level_2"]["z_proj"]["kernel"].shape[-1] == 16
  assert params["level_3"]["z_proj"]["kernel"].shape == (4, 8 * 8 * 24)  # top: dense to 8x8x24
  assert params["level_2"]["decoder"]["in_proj"]["kernel"].shape == (1, 1, 24, 16)
  assert params["level_1"]["decoder"]["in_proj"]["kernel"].shape == (1, 1, 16, 8)
  assert "in_proj" not in params["output_head"]  # w_1 = width
  assert out.log_px.shape == (B, 64, 64)
  # 0 means `width`; a wrong length names the field.
  assert tiny_model_config(width=8, level_widths=(0, 0, 0)).level_width(2) == 8
  with pytest.raises(ConfigError, match="model.level_widths"):
    tiny_model_config(num_levels=3, level_widths=(8, 16))


def test_upsampling_methods():
  from hvae.model import layers

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  np.testing.assert_allclose(layers.upsample(x, "bilinear"),
                             jax.image.resize(x, (2, 8, 8, 3), "bilinear"), atol=1e-6)
  nearest = layers.upsample(x, "nearest")
  np.testing.assert_array_equal(nearest[:, ::2, ::2], x)
  np.testing.assert_array_equal(nearest[:, 1::2, 1::2], x)
  with pytest.raises(ConfigError, match="model.upsample"):
    tiny_model_config(upsample="bicubic")


@pytest.mark.parametrize("name", ["pull_push_fill", "multiscale_fill"])
def test_hole_fills_keep_the_context_and_fill_the_hole_from_it_alone(name):
  from hvae.model import layers

  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
  mask = jnp.asarray(centre_mask(2))
  fill = jax.jit(lambda x, mask=mask: getattr(layers, name)(x, mask))
  out = np.asarray(fill(x))
  given = np.broadcast_to(np.asarray(mask) > 0, out.shape)
  np.testing.assert_array_equal(out[given], np.asarray(x)[given])  # the context, exactly
  if name == "pull_push_fill":  # a convex combination of given pixels: within their range
    lo = np.where(given, x, np.inf).min((1, 2), keepdims=True)
    hi = np.where(given, x, -np.inf).max((1, 2), keepdims=True)
    assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6)
  # A constant context fills with that constant, and nothing of the hole reaches the fill.
  np.testing.assert_allclose(fill(jnp.full_like(x, 0.3)), 0.3, atol=1e-5)
  g = np.asarray(jax.grad(lambda x: jnp.sum(fill(x) ** 2))(x))
  assert np.all(g[~given] == 0.0) and np.abs(g[given]).max() > 0.0
  # Smooth: a horizontal ramp is continued across the hole, close to the ramp itself.
  ramp = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, 64)[None, None, :, None], x.shape)
  row = np.asarray(fill(ramp))[0, 32, :, 0]
  assert np.abs(np.diff(row)).max() < 4 * (2.0 / 63)
  assert np.abs(row - np.linspace(-1.0, 1.0, 64)).max() < 0.2
  # An image with no given pixel fills with 0 (mid-grey), not NaN.
  np.testing.assert_array_equal(fill(x, jnp.zeros_like(mask)), 0.0)
  with pytest.raises(ConfigError, match="model.hole_fill"):
    tiny_model_config(hole_fill="biharmonic")


def test_multiscale_fill_approaches_the_biharmonic_solution_with_more_steps():
  from hvae import baselines
  from hvae.model import layers

  image = random_images(1, seed=5)[0].astype(np.float32)
  mask = centre_mask(1)
  reference = baselines.biharmonic(image, mask[0]).astype(np.float32) / 127.5 - 1.0
  x = jnp.asarray(image[None] / 127.5 - 1.0)
  fill = jax.jit(layers.multiscale_fill, static_argnames="steps")
  error = [float(np.sqrt(np.mean((np.asarray(fill(x, mask, steps=s))[0] - reference) ** 2)))
           for s in (10, 200)]
  assert error[1] < 0.5 * error[0]


def test_fill_residual_moves_the_likelihood_by_the_prior_input_s_fill():
  from hvae.model import layers

  cfg = tiny_model_config(hole_fill="multiscale", kind="deterministic")
  params = _init(cfg)  # fill_residual adds no parameter: the same tree serves both
  image, mask = jnp.asarray(random_images(B, seed=3)), jnp.asarray(centre_mask(B))
  out = {r: jax.jit(HVAE(dataclasses.replace(cfg, fill_residual=r)).apply)(
      {"params": params}, image, mask) for r in (False, True)}
  fill = layers.multiscale_fill(jnp.asarray(image, jnp.float32) / 127.5 - 1.0, mask)
  np.testing.assert_allclose(out[True].px_params,
                             HVAE(cfg).likelihood.add_base(out[False].px_params, fill), atol=1e-5)
