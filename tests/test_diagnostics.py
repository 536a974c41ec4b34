"""Tests of hvae/diagnostics.py and the per-level parts of hvae/evaluation.py."""

import functools

import jax
import numpy as np
from helpers import centre_mask, random_images, tiny_model_config

from hvae import diagnostics, evaluation, objective
from hvae.mesh import make_mesh
from hvae.model import ladder
from hvae.model.ladder import HVAE
from hvae.train import latent_dims

B = 4


@functools.lru_cache
def _setup():
  cfg = tiny_model_config(posterior="top_down")
  model = HVAE(cfg)
  params = ladder.init(model, jax.random.PRNGKey(0))
  mesh = make_mesh(jax.devices()[:1])
  batch = {"image": random_images(B, seed=1), "mask": centre_mask(B)}
  return cfg, model, params, mesh, batch


def test_swap_is_the_recon_drop_when_one_level_comes_from_the_prior():
  cfg, model, params, mesh, batch = _setup()
  rng = jax.random.PRNGKey(3)
  step = diagnostics.make_swap_step(model, mesh)
  got = diagnostics.swap_metrics(step, params, [batch], rng, mesh)
  assert sorted(got) == [f"swap/level_{l}" for l in (1, 2, 3)]

  def recon(sources):
    out = model.apply({"params": params}, batch["image"], batch["mask"], sources=sources,
                      compute_posterior=True, rngs={"sample": jax.random.fold_in(rng, 0)})
    return objective.elbo_terms(out, batch["mask"]).recon

  # One jitted call (op by op, the two passes cost a few hundred small compiles).
  want = jax.jit(lambda: recon(("posterior", "prior", "posterior")) - recon("posterior"))()
  np.testing.assert_allclose(got["swap/level_2"], np.mean(want), rtol=1e-4, atol=1e-3)


def test_resample_keeps_given_pixels_and_varies_only_through_one_level():
  cfg, model, params, mesh, batch = _setup()
  fn = diagnostics.make_resample_fn(model, 3)
  out = np.asarray(fn(params, batch["image"][:2], batch["mask"][:2], jax.random.PRNGKey(0)))
  assert out.shape == (3, 3, 2, 64, 64, 3)
  given = np.broadcast_to(batch["mask"][:2] == 1, (3, 3, 2, 64, 64, 3))
  np.testing.assert_array_equal(out[given], np.broadcast_to(batch["image"][:2], out.shape)[given])
  grid = diagnostics.resample_grid(out, batch["image"][:2], batch["mask"][:2])
  assert grid.dtype == np.uint8 and grid.ndim == 3


def test_active_units_count_units_whose_posterior_mean_varies():
  # Two units: one whose mean varies over examples (variance 1), one constant.
  means = np.array([[1.0, 0.5], [-1.0, 0.5], [1.0, 0.5], [-1.0, 0.5]])
  sums = {"q_mean/1": means.sum(0), "q_mean_sq/1": np.square(means).sum(0)}
  terms = {"recon": np.ones(4), "kl": np.ones((4, 1)), "num_dims": np.full(4, 3072.0)}
  m = evaluation.summarize(terms, (2,), sums, count=4)
  assert m["active_units/level_1"] == 0.5


def test_eval_pass_ignores_padding_rows():
  cfg, model, params, mesh, batch = _setup()
  step = evaluation.make_eval_step(model, mesh)
  padded = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}
  padded["weight"] = np.array([1, 1, 1, 1, 0, 0], np.float32)
  r = evaluation.run_pass(step, params, [padded], jax.random.PRNGKey(0), mesh)
  assert r["count"] == 4 and r["per_example"]["recon"].shape == (4,)
  assert r["sums"]["kl_map/1"].shape == (32, 32)
  # recon by channel (chain rule) adds up to recon, per example and in bits/dim.
  ex = r["per_example"]
  np.testing.assert_allclose(ex["recon_channels"].sum(-1), ex["recon"], rtol=1e-4)
  m = evaluation.summarize(ex, latent_dims(model.config))
  np.testing.assert_allclose(sum(m[f"recon_bpd/{c}"] for c in evaluation.CHANNELS),
                             m["recon_bpd"], rtol=1e-4)


def test_worst_examples_are_those_with_the_largest_kl():
  images = np.arange(5)[:, None, None, None] * np.ones((5, 64, 64, 3), np.uint8)
  batch = {"image": images, "mask": centre_mask(5), "weight": np.ones(5, np.float32)}
  kl = np.array([[1.0, 5.0], [9.0, 0.0], [3.0, 7.0], [0.0, 1.0], [4.0, 2.0]])
  worst = diagnostics.worst_examples(kl, [batch], per_level=2)
  assert [int(x[0, 0, 0]) for x in worst[1]["image"]] == [1, 4]
  assert [int(x[0, 0, 0]) for x in worst[2]["image"]] == [2, 0]


def test_resample_and_heatmap_grids_label_their_rows_by_level(monkeypatch):
  calls = []
  make_grid = diagnostics.grids.make_grid
  monkeypatch.setattr(diagnostics.grids, "make_grid",
                      lambda rows, **kw: calls.append(kw) or make_grid(rows, **kw))
  L, S, C = 3, 2, 2
  resampled = np.zeros((L, S, C, 64, 64, 3), np.uint8)
  image, mask = np.zeros((C, 64, 64, 3), np.uint8), np.ones((C, 64, 64, 1), np.float32)
  diagnostics.resample_grid(resampled, image, mask)
  # Rows: context 1 with level 1, 2, 3 varied, then context 2.
  assert calls[-1]["row_labels"] == ["level 1", "level 2", "level 3"] * C
  sums = {f"kl_map/{l}": np.ones((64 // 2**l,) * 2) for l in (1, 2)}
  diagnostics.kl_heatmap_grid(sums, sums, 4, 4, num_levels=3)
  assert calls[-1]["row_labels"] == ["level 1", "level 2"]  # the 2-D levels only
